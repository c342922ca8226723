"""Every change of a task's status, each by a function of its own name.

==============  ==========================================================================
PUBLISHED       ``record_published``: the row of a message about to be sent, awaiting its
                confirm until ``mark_confirmed`` (``record_published_together`` writes
                the rows ``publish_together`` kept; ``discard_unpublished`` removes it
                when the message never left;
                ``unsaved_published`` is the row an untracked message does not write);
                ``release_due``: a DELAYED row whose time has come, about to be sent;
                ``mark_requeued``: a FAILED row whose dead letter is sent back
DELAYED         ``record_delayed``: a task published with a countdown or an eta;
                ``finish_many`` with the end ``retrying()`` builds: a failed attempt
                that runs again at ``run_after``
IN_PROGRESS     ``start_many``: a worker starts the tasks
COMPLETED       ``finish_many`` with the end ``completed()`` builds: the task returned
FAILED          ``finish_many`` with the end ``failed()`` builds: the task raised, or
                expired before it ran;
                ``record_refused``: the message cannot run; ``mark_publish_failed`` and
                ``mark_not_sent``: its message could not be sent after its transaction
                committed (an untracked message's row is written then, FAILED)
==============  ==========================================================================

The worker calls the batch functions from one recorder greenlet, so a hundred tasks
finishing together cost a few statements, not a few hundred; the statements themselves are
in ``carrot._sql``.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone

from carrot import _sql, message
from carrot._group_insert import GroupInsert, group_insert
from carrot._process import worker_id
from carrot._text import clean, fit
from carrot.models import MessageLog, Status


def database() -> str:
    """The database alias MessageLog rows are written to."""
    return router.db_for_write(MessageLog)


def record_published(
    *, message_id: str, task: str, args_json: str, kwargs_json: str, queue: str,
    exchange: str, routing_key: str, priority: int,
    options: dict[str, Any] | None = None, expires_at: datetime.datetime | None = None,
) -> MessageLog:
    """The new PUBLISHED row of a message about to be sent, awaiting its confirm.

    Written with prepared SQL rather than ``objects.create()`` (on the publishing hot path
    the ORM's query compilation cost more than the round trip, and no ``pre_save`` or
    ``post_save`` signals are sent for these rows). In autocommit mode outside a
    transaction, rows that concurrent publishers write at the same moment share one INSERT
    and one commit. A row with the call's own ``options`` or an expiry goes by the ORM.
    """
    alias = database()
    if options or expires_at is not None:
        return _created(Status.PUBLISHED, message_id=message_id, task=task,
                        args_json=args_json, kwargs_json=kwargs_json, queue=queue,
                        exchange=exchange, routing_key=routing_key, priority=priority,
                        awaiting_confirm=True, options=options or None, expires_at=expires_at)
    values = published_values(message_id=message_id, task=task, args_json=args_json,
                              kwargs_json=kwargs_json, queue=queue, exchange=exchange,
                              routing_key=routing_key, priority=priority)
    connection = transaction.get_connection(alias)
    if connection.in_atomic_block or not connection.get_autocommit():
        # Part of the caller's transaction (atomic, or autocommit turned off): grouped, its
        # row would be committed by another thread, or another thread's kept in it.
        [pk] = _sql.insert_rows(alias, [values])
    else:
        pk = group_insert.insert(alias, values)
    return _sql.loaded_row(alias, pk, values)


def published_values(*, message_id: str, task: str, args_json: str, kwargs_json: str,
                     queue: str, exchange: str, routing_key: str, priority: int) -> list[Any]:
    """The columns (``carrot._sql.PUBLISHED_COLUMNS``) of a new PUBLISHED row awaiting its
    confirm, one with no call options and no expiry."""
    return [Status.PUBLISHED, message_id, task, args_json, kwargs_json, queue, exchange,
            routing_key, priority, timezone.now(), 0, True]


def record_published_together(alias: str, rows: Sequence[list[Any]]) -> list[int]:
    """Write the PUBLISHED rows of ``published_values`` at once, in the transaction open on
    ``alias``; their primary keys, in order.

    As many rows a statement as the database takes parameters for (500 at most), and all
    of them or none: a savepoint holds them when they take more than one statement.
    """
    limit = connections[alias].features.max_query_params
    size = max(1, min(GroupInsert.BATCH,
                      (limit or 2 ** 16) // len(_sql.PUBLISHED_COLUMNS)))
    if len(rows) <= size:
        return _sql.insert_rows(alias, list(rows))
    pks: list[int] = []
    with transaction.atomic(using=alias):
        for start in range(0, len(rows), size):
            pks.extend(_sql.insert_rows(alias, list(rows[start:start + size])))
    return pks


def unsaved_published(
    *, message_id: str, task: str, args_json: str, kwargs_json: str, queue: str,
    exchange: str, routing_key: str, priority: int,
) -> MessageLog:
    """The PUBLISHED row of an untracked message, not written: it gets one only if its
    task fails, or its message cannot be sent."""
    return MessageLog(status=Status.PUBLISHED, uuid=message_id, task=task, task_args=args_json,
                      content=kwargs_json, queue=queue, exchange=exchange,
                      routing_key=routing_key, priority=priority, publish_time=timezone.now())


def record_delayed(
    *, message_id: str, task: str, args_json: str, kwargs_json: str, queue: str,
    exchange: str, routing_key: str, priority: int, run_after: datetime.datetime,
    options: dict[str, Any] | None = None, expires_at: datetime.datetime | None = None,
) -> MessageLog:
    """The DELAYED row of a task that waits until ``run_after``; nothing is sent until then."""
    return _created(Status.DELAYED, message_id=message_id, task=task, args_json=args_json,
                    kwargs_json=kwargs_json, queue=queue, exchange=exchange,
                    routing_key=routing_key, priority=priority, run_after=run_after,
                    options=options or None, expires_at=expires_at)


def _created(status: str, *, message_id: str, task: str, args_json: str, kwargs_json: str,
             **columns: Any) -> MessageLog:
    """A new row written by the ORM (rows with columns the prepared INSERT leaves out)."""
    return MessageLog.objects.using(database()).create(
        status=status, uuid=message_id, task=task, task_args=args_json, content=kwargs_json,
        publish_time=timezone.now(), **columns)


def release_due(queues: Sequence[str], limit: int,
                now: datetime.datetime | None = None) -> list[MessageLog]:
    """PUBLISHED, and awaiting their confirm, for the DELAYED rows of ``queues`` whose
    ``run_after`` has come, the first due first; committed before their messages are sent,
    so a service that dies before the confirms leaves them to the resender.

    Claimed with ``SKIP LOCKED`` where the database can, so two services release a row once.
    """
    alias = database()
    skip_locked = connections[alias].features.has_select_for_update_skip_locked
    now = now or timezone.now()
    due = MessageLog.objects.using(alias).filter(status=Status.DELAYED, run_after__lte=now,
                                                 queue__in=list(queues))
    if not due.exists():
        return []  # the usual answer, in one statement instead of a locking transaction
    with transaction.atomic(using=alias):
        rows = list(due.select_for_update(skip_locked=skip_locked).order_by('run_after')[:limit])
        if rows:
            # run_after becomes when it was sent: the resender counts from there, so a row
            # released late is not sent again at once.
            MessageLog.objects.using(alias).filter(
                pk__in=[row.pk for row in rows], status=Status.DELAYED,
            ).update(status=Status.PUBLISHED, awaiting_confirm=True, run_after=now)
    for row in rows:
        row.status, row.awaiting_confirm, row.run_after = Status.PUBLISHED, True, now
    return rows


def discard_unpublished(log: MessageLog) -> None:
    """Remove the row of a message that never reached the broker."""
    MessageLog.objects.filter(pk=log.pk, status=Status.PUBLISHED).delete()


def mark_confirmed(alias: str, message_ids: Sequence[str], *,
                   released_at: datetime.datetime | None) -> None:
    """RabbitMQ has stored these rows' messages: they no longer await their confirm.

    ``released_at``: the ``run_after`` the rows had when their messages were sent, None for
    the first send of a row published to run at once. A confirm that comes late, after the
    row ran, failed and was released for its retry, then leaves the retry's message awaiting
    its own confirm (and so sent again if that one is lost).
    """
    MessageLog.objects.using(alias).filter(
        uuid__in=message_ids, awaiting_confirm=True, run_after=released_at,
    ).update(awaiting_confirm=False)


def mark_publish_failed(log: MessageLog, error: BaseException) -> None:
    """A row committed with its transaction whose message then could not be sent.

    ``error`` that is not an Exception interrupted the send: the message may have gone.
    """
    if isinstance(error, Exception):
        reason = f'Not published: {error}'
    else:
        detail = f' ({error})' if str(error) else ''
        reason = (f'Not published, or not confirmed: the publish was interrupted by '
                  f'{type(error).__name__}{detail}, so RabbitMQ may or may not have it.')
    mark_not_sent([log], reason)


def mark_requeued(alias: str, message_ids: Sequence[str],
                  statuses: Sequence[str] = (Status.FAILED,)) -> list[str]:
    """PUBLISHED again, their failure cleared, for the FAILED rows of messages about to be
    sent again (from the monitor or the dead-letter queue); the message ids of the rows that
    moved. Their attempts count from 1 again: a row that retried keeps its ``errors``, closed
    by a ``requeued_at`` entry. ``statuses`` adds the monitor's orphaned (IN_PROGRESS) and
    stuck (PUBLISHED) rows, which it has checked."""
    now = timezone.now()
    rows = MessageLog.objects.using(alias).filter(uuid__in=message_ids, status__in=statuses)
    with transaction.atomic(using=alias):
        retried = list(rows.filter(errors__isnull=False).select_for_update()
                       .values_list('pk', 'errors'))
        moved = list(rows.values_list('uuid', flat=True))
        rows.update(status=Status.PUBLISHED, publish_time=now, failure_time=None,
                    completion_time=None, exception=None, traceback=None, output=None,
                    log=None, run_after=None)
        for pk, errors in retried:
            if isinstance(errors, list) and errors:
                MessageLog.objects.using(alias).filter(pk=pk).update(
                    errors=[*errors, {'requeued_at': now.isoformat()}])
    return moved


def mark_purged(alias: str, message_ids: Sequence[str], reason: str) -> list[str]:
    """FAILED with ``reason`` for the PUBLISHED rows of messages about to be purged from
    their queue (they will not run unless requeued); the message ids of the rows moved."""
    rows = MessageLog.objects.using(alias).filter(uuid__in=message_ids, status=Status.PUBLISHED)
    moved = list(rows.select_for_update().values_list('uuid', flat=True))
    MessageLog.objects.using(alias).filter(uuid__in=moved, status=Status.PUBLISHED).update(
        status=Status.FAILED, failure_time=timezone.now(), exception=reason,
        awaiting_confirm=False)
    return moved


def unmark_purged(alias: str, message_ids: Sequence[str], reason: str) -> None:
    """PUBLISHED again for rows :func:`mark_purged` moved whose messages stayed in the queue
    after all (the acknowledgement failed)."""
    MessageLog.objects.using(alias).filter(
        uuid__in=message_ids, status=Status.FAILED, exception=reason,
    ).update(status=Status.PUBLISHED, failure_time=None, exception=None)


def mark_not_sent(logs: Sequence[MessageLog], reason: str) -> None:
    """FAILED with ``reason`` for the rows of messages that were not (surely) sent.

    A row that moved on from PUBLISHED is left as it is; an untracked message's unsaved row
    is written, FAILED, so the task that never ran is seen.
    """
    now = timezone.now()
    saved = [log for log in logs if log.pk is not None]
    if saved:
        MessageLog.objects.using(saved[0]._state.db or database()).filter(
            pk__in=[log.pk for log in saved], uuid__in=[log.uuid for log in saved],
            status=Status.PUBLISHED,
        ).update(status=Status.FAILED, failure_time=now, exception=reason, awaiting_confirm=False)
    unsaved = [log for log in logs if log.pk is None]
    for log in unsaved:
        log.status, log.failure_time, log.exception = Status.FAILED, now, reason
    if unsaved:
        MessageLog.objects.using(database()).bulk_create(unsaved)


@dataclass(frozen=True)
class Start:
    """A delivered message about to run."""

    message_id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str
    exchange: str
    routing_key: str
    priority: int
    #: A copy sent again because its first send was not confirmed: it runs only if no other
    #: copy has started the task.
    resent: bool = False
    #: Its attempt (``x-carrot-attempt``); a redelivered or re-sent one whose row has
    #: recorded this attempt's end, or waits for its retry, is superseded.
    attempt: int = 1
    #: RabbitMQ redelivered it.
    redelivered: bool = False
    #: The call's task options and expiry, kept by the row a foreign or untracked message
    #: gets (so that its retries keep them).
    options: dict[str, Any] | None = None
    expires_at: datetime.datetime | None = None
    #: When the worker started it (its row's ``start_time``).
    at: datetime.datetime = field(default_factory=timezone.now)


@dataclass(frozen=True)
class Started:
    """The row a started message runs under, and whether the message must not run."""

    pk: int
    #: The row says COMPLETED: the task ran before (a redelivery whose ack was lost).
    already_completed: bool
    #: A re-sent copy of a task another copy started: the row is left to that one.
    started_elsewhere: bool = False
    #: A redelivered attempt whose end is recorded already (its acknowledgement was lost),
    #: or a re-sent copy of one: the row waits for, or runs, the next attempt, and is left
    #: to it.
    superseded: bool = False


@dataclass(frozen=True)
class Finish:
    """How a task ended (``pk`` is its row's, once the start is recorded)."""

    message_id: str
    status: str
    output: str | None = None
    log: str = ''
    exception: str | None = None
    traceback: str | None = None
    at: datetime.datetime | None = None
    pk: int = 0
    #: Set when the task ended before its start was recorded: both are written at once.
    start: Start | None = None
    #: The attempt of a task that retries: its error joins the row's ``errors``.
    attempt: int | None = None
    #: When a retry (status DELAYED) runs.
    run_after: datetime.datetime | None = None


def completed(message_id: str, *, output: str | None, log: str,
              at: datetime.datetime | None = None) -> Finish:
    """The end of a task that returned ``output``: ``finish_many`` makes its row COMPLETED."""
    return Finish(message_id=message_id, status=Status.COMPLETED, output=output, log=log, at=at)


def failed(message_id: str, *, exception: str, traceback: str | None, log: str,
           at: datetime.datetime | None = None, attempt: int | None = None) -> Finish:
    """The end of a task that raised: ``finish_many`` makes its row FAILED.

    ``attempt``, for a task that retries: its error joins the others in ``errors``.
    """
    return Finish(message_id=message_id, status=Status.FAILED, exception=exception,
                  traceback=traceback, log=log, at=at, attempt=attempt)


def retrying(message_id: str, *, exception: str, traceback: str | None, log: str,
             attempt: int, run_after: datetime.datetime,
             at: datetime.datetime | None = None) -> Finish:
    """The end of a failed attempt that runs again: ``finish_many`` makes its row DELAYED
    until ``run_after``, its error added to ``errors``."""
    return Finish(message_id=message_id, status=Status.DELAYED, exception=exception,
                  traceback=traceback, log=log, at=at, attempt=attempt, run_after=run_after)


def start_many(starts: Sequence[Start]) -> list[Started]:
    """Mark the rows IN_PROGRESS, creating those a foreign producer never wrote.

    A redelivered message whose row already says COMPLETED finished before its ack was
    lost; it is reported as ``already_completed`` and left as it is. A re-sent copy starts
    only a row still PUBLISHED; one whose task another copy started (in this batch too) is
    reported as ``started_elsewhere`` and leaves the row as it is. A redelivered message or
    a re-sent copy of an attempt whose end is recorded is reported as ``superseded``.
    """
    alias = database()
    connection = connections[alias]
    with transaction.atomic(using=alias):
        superseded = _superseded(alias, [s for s in starts if s.redelivered or s.resent])
        live = [s for s in starts if (s.message_id, s.attempt) not in superseded]
        plain = [s for s in live if not s.resent]
        resent = [s for s in live if s.resent]
        rows: dict[str, tuple[int, str]] = {}
        if plain and _sql.psycopg_of(connection) is not None:
            rows = _sql.start_by_message_id(connection, plain)
        # Rows not started above: none yet (a foreign producer's), or COMPLETED already.
        left = [s for s in plain if s.message_id not in rows]
        if left:
            found = _sql.rows_of(alias, left)
            _mark_started(connection, left, {message_id: pk for message_id, (pk, status)
                                             in found.items() if status != Status.COMPLETED})
            rows.update(found)
        if resent:
            found = _sql.rows_of(alias, resent)
            _mark_started(connection, resent, {
                message_id: pk for message_id, (pk, status) in found.items()
                if status == Status.PUBLISHED and message_id not in rows})
            for message_id, row in found.items():
                rows.setdefault(message_id, row)
    taken = {s.message_id for s in plain}
    started = []
    for s in starts:
        if (s.message_id, s.attempt) in superseded:
            started.append(Started(pk=superseded[s.message_id, s.attempt],
                                   already_completed=False, superseded=True))
            continue
        pk, status = rows[s.message_id]
        elsewhere = False
        if s.resent:
            elsewhere = status not in (Status.PUBLISHED, Status.COMPLETED) or s.message_id in taken
            taken.add(s.message_id)
        started.append(Started(pk=pk, already_completed=status == Status.COMPLETED,
                               started_elsewhere=elsewhere))
    return started


def _superseded(alias: str, starts: Sequence[Start]) -> dict[tuple[str, int], int]:
    """``{(message id, attempt): pk}`` of the ``starts`` whose attempt has ended already:
    the row waits for its retry (DELAYED), or its errors hold this attempt or a later one.

    Asked for redelivered messages, whose ack may have been lost after their end was
    written, and for re-sent copies, which may arrive after the row was released for its
    next attempt: either would run a task whose next attempt runs too.
    """
    if not starts:
        return {}
    ended = {uuid: (pk, status, errors) for pk, uuid, status, errors in
             MessageLog.objects.using(alias).filter(
                 uuid__in=list({s.message_id for s in starts}),
             ).exclude(status=Status.COMPLETED).values_list('pk', 'uuid', 'status', 'errors')}
    found = {}
    for s in starts:
        if s.message_id in ended:
            pk, status, errors = ended[s.message_id]
            if status == Status.DELAYED or last_attempt(errors) >= s.attempt:
                found[s.message_id, s.attempt] = pk
    return found


def last_attempt(errors: object) -> int:
    """The number of the last failed attempt in a row's ``errors``; 0 when there is none, or
    when a requeue (its ``requeued_at`` entry) came after it."""
    if not isinstance(errors, list) or not errors or not isinstance(errors[-1], dict):
        return 0
    attempt = errors[-1].get('attempt')
    return attempt if isinstance(attempt, int) and attempt > 0 else 0


def _mark_started(connection: BaseDatabaseWrapper, starts: Sequence[Start],
                  pk_of: dict[str, int]) -> None:
    """Start the rows ``pk_of`` (by message id), each at its first start's own time."""
    if pk_of:
        first = {s.message_id: s for s in reversed(starts)}
        _sql.start_by_pk(connection, [(pk, first[message_id].at)
                                      for message_id, pk in pk_of.items()])


def finish_many(finishes: Sequence[Finish]) -> dict[str, Started]:
    """Write the end of each task: status, output, log, exception, time.

    A Finish with ``start`` set ended before its start was written (a short task): its
    start is recorded by the same UPDATE, and its Started is in the returned mapping, by
    message id. On PostgreSQL one statement writes the batch; elsewhere one per task.
    """
    alias = database()
    connection = connections[alias]
    rows: dict[str, tuple[int, str]] = {}
    # Attempts of tasks that retry are rare, and add to a list: written one by one.
    with_errors = [f for f in finishes if f.attempt is not None]
    if with_errors:
        with transaction.atomic(using=alias):
            rows.update(_finish_attempts(alias, with_errors))
        finishes = [f for f in finishes if f.attempt is None]
        if not finishes:
            return _started_of(with_errors, rows)
    left = list(finishes)
    if _sql.psycopg_of(connection) is not None:
        # One statement, atomic by itself, so no transaction around it: a round of ends
        # costs one round trip to PostgreSQL instead of three (BEGIN, UPDATE, COMMIT).
        # When what is left fails below, the recorder writes the whole batch again: the
        # same values, and no attempt counted twice.
        found, left = _sql.finish_by_message_id(connection, finishes)
        for message_id, row in found.items():
            rows.setdefault(message_id, row)  # beside the retried attempts' rows above
    if left:
        with transaction.atomic(using=alias):
            for message_id, row in _sql.finish_by_pk(connection, left).items():
                rows.setdefault(message_id, row)  # the status before the batch
    return _started_of([*with_errors, *finishes], rows)


def _started_of(finishes: Sequence[Finish], rows: dict[str, tuple[int, str]],
                ) -> dict[str, Started]:
    return {f.start.message_id: Started(pk=rows[f.start.message_id][0],
                                        already_completed=rows[f.start.message_id][1]
                                        == Status.COMPLETED)
            for f in finishes if f.start is not None}


def _finish_attempts(alias: str, finishes: Sequence[Finish]) -> dict[str, tuple[int, str]]:
    """Write ends that add their attempt's error to the row's ``errors``, one by one.

    ``{message id: (pk, status before)}`` of those that record their start too. A row that
    says COMPLETED is left as it is (a redelivery of a task that ran), and so is one that
    holds this attempt's end already.
    """
    starting = [f.start for f in finishes if f.start is not None]
    created = _sql.rows_of(alias, starting) if starting else {}
    now = timezone.now()
    for finish in finishes:
        pk = created[finish.start.message_id][0] if finish.start is not None else finish.pk
        row = MessageLog.objects.using(alias).select_for_update().filter(pk=pk).first()
        if row is None or row.status == Status.COMPLETED:
            continue  # deleted meanwhile, or a redelivery of a task that ran
        if (row.status == finish.status and row.errors
                and row.errors[-1].get('attempt') == finish.attempt):
            continue  # written already: the recorder writes a failed batch again
        at = finish.at or now
        exception, traceback = clean(finish.exception or ''), clean(finish.traceback or '')
        if finish.start is not None:
            row.attempts += 1
            row.start_time = finish.start.at
        started = row.start_time
        row.errors = [*(row.errors or []), {
            'attempt': finish.attempt, 'exception': exception, 'traceback': traceback,
            'log': clean(finish.log), 'at': at.isoformat(), 'worker': worker_id(),
            'started_at': started.isoformat() if started is not None else None}]
        row.status, row.run_after, row.failure_time = finish.status, finish.run_after, at
        row.exception, row.traceback, row.log = exception, traceback, clean(finish.log)
        row.worker = worker_id()
        row.awaiting_confirm = False  # delivered: see carrot._sql's _delivered
        row.save(update_fields=['errors', 'status', 'run_after', 'exception', 'traceback', 'log',
                                'failure_time', 'attempts', 'start_time', 'worker',
                                'awaiting_confirm'])
    return created


def record_refused(
    *, message_id: str | None, task: str, reason: str, queue: str,
) -> MessageLog | None:
    """FAILED with ``reason`` for a message that will not run.

    None, and no row written, without a message id or when its row says COMPLETED.
    """
    if not message_id or len(message_id) > message.MAX_MESSAGE_ID:
        return None
    now = timezone.now()
    log, created = MessageLog.objects.get_or_create(
        uuid=message_id,
        defaults=dict(
            status=Status.FAILED, task=fit(task, 'task'), task_args='[]',
            content='{}', queue=fit(queue, 'queue'), exchange='',
            routing_key=fit(queue, 'routing_key'),
            publish_time=now, failure_time=now, exception=clean(reason),
        ),
    )
    if not created:
        # Not over COMPLETED, even one another worker commits meanwhile: the message ran
        # before this redelivery, and the row stays as it ended.
        failed = dict(status=Status.FAILED, failure_time=now, exception=clean(reason),
                      awaiting_confirm=False)  # delivered: see carrot._sql's _delivered
        if not MessageLog.objects.filter(pk=log.pk).exclude(
                status=Status.COMPLETED).update(**failed):
            return None
        for name, value in failed.items():
            setattr(log, name, value)
    return log


def output_text(value: object) -> str | None:
    """A task's return value as stored: JSON where it can be, else its text.

    Never raises: the task has run, and a value that cannot be shown must not turn it FAILED.
    """
    if value is None:
        return None
    try:
        return json.dumps(value)
    except Exception:  # not JSON, circular, too deep, or a container that fails
        pass
    try:
        return str(value)
    except Exception as error:
        return (f'(a {type(value).__name__} that cannot be shown: '
                f'{type(error).__name__}: {error})')
