"""The MessageLog row as the outbox record of its message: sent without waiting for its confirm.

A tracked task's row is written awaiting its confirm (``awaiting_confirm``). Outside a
transaction, ``Outbox.send`` writes the message on a confirm-mode channel the process shares
and returns at once: the committed row is what keeps the promise that the task runs. The
confirms arrive on the connection's reader thread; the outbox thread clears
``awaiting_confirm`` for a batch of them with one UPDATE, and sends again, marked re-sent, a
message the broker refused, returned, or left unconfirmed because its channel failed. A
process that dies first leaves rows awaiting their confirm: the carrot service sends those
again after ``CARROT['resend_unconfirmed_after']`` seconds (``resend_unconfirmed``). A re-sent
copy runs only if no other copy of its task has started.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from amqpstorm.exception import AMQPChannelError, AMQPError
from django.db import Error as DatabaseFault
from django.db import connections, transaction
from django.db.models import Q
from django.utils import timezone

from carrot import conf, lifecycle, message
from carrot.amqp import SignallingChannel, close_quietly
from carrot.broker import ENCODING_ERRORS, Outgoing, SendProgress, get_publisher, publication
from carrot.confirms import Returns
from carrot.exceptions import BrokerUnavailable, CarrotConfigException, CarrotError
from carrot.models import MessageLog, Status

logger = logging.getLogger('carrot.publish')

#: How long the outbox thread lets confirms gather before it writes a batch of them.
FLUSH_INTERVAL = 0.05
#: A publish not confirmed within this is taken as lost with its channel, and sent again.
CONFIRM_TIMEOUT = 30.0
#: How long a process that exits normally waits for the confirms still due.
EXIT_WAIT = 10.0
#: Rows whose confirms one UPDATE records.
CONFIRM_BATCH = 500
#: Rows the service sends again in one round.
RESEND_BATCH = 500
#: The longest pause between two tries while the broker or the database fails.
MAX_BACKOFF = 5.0


@dataclass(eq=False)
class Unconfirmed:
    """A message sent without waiting, until its confirm is recorded on its row."""

    alias: str
    log: MessageLog
    item: Outgoing
    since: float = field(default_factory=time.monotonic)

    @property
    def broker(self) -> conf.Broker:
        return self.queue.broker

    @property
    def queue(self) -> conf.Queue:
        assert self.item.declare_queue is not None  # the outbox sends to a queue of carrot's
        return self.item.declare_queue


class _Stream:
    """The confirm-mode channel one broker's messages go out on without waiting."""

    def __init__(self, outbox: Outbox, channel: SignallingChannel) -> None:
        self.outbox = outbox
        self.channel = channel
        self.write_lock = threading.Lock()  # one writer at a time: tags in the frames' order
        self.lock = threading.Lock()  # the pending messages, shared with the reader thread
        self.pending: collections.OrderedDict[int, Unconfirmed] = collections.OrderedDict()
        self.returns = Returns()
        self.retired = False
        channel.confirm_listener = self

    def write(self, unconfirmed: Unconfirmed, frames: bytes) -> None:
        """Write one publish; AMQPChannelError, with nothing written, once retired."""
        with self.write_lock:
            tag = self.channel.next_delivery_tag
            with self.lock:
                if self.retired:
                    raise AMQPChannelError('the channel was retired')
                self.pending[tag] = unconfirmed
            try:
                self.channel.write_unconfirmed(frames)
            except BaseException:
                with self.lock:
                    self.pending.pop(tag, None)
                raise

    # Called by the connection's reader thread.
    def on_confirm(self, nacked: bool, delivery_tag: int, multiple: bool) -> None:
        answered: list[Unconfirmed] = []
        with self.lock:
            if multiple:
                while self.pending and next(iter(self.pending)) <= delivery_tag:
                    answered.append(self.pending.popitem(last=False)[1])
            elif delivery_tag in self.pending:
                answered.append(self.pending.pop(delivery_tag))
        refused: list[Unconfirmed] = []
        stored: list[tuple[str, str]] = []
        for unconfirmed in answered:
            message_id = unconfirmed.log.uuid
            if nacked or message_id in self.returns.message_ids:
                refused.append(unconfirmed)
            else:
                stored.append((unconfirmed.alias, message_id))
            self.returns.message_ids.discard(message_id)
        if refused:
            self.outbox.resend_later(refused)
        if stored:
            self.outbox.confirmed(stored, counted=True)

    def on_return_frame(self, frame_in: Any) -> bool:
        return self.returns.on_frame(frame_in)

    @property
    def usable(self) -> bool:
        """Open, and every pending publish younger than CONFIRM_TIMEOUT."""
        try:
            self.channel.check_for_errors()
        except AMQPError:
            return False
        with self.lock:
            oldest = next(iter(self.pending.values()), None)
        return oldest is None or time.monotonic() - oldest.since < CONFIRM_TIMEOUT

    def retire(self) -> list[Unconfirmed]:
        """Take no more publishes; the pending ones, to be sent again."""
        with self.lock:
            self.retired = True
            taken = list(self.pending.values())
            self.pending.clear()
        return taken


class Outbox:
    """This process's messages sent without waiting, until their confirms are recorded."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.opening = threading.Lock()
        self.streams: dict[conf.Broker, _Stream] = {}
        self.to_confirm: list[tuple[str, str]] = []  # (database alias, message id)
        self.to_resend: list[Unconfirmed] = []
        #: Rows this process wrote whose confirm is not recorded yet.
        self.outstanding = 0
        self.wake = threading.Event()
        self.hurry = threading.Event()
        self.thread: threading.Thread | None = None

    def send(self, alias: str, log: MessageLog, item: Outgoing) -> None:
        """Send ``item``, whose row ``log`` is committed awaiting its confirm, not waiting
        for the confirm: from here on this process, or the service, sees that it is stored.

        When nothing was sent, the row is removed and what ``Publisher.send`` raises is
        raised (BrokerUnavailable, …). An interruption while the frames are written is raised
        after the message is handed to the outbox thread, which sends it again.
        """
        unconfirmed = Unconfirmed(alias, log, item)
        try:
            stream = self._stream(unconfirmed.queue)
            frames = publication(stream.channel, item)
        except (AMQPError, *ENCODING_ERRORS):
            self._send_now_or_discard(unconfirmed)  # says what is wrong, or sends it
            return
        except BaseException:
            lifecycle.discard_unpublished(log)
            raise
        self._count(1)
        try:
            stream.write(unconfirmed, frames)
        except AMQPError:  # the channel failed, or was retired, before the frames went
            self._count(-1)
            self._retire(stream)
            self._send_now_or_discard(unconfirmed)
        except BaseException:  # interrupted while writing: perhaps sent, perhaps half sent
            self._retire(stream)  # its delivery tags may no longer match the broker's
            self.resend_later([unconfirmed])
            raise
        # A write the socket failed is not raised (amqpstorm records the error): the outbox
        # thread finds the stream broken and sends its pending messages again.

    def confirmed(self, rows: list[tuple[str, str]], counted: bool = False) -> None:
        """RabbitMQ has stored the messages of these rows (database alias, message id):
        clear their ``awaiting_confirm``.

        ``counted``: they are outstanding messages of ``send`` already.
        """
        with self.lock:
            self.to_confirm.extend(rows)
            if not counted:
                self.outstanding += len(rows)
        self._start()
        self.wake.set()

    def resend_later(self, unconfirmed: list[Unconfirmed], counted: bool = True) -> None:
        """Have the outbox thread send these again, each marked re-sent."""
        with self.lock:
            self.to_resend.extend(unconfirmed)
            if not counted:
                self.outstanding += len(unconfirmed)
        self._start()
        self.wake.set()

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every confirm due to be recorded."""
        deadline = time.monotonic() + timeout
        self.hurry.set()
        try:
            while self.outstanding > 0:
                if time.monotonic() >= deadline:
                    return False
                self.wake.set()
                time.sleep(0.01)
            return True
        finally:
            self.hurry.clear()

    def _stream(self, queue: conf.Queue) -> _Stream:
        get_publisher().declare_once(queue.broker, queue)
        stream = self.streams.get(queue.broker)
        if stream is not None and stream.channel.is_open:
            return stream
        with self.opening:
            stream = self.streams.get(queue.broker)
            if stream is not None and stream.channel.is_open:
                return stream
            if stream is not None:
                self._retire(stream)
            fresh = _Stream(self, get_publisher().confirm_channel(queue.broker, queue))
            self.streams[queue.broker] = fresh
            return fresh

    def _retire(self, stream: _Stream) -> None:
        """Stop using ``stream``: its pending messages are sent again."""
        with self.lock:
            for broker, kept in list(self.streams.items()):
                if kept is stream:
                    del self.streams[broker]
        self.resend_later(stream.retire())
        threading.Thread(target=close_quietly, args=(stream.channel,), daemon=True).start()

    def _send_now_or_discard(self, unconfirmed: Unconfirmed) -> None:
        try:
            self._send_now(unconfirmed, resent=False)
        except BaseException:
            lifecycle.discard_unpublished(unconfirmed.log)
            raise

    def _send_now(self, unconfirmed: Unconfirmed, resent: bool) -> None:
        """Send and wait for the confirm; raises what ``Publisher.send`` raises."""
        item = unconfirmed.item
        if resent:
            item = dataclasses.replace(item, properties=message.resent_properties(item.properties))
        get_publisher().send_outgoing(unconfirmed.broker, item)
        self.confirmed([(unconfirmed.alias, unconfirmed.log.uuid)])

    def _count(self, change: int) -> None:
        with self.lock:
            self.outstanding += change
        self._start()

    def _start(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            with self.lock:
                if self.thread is None or not self.thread.is_alive():
                    self.thread = threading.Thread(target=self._run, name='carrot-outbox',
                                                   daemon=True)
                    self.thread.start()

    # -- the outbox thread ---------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while True:
            self.wake.wait(1.0)
            self.wake.clear()
            try:
                problem = self._round()
            except Exception as error:
                logger.exception('The outbox thread failed a round; trying again')
                problem = str(error)
            if problem is None:
                if failures:
                    logger.warning('The outbox works again: the confirms are recorded')
                failures = 0
                self.hurry.wait(FLUSH_INTERVAL)
                continue
            if not failures:
                logger.warning('%d published task(s) await their confirm: %s; trying again '
                               'until it works', self.outstanding, problem)
            failures = min(failures + 1, 10)
            time.sleep(min(MAX_BACKOFF, 0.1 * 2 ** failures))  # also while draining

    def _round(self) -> str | None:
        """Retire failed streams, send again what needs it, record confirms; what failed
        (the broker, the database), if anything: what is left waits for the next round."""
        for stream in list(self.streams.values()):
            if not stream.usable:
                self._retire(stream)
        # Confirms first: rows already stored must not wait behind slow sends.
        with self.lock:
            to_confirm, self.to_confirm = self.to_confirm, []
        problem = self._record_confirms(to_confirm)
        with self.lock:
            to_resend, self.to_resend = self.to_resend, []
        problem = self._resend(to_resend) or problem
        if not to_resend and not to_confirm:
            for alias in connections:
                _close_database(alias)  # idle: hold no database connection
        return problem

    def _resend(self, to_resend: list[Unconfirmed]) -> str | None:
        for index, unconfirmed in enumerate(to_resend):
            try:
                self._send_now(unconfirmed, resent=True)
            except BrokerUnavailable as error:
                # This one goes last: one the broker keeps refusing must not hold up the rest.
                self.resend_later([*to_resend[index + 1:], unconfirmed])
                return f'RabbitMQ cannot take them again now ({error})'
            except CarrotError as error:
                self._give_up(unconfirmed, error)
            except Exception as error:  # a fault in carrot: keep the message, and say so
                self.resend_later(to_resend[index:])
                return f'sending them again failed ({type(error).__name__}: {error})'
            else:
                self._count(-1)  # counted again by ``confirmed``
        return None

    def _give_up(self, unconfirmed: Unconfirmed, error: CarrotError) -> None:
        logger.error('Task %s (%s) was not confirmed, and cannot be sent again: %s',
                     unconfirmed.log.task, unconfirmed.log.uuid, error)
        try:
            lifecycle.mark_not_sent([unconfirmed.log], f'Not published: {error}')
        except DatabaseFault as db_error:
            logger.error('Its row could not be marked FAILED: %s', db_error)
        self._count(-1)

    def _record_confirms(self, to_confirm: list[tuple[str, str]]) -> str | None:
        by_alias: dict[str, list[str]] = {}
        for alias, message_id in to_confirm:
            by_alias.setdefault(alias, []).append(message_id)
        left: list[tuple[str, str]] = []
        problem = None
        for alias, message_ids in by_alias.items():
            for start in range(0, len(message_ids), CONFIRM_BATCH):
                chunk = message_ids[start:start + CONFIRM_BATCH]
                try:
                    lifecycle.mark_confirmed(alias, chunk, released_at=None)  # first sends
                except Exception as error:  # the database, or carrot: kept for the next round
                    problem = f'their rows cannot be written now ({error})'
                    left.extend((alias, message_id) for message_id in chunk)
                    _close_database(alias)
                else:
                    self._count(-len(chunk))
        if left:
            with self.lock:
                self.to_confirm[:0] = left
        return problem


def _close_database(alias: str) -> None:
    try:
        connections[alias].close()
    except DatabaseFault:
        pass


_outbox: Outbox | None = None
_outbox_lock = threading.Lock()


def get_outbox() -> Outbox:
    """This process's outbox (a forked child gets its own)."""
    global _outbox
    with _outbox_lock:
        if _outbox is None or _outbox.pid != os.getpid():
            _outbox = Outbox()
        return _outbox


def drain(timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the confirms this process still awaits."""
    outbox = _outbox
    if outbox is None or outbox.pid != os.getpid():
        return True
    return outbox.drain(timeout)


@atexit.register
def _drain_at_exit() -> None:
    outbox = _outbox
    if outbox is None or outbox.pid != os.getpid() or not outbox.outstanding:
        return
    if not outbox.drain(EXIT_WAIT):
        logger.warning('%d task(s) published by this process are not confirmed by RabbitMQ '
                       'yet; the carrot service sends them again once they are %.0f s old',
                       outbox.outstanding, conf.get_settings().resend_unconfirmed_after)


# -- the service's side ------------------------------------------------------------------

def resend_unconfirmed(now: datetime | None = None) -> int:
    """Send again, marked re-sent, the tasks whose rows still await their confirm
    ``resend_unconfirmed_after`` seconds after they were published: their publishing
    process died before RabbitMQ's answer was recorded. How many were sent.

    The rows are claimed with ``SKIP LOCKED`` where the database can, so two services do not
    send the same rows; where it cannot, a second copy is harmless: it does not run.
    """
    settings = conf.get_settings()
    cutoff = (now or timezone.now()) - timedelta(seconds=settings.resend_unconfirmed_after)
    queues = {queue.name: queue for queue in settings.queues}
    alias = lifecycle.database()
    skip_locked = connections[alias].features.has_select_for_update_skip_locked
    # A released delayed row counts from its run_after, when it was released and sent.
    old = MessageLog.objects.using(alias).filter(
        Q(run_after__isnull=True) | Q(run_after__lt=cutoff),
        awaiting_confirm=True, publish_time__lt=cutoff)
    # Rows whose task started after all (a first copy stored, its confirm never recorded):
    # nothing to send, and the index of rows awaiting their confirm stays small.
    old.exclude(status=Status.PUBLISHED).update(awaiting_confirm=False)
    with transaction.atomic(using=alias):
        rows = list(old.select_for_update(skip_locked=skip_locked).filter(
            status=Status.PUBLISHED, queue__in=list(queues),
        ).order_by('publish_time')[:RESEND_BATCH])
        sent = send_rows(alias, rows, queues, resent=True)
    if sent:
        logger.warning('Sent %d task(s) again whose publishing process did not see RabbitMQ '
                       'confirm them; a copy runs only if no other has started', sent)
    return sent


def send_rows(alias: str, rows: Sequence[MessageLog], queues: Mapping[str, conf.Queue], *,
              resent: bool) -> int:
    """Send the messages of PUBLISHED ``rows`` awaiting their confirm, and record the
    confirms; how many were confirmed. ``resent``: marked as copies sent again.

    A message RabbitMQ did not confirm is left awaiting (the resender sends it again); one
    that cannot be sent at all makes its row FAILED.
    """
    by_broker: dict[conf.Broker, list[MessageLog]] = {}
    for row in rows:
        by_broker.setdefault(queues[str(row.queue)].broker, []).append(row)
    sent: dict[datetime | None, list[str]] = {}  # by the run_after the rows were sent with
    for broker, group in by_broker.items():
        progress = SendProgress(len(group))
        get_publisher().send_many(
            broker, [outgoing_of(row, queues[str(row.queue)], resent=resent) for row in group],
            progress)
        for row, confirmed, error in zip(group, progress.confirmed, progress.errors,
                                         strict=True):
            if confirmed:
                sent.setdefault(row.run_after, []).append(row.uuid)
            elif isinstance(error, CarrotConfigException):
                lifecycle.mark_not_sent([row], f'Not published: {error}')
    for released_at, message_ids in sent.items():
        lifecycle.mark_confirmed(alias, message_ids, released_at=released_at)
    return sum(len(message_ids) for message_ids in sent.values())


def outgoing_of(row: MessageLog, queue: conf.Queue, *, resent: bool) -> Outgoing:
    """The message of ``row``: its task, arguments, call options, expiry and attempt."""
    task_message = message.TaskMessage(
        task=row.task, args=row.positionals, kwargs=row.keywords, message_id=row.uuid,
        priority=row.priority, tracked=None if queue.tracked else True, resent=resent,
        attempt=lifecycle.last_attempt(row.errors) + 1,
        options=row.options or {},
        expires_at=row.expires_at)
    body, properties = message.encode(task_message, (row.task_args or '[]', row.content or '{}'))
    return Outgoing(body, properties, row.routing_key or queue.name, row.exchange or '', queue)
