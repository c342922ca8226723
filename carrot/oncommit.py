"""The messages a transaction sends when it commits, kept as one unit.

Django runs a transaction's ``on_commit`` hooks one after the other and, once one of them
raises something that is not an Exception (``gevent.Timeout``, ``GreenletExit``,
``KeyboardInterrupt``), runs none of the rest: their rows would say PUBLISHED for ever, and
their messages would never be sent. So carrot keeps, per database connection, the list of
sends still waiting for their hook, beside Django's own list (which alone knows which
savepoints were rolled back). A send that is interrupted marks its own row FAILED (RabbitMQ
may or may not have it) and every later row of the transaction FAILED (not sent) before
the interruption goes on: no row is left saying PUBLISHED for a message nobody sends.
"""

from __future__ import annotations

import enum
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from django.db import transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from carrot import conf, lifecycle
from carrot.broker import Outgoing, SendProgress, get_publisher
from carrot.models import MessageLog
from carrot.outbox import get_outbox

logger = logging.getLogger('carrot.publish')


class Sendable(Protocol):
    """A message that can be sent (``carrot.publishing.Message``)."""

    @property
    def task(self) -> str: ...

    @property
    def uuid(self) -> str: ...

    @property
    def queue(self) -> conf.Queue: ...

    def send(self) -> None: ...

    def outgoing(self) -> Outgoing: ...


class Outcome(enum.Enum):
    WAITING = 'waiting'
    SENT = 'sent'  # confirmed by RabbitMQ
    FAILED = 'failed'  # refused, or the broker unreachable: the row says FAILED
    UNCERTAIN = 'uncertain'  # interrupted while being sent: RabbitMQ may have it
    NOT_SENT = 'not sent'  # an earlier send of the same unit was interrupted


@dataclass(eq=False)
class Send:
    """A message whose row is written, waiting to be sent, and what became of it."""

    message: Sendable
    log: MessageLog
    #: Registered inside a savepoint, which may yet be rolled back (and its hook dropped).
    in_savepoint: bool = False
    outcome: Outcome = Outcome.WAITING


# Per connection (so per thread, or per greenlet in the worker): the sends whose on_commit
# hook has not run yet, in the order they were registered.
_waiting: weakref.WeakKeyDictionary[BaseDatabaseWrapper, list[Send]] = (
    weakref.WeakKeyDictionary())


def send_on_commit(message: Sendable, log: MessageLog, alias: str) -> Send:
    """Send ``message`` once the transaction on ``alias`` commits (nothing on a rollback)."""
    return send_all_on_commit([(message, log)], alias)[0]


def send_all_on_commit(messages: Sequence[tuple[Sendable, MessageLog]], alias: str
                       ) -> list[Send]:
    """Send each message (with its row) once the transaction on ``alias`` commits, with one
    ``on_commit`` hook for them all: they stand or fall together, as the calls of one
    savepoint do."""
    connection = transaction.get_connection(alias)
    waiting = _waiting.setdefault(connection, [])
    if waiting and not connection.run_on_commit:
        # No hook is pending on this connection: those sends belong to transactions or
        # savepoints that were rolled back, and will never run.
        waiting.clear()
    in_savepoint = bool(connection.savepoint_ids)
    sends = [Send(message, log, in_savepoint=in_savepoint) for message, log in messages]
    waiting.extend(sends)
    transaction.on_commit(lambda: _run_hook(connection, sends), using=alias, robust=True)
    return sends


def _run_hook(connection: BaseDatabaseWrapper, sends: list[Send]) -> None:
    """Send ``sends`` (registered together) and, in the same pipelined run, every later send
    of the transaction that is sure to be committed: one registered outside any savepoint."""
    if sends[0].outcome is not Outcome.WAITING:
        return  # sent already, with an earlier hook's run (a group is sent whole)
    waiting = _waiting.get(connection, [])
    # Hooks run in the order they were registered: a send before these still waiting had
    # its savepoint rolled back. Those after them are this transaction's, still to come;
    # one made inside a savepoint is left to its own hook, which runs only if the
    # savepoint was kept.
    position = next((i for i, s in enumerate(waiting) if s is sends[0]), -1)
    later = waiting[position + len(sends):] if position >= 0 else []
    batch = [*sends, *(s for s in later if not s.in_savepoint)]
    waiting[:] = [s for s in later if s.in_savepoint]
    try:
        send_all(batch)
    except BaseException as interruption:
        left, waiting[:] = list(waiting), []
        mark_not_sent(left, interruption, committed=False)
        raise


def send_all(sends: Sequence[Send]) -> None:
    """Send each message, recording its outcome on it and on its row.

    Many are sent in one pipelined run per broker, waiting once for all the confirms. A
    send that fails (the broker refused it or cannot be reached) marks its row FAILED and
    the others go on. An interruption marks the rows of those it may have reached FAILED
    as perhaps sent, and the rest FAILED as not sent; then it is raised.
    """
    if len(sends) == 1:
        _send_one(sends[0])
        return
    by_broker: dict[conf.Broker, list[Send]] = {}
    for send in sends:
        by_broker.setdefault(send.message.queue.broker, []).append(send)
    for broker, group in by_broker.items():
        progress = SendProgress(len(group))
        try:
            get_publisher().send_many(broker, [s.message.outgoing() for s in group],
                                      progress)
        except BaseException as interruption:
            _sent([s for s, confirmed in zip(group, progress.confirmed, strict=True)
                   if confirmed])
            for index, send in enumerate(group):
                if not progress.confirmed[index] and progress.written[index]:
                    _interrupted(send, interruption)
            mark_not_sent([s for s in sends if s.outcome is Outcome.WAITING], interruption)
            raise
        _sent([s for s, error in zip(group, progress.errors, strict=True) if error is None])
        for send, error in zip(group, progress.errors, strict=True):
            if error is not None:
                _failed(send, error)


def _send_one(send: Send) -> None:
    try:
        send.message.send()
    except Exception as error:
        _failed(send, error)
    except BaseException as interruption:
        _interrupted(send, interruption)
        raise
    else:
        _sent([send])


def _sent(sends: Sequence[Send]) -> None:
    """RabbitMQ confirmed them: their rows no longer await the confirm."""
    for send in sends:
        send.outcome = Outcome.SENT
    rows = [(s.log._state.db or lifecycle.database(), s.log.uuid) for s in sends
            if s.log.pk is not None]
    if rows:
        get_outbox().confirmed(rows)


def _failed(send: Send, error: Exception) -> None:
    send.outcome = Outcome.FAILED
    _quietly_mark_failed(send, error)
    logger.error('Task %s (%s) was committed but not published: %s',
                 send.message.task, send.message.uuid, error)


def _interrupted(send: Send, interruption: BaseException) -> None:
    send.outcome = Outcome.UNCERTAIN
    _quietly_mark_failed(send, interruption)
    logger.error('Task %s (%s) was committed but its publish was interrupted by %s; '
                 'it may or may not be in RabbitMQ.', send.message.task,
                 send.message.uuid, type(interruption).__name__)


def mark_not_sent(sends: Sequence[Send], interruption: BaseException,
                  committed: bool = True) -> None:
    """FAILED, saying why, for the rows of ``sends`` never sent because of ``interruption``.

    A send whose savepoint was rolled back has no row, and is left alone. ``committed``
    False: some may be such sends, so an untracked message, whose row would be written now,
    is only logged.
    """
    if not sends:
        return
    for send in sends:
        send.outcome = Outcome.NOT_SENT
    reason = (f'Not published: the transaction committed, but sending its messages was '
              f'interrupted by {type(interruption).__name__} before this one, so RabbitMQ '
              f'does not have it. Publish it again if it should still run.')
    try:
        lifecycle.mark_not_sent([s.log for s in sends if committed or s.log.pk is not None],
                                reason)
    except Exception as error:  # the interruption must go on all the same
        logger.error('%d committed task(s) were not published (interrupted by %s), and their '
                     'rows could not be marked FAILED: %s; message ids: %s', len(sends),
                     type(interruption).__name__, error, ', '.join(s.log.uuid for s in sends))
    else:
        logger.error('%d committed task(s) were not published: interrupted by %s; their rows '
                     'say FAILED; message ids: %s', len(sends), type(interruption).__name__,
                     ', '.join(s.log.uuid for s in sends))


def _quietly_mark_failed(send: Send, error: BaseException) -> None:
    try:
        lifecycle.mark_publish_failed(send.log, error)
    except Exception as db_error:
        logger.error('The row of task %s (%s) could not be marked FAILED: %s',
                     send.message.task, send.message.uuid, db_error)
