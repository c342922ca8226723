"""Every change of a task's status, in one place.

PUBLISHED when published, IN_PROGRESS when a worker starts it, then COMPLETED or FAILED.
The worker calls the batch functions from one recorder greenlet, so a hundred tasks
finishing together cost a few statements, not a few hundred.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connections, router, transaction
from django.db.models import F
from django.utils import timezone

from carrot.models import MessageLog


def database() -> str:
    """The database alias MessageLog rows are written to."""
    return router.db_for_write(MessageLog)


MESSAGE_ID_LENGTH = 200  # MessageLog.uuid's max_length

PUBLISHED_COLUMNS = ('status', 'uuid', 'task', 'task_args', 'content', 'queue', 'exchange',
                     'routing_key', 'priority', 'publish_time', 'attempts')


def record_published(
    *, message_id: str, task: str, args_json: str, kwargs_json: str, queue: str,
    exchange: str, routing_key: str, priority: int,
) -> MessageLog:
    """The new PUBLISHED row of a message about to be sent.

    Written with one prepared INSERT rather than ``objects.create()``: on the publishing hot
    path the ORM's query compilation cost more than the database round trip. (So no
    ``pre_save``/``post_save`` signals are sent for MessageLog rows.)
    """
    alias = database()
    connection = connections[alias]
    values: list[Any] = [MessageLog.PUBLISHED, message_id, task, args_json, kwargs_json, queue,
                         exchange, routing_key, priority, timezone.now(), 0]
    prepared = list(values)
    prepared[9] = MessageLog._meta.get_field('publish_time').get_db_prep_value(
        values[9], connection)
    with connection.cursor() as cursor:
        if connection.features.can_return_columns_from_insert:
            cursor.execute(_insert_sql(alias) + f' RETURNING {connection.ops.quote_name("id")}',
                           prepared)
            pk = cursor.fetchone()[0]
        else:
            cursor.execute(_insert_sql(alias), prepared)
            pk = cursor.lastrowid
    log = MessageLog(pk=pk, **dict(zip(PUBLISHED_COLUMNS, values, strict=True)))
    log._state.adding = False
    log._state.db = alias
    return log


@functools.cache
def _insert_sql(alias: str) -> str:
    ops = connections[alias].ops
    columns = ', '.join(ops.quote_name(c) for c in PUBLISHED_COLUMNS)
    placeholders = ', '.join(['%s'] * len(PUBLISHED_COLUMNS))
    return (f'INSERT INTO {ops.quote_name(MessageLog._meta.db_table)} ({columns}) '
            f'VALUES ({placeholders})')


def discard_unpublished(log: MessageLog) -> None:
    """Remove the row of a message that never reached the broker."""
    MessageLog.objects.filter(pk=log.pk, status=MessageLog.PUBLISHED).delete()


def mark_publish_failed(log: MessageLog, error: BaseException) -> None:
    """A row committed with its transaction whose message then could not be sent."""
    MessageLog.objects.filter(pk=log.pk, status=MessageLog.PUBLISHED).update(
        status=MessageLog.FAILED, failure_time=timezone.now(),
        exception=f'Not published: {error}',
    )


@dataclass(frozen=True)
class Start:
    """A delivered message about to run."""

    message_id: str
    task: str
    args_json: str
    kwargs_json: str
    queue: str
    exchange: str
    routing_key: str
    priority: int


@dataclass(frozen=True)
class Started:
    """The row a started message runs under; ``already_completed`` means: do not run again."""

    pk: int
    already_completed: bool


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


def start_many(starts: Sequence[Start]) -> list[Started]:
    """Mark the rows IN_PROGRESS, creating those a foreign producer never wrote.

    A redelivered message whose row already says COMPLETED finished before its ack was
    lost; it is reported as ``already_completed`` and left as it is.
    """
    alias = database()
    with transaction.atomic(using=alias):
        ids = [s.message_id for s in starts]
        rows = {
            uuid: (pk, status)
            for pk, uuid, status in MessageLog.objects.using(alias)
            .filter(uuid__in=ids).values_list('pk', 'uuid', 'status')
        }
        missing = [s for s in starts if s.message_id not in rows]
        if missing:
            now = timezone.now()
            created = MessageLog.objects.using(alias).bulk_create([
                MessageLog(
                    status=MessageLog.PUBLISHED, uuid=s.message_id, task=_short(s.task),
                    task_args=s.args_json, content=s.kwargs_json, queue=_short(s.queue),
                    exchange=_short(s.exchange), routing_key=_short(s.routing_key),
                    priority=s.priority, publish_time=now,
                ) for s in _unique(missing)
            ])
            if any(row.pk is None for row in created):
                created = list(MessageLog.objects.using(alias).filter(
                    uuid__in=[s.message_id for s in missing]))
            rows.update({row.uuid: (row.pk, row.status) for row in created})
        to_start = [pk for pk, status in rows.values() if status != MessageLog.COMPLETED]
        if to_start:
            MessageLog.objects.using(alias).filter(pk__in=to_start).update(
                status=MessageLog.IN_PROGRESS, attempts=F('attempts') + 1,
            )
    return [
        Started(pk=rows[s.message_id][0],
                already_completed=rows[s.message_id][1] == MessageLog.COMPLETED)
        for s in starts
    ]


def _short(text: str) -> str:
    """A name cut to the 200 characters its column holds (a foreign producer's may be longer)."""
    return clean(text)[:200]


def clean(text: str) -> str:
    """Text without NUL characters, which PostgreSQL refuses in a text column."""
    return text.replace('\x00', '') if '\x00' in text else text


def _clean_optional(text: str | None) -> str | None:
    return None if text is None else clean(text)


def _unique(starts: Sequence[Start]) -> list[Start]:
    seen: dict[str, Start] = {}
    for start in starts:
        seen.setdefault(start.message_id, start)
    return list(seen.values())


def finish_many(finishes: Sequence[Finish]) -> None:
    """Write the end of each task: status, output, log, exception, time."""
    alias = database()
    connection = connections[alias]
    table = connection.ops.quote_name(MessageLog._meta.db_table)
    now = timezone.now()
    parameters = []
    for f in finishes:
        at = f.at or now
        completed = f.status == MessageLog.COMPLETED
        parameters.append((
            f.status, _clean_optional(f.output), clean(f.log), _clean_optional(f.exception),
            _clean_optional(f.traceback),
            at if completed else None, None if completed else at, f.pk,
        ))
    # One prepared statement for the whole batch: the ORM's bulk_update would build a
    # CASE expression per row and field.
    placeholders = ', '.join(
        f'{connection.ops.quote_name(c)} = %s'
        for c in ('status', 'output', 'log', 'exception', 'traceback', 'completion_time',
                  'failure_time')
    )
    sql = f'UPDATE {table} SET {placeholders} WHERE {connection.ops.quote_name("id")} = %s'
    field = MessageLog._meta.get_field('completion_time')
    adapted = [
        (*p[:5], field.get_db_prep_value(p[5], connection),
         field.get_db_prep_value(p[6], connection), p[7])
        for p in parameters
    ]
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        cursor.executemany(sql, adapted)


def record_refused(
    *, message_id: str | None, task: str, reason: str, queue: str, args_json: str = '[]',
    kwargs_json: str = '{}',
) -> MessageLog | None:
    """FAILED with ``reason`` for a message that will not run; None without a message id."""
    if not message_id or len(message_id) > MESSAGE_ID_LENGTH:
        return None
    now = timezone.now()
    log, created = MessageLog.objects.get_or_create(
        uuid=message_id,
        defaults=dict(
            status=MessageLog.FAILED, task=_short(task), task_args=args_json,
            content=kwargs_json, queue=_short(queue), exchange='', routing_key=_short(queue),
            publish_time=now, failure_time=now, exception=clean(reason),
        ),
    )
    if not created:
        log.status = MessageLog.FAILED
        log.failure_time = now
        log.exception = clean(reason)
        log.save(update_fields=['status', 'failure_time', 'exception'])
    return log


def output_text(value: object) -> str | None:
    """A task's return value as stored: JSON where it can be, else its text."""
    if value is None:
        return None
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
