"""Many tasks published together: their rows written a few hundred to a statement, their
messages sent in one pipelined run when the transaction commits.

Inside ``with publish_together():``, ``publish_message`` of a tracked task to its queue
keeps its PUBLISHED row in memory instead of writing it at once; the kept rows are written
when the block ends, in the block's transaction, and their messages are sent when that
transaction commits, as every message published inside ``transaction.atomic()`` is. Outside
a transaction the block is a transaction of its own: once it has ended, the rows are
committed and RabbitMQ has confirmed every message.

What is not kept is written at once, as without the block, after the rows kept before it (so
rows and messages keep the order of the calls): a delayed task, an untracked one, one with
its own options or an expiry, one to another exchange or routing key. A call inside a
savepoint opened in the block (a nested ``atomic()``) is not kept either, and is written at
once, leaving the kept rows kept: its savepoint's rollback must take its row and message, and
only those, away. So its message goes before those of the rows the block kept. A block that
raises writes and sends none of its kept rows. Until the block ends, a kept row has no
primary key and no query can see it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from carrot import _sql, lifecycle, oncommit
from carrot.models import MessageLog

__all__ = ['publish_together']


@dataclass(eq=False)
class _Kept:
    message: oncommit.Sendable
    values: list[Any]
    log: MessageLog


@dataclass(eq=False)
class Together:
    """The rows a ``publish_together`` block keeps on one database connection."""

    alias: str
    #: The savepoints open when the block began: a call inside another is not kept.
    savepoints: list[str]
    kept: list[_Kept] = field(default_factory=list)

    def takes(self, connection: BaseDatabaseWrapper) -> bool:
        """Whether a row published now on ``connection`` may be kept."""
        return connection.in_atomic_block and connection.savepoint_ids == self.savepoints

    def keep(self, message: oncommit.Sendable, values: list[Any]) -> MessageLog:
        """Keep the row of ``message`` (``lifecycle.published_values``) until the block ends;
        its MessageLog, without a primary key until then."""
        log = _sql.loaded_row(self.alias, None, values)
        self.kept.append(_Kept(message, values, log))
        return log

    def write(self) -> None:
        """Write the kept rows, and have their messages sent when the transaction commits."""
        kept, self.kept = self.kept, []
        if not kept:
            return
        pks = lifecycle.record_published_together(self.alias, [k.values for k in kept])
        for one, pk in zip(kept, pks, strict=True):
            one.log.pk = pk
        oncommit.send_all_on_commit([(one.message, one.log) for one in kept], self.alias)


# Per connection (so per thread, or per greenlet under gevent): the block open on it.
_open: weakref.WeakKeyDictionary[BaseDatabaseWrapper, Together] = weakref.WeakKeyDictionary()


def open_on(connection: BaseDatabaseWrapper) -> Together | None:
    """The ``publish_together`` block open on ``connection``, if any."""
    return _open.get(connection)


@contextmanager
def publish_together() -> Iterator[None]:
    """Publish the tasks of the block together: ``publish_message`` keeps the row of a
    tracked task sent to its queue (no options of its own, no expiry), and the kept rows are
    written when the block ends, a few hundred to a statement, in the block's transaction.
    Their messages are sent when that transaction commits, in one pipelined run.

    Outside a transaction the block is a transaction of its own. Other calls, and calls
    inside a savepoint opened in the block, are written at once. A block inside another is
    part of the outer one. Raises TransactionManagementError, as ``publish_message`` does,
    when autocommit is off outside ``transaction.atomic()``.
    """
    alias = lifecycle.database()
    connection = transaction.get_connection(alias)
    if connection in _open:
        yield
        return
    with ExitStack() as stack:
        if not connection.in_atomic_block:
            if not connection.get_autocommit():
                raise transaction.TransactionManagementError(
                    f'publish_together cannot be used with autocommit turned off outside '
                    f'transaction.atomic() (database {alias!r}): carrot sends the messages '
                    f'once their rows are committed, and cannot see when such a transaction '
                    f'commits. Use it inside transaction.atomic(), or with autocommit on.')
            stack.enter_context(transaction.atomic(using=alias))
        together = Together(alias, list(connection.savepoint_ids))
        _open[connection] = together
        try:
            yield
        finally:
            del _open[connection]
        together.write()
