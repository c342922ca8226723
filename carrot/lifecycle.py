"""Every change of a task's status, in one place.

PUBLISHED when published, IN_PROGRESS when a worker starts it, then COMPLETED or FAILED.
The worker calls the batch functions from one recorder greenlet, so a hundred tasks
finishing together cost a few statements, not a few hundred.
"""

from __future__ import annotations

import datetime
import functools
import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.db import connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import F, Field
from django.utils import timezone

from carrot.models import MessageLog

try:
    import psycopg
except ImportError:  # another database driver
    psycopg = None  # type: ignore[assignment]


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

    Written with prepared SQL rather than ``objects.create()`` (on the publishing hot path
    the ORM's query compilation cost more than the round trip, and no ``pre_save`` or
    ``post_save`` signals are sent for these rows). In autocommit mode outside a
    transaction, rows that concurrent publishers write at the same moment share one INSERT
    and one commit.
    """
    alias = database()
    values: list[Any] = [MessageLog.PUBLISHED, message_id, task, args_json, kwargs_json, queue,
                         exchange, routing_key, priority, timezone.now(), 0]
    connection = transaction.get_connection(alias)
    if connection.in_atomic_block or not connection.get_autocommit():
        # Part of the caller's transaction (atomic, or autocommit turned off): grouped, its
        # row would be committed by another thread, or another thread's kept in it.
        [pk] = _insert_rows(alias, [values])
    else:
        pk = _group_insert.insert(alias, values)
    return _loaded_row(alias, pk, values)


def _loaded_row(alias: str, pk: int, values: list[Any]) -> MessageLog:
    """The MessageLog instance of a row just inserted with ``values``, as if loaded.

    Built from every column in order (``from_db``), which is several times cheaper than
    ``MessageLog(**kwargs)`` on the publishing hot path.
    """
    fields, names = _concrete_fields()
    given = dict(zip(PUBLISHED_COLUMNS, values, strict=True))
    given[MessageLog._meta.pk.attname] = pk
    # Defaults are taken per row, as Model.__init__ takes them.
    row = [given[f.attname] if f.attname in given else f.get_default() for f in fields]
    return MessageLog.from_db(alias, names, row)


@functools.cache
def _concrete_fields() -> tuple[tuple[Field[Any, Any], ...], list[str]]:
    """MessageLog's columns in order, and their attribute names (looked up once, on first use,
    when the app registry is ready)."""
    fields = tuple(MessageLog._meta.concrete_fields)
    return fields, [f.attname for f in fields]


# Measured here: arrays cost more than a VALUES list for a few rows and less for many
# (0.44 against 0.23 ms of CPU for one row, 2.6 against 2.9 ms for fifty).
UNNEST_FROM_ROWS = 20
# PUBLISHED_COLUMNS' types, in order.
_UNNEST = ('SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], '
           '%s::text[], %s::text[], %s::text[], %s::integer[], %s::timestamptz[], '
           '%s::integer[])')


def _insert_rows(alias: str, rows: list[list[Any]]) -> list[int]:
    """INSERT ``rows`` (in PUBLISHED_COLUMNS order) in one statement; their primary keys."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    time_field = MessageLog._meta.get_field('publish_time')
    prepared = [[*row[:9], time_field.get_db_prep_value(row[9], connection), row[10]]
                for row in rows]
    columns = ', '.join(quote(c) for c in PUBLISHED_COLUMNS)
    sql = f'INSERT INTO {quote(MessageLog._meta.db_table)} ({columns}) '
    returning = f' RETURNING {quote("id")}, {quote("uuid")}'
    if len(rows) >= UNNEST_FROM_ROWS and _psycopg(connection) is not None:
        # One array a column: the same short statement for any number of rows, which
        # psycopg converts once and PostgreSQL prepares once.
        by_column = [list(column) for column in zip(*prepared, strict=True)]
        with _bound_cursor(connection) as cursor:
            cursor.execute(sql + _UNNEST + returning, by_column)
            by_uuid = {uuid: pk for pk, uuid in cursor.fetchall()}
        return [by_uuid[row[1]] for row in rows]
    placeholders = '(' + ', '.join(['%s'] * len(PUBLISHED_COLUMNS)) + ')'
    with _bound_cursor(connection) as cursor:
        if connection.features.can_return_rows_from_bulk_insert:
            cursor.execute(sql + 'VALUES ' + ', '.join([placeholders] * len(rows)) + returning,
                           [value for row in prepared for value in row])
            by_uuid = {uuid: pk for pk, uuid in cursor.fetchall()}
            return [by_uuid[row[1]] for row in rows]
        pks = []
        for row in prepared:  # no multi-row RETURNING here (MySQL): one row at a time
            cursor.execute(sql + 'VALUES ' + placeholders, row)
            pks.append(cursor.lastrowid)
        return pks


def _psycopg(connection: BaseDatabaseWrapper) -> Any:
    """The connection's psycopg 3 connection; None for another driver or database."""
    if psycopg is None or connection.vendor != 'postgresql':
        return None
    connection.ensure_connection()
    raw = connection.connection
    return raw if isinstance(raw, psycopg.Connection) else None


@contextmanager
def _bound_cursor(connection: BaseDatabaseWrapper) -> Iterator[Any]:
    """A cursor that sends parameters apart from the SQL, where the driver can.

    Django's psycopg 3 cursors interpolate every parameter into the SQL text by default
    (``server_side_binding`` off); for a batch of rows that costs more CPU than the round
    trip, and PostgreSQL must parse each text anew. A server-bound psycopg cursor on the
    same connection (same transaction) sends the parameters separately and lets psycopg
    prepare statements it sees repeatedly. Errors are still Django's.
    """
    raw = _psycopg(connection)
    if raw is None:  # psycopg2, SQLite, …
        with connection.cursor() as cursor:
            yield cursor
        return
    with connection.wrap_database_errors, psycopg.Cursor(raw) as cursor:
        yield cursor


@dataclass
class _PendingRow:
    alias: str
    values: list[Any]
    done: threading.Event = field(default_factory=threading.Event)
    pk: int = 0
    error: BaseException | None = None


class _GroupInsert:
    """Group commit for PUBLISHED rows written outside a transaction.

    The first publisher to arrive writes, in one statement, its row and every row that
    arrives while it writes; the others wait for it. With one publisher at a time this is a
    plain INSERT; with many greenlets or threads publishing at once it saves most of the
    database's per-transaction work.
    """

    BATCH = 500  # 11 parameters a row, well under PostgreSQL's 65,535

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[_PendingRow] = []
        self._writing = False

    def insert(self, alias: str, values: list[Any]) -> int:
        row = _PendingRow(alias, values)
        with self._lock:
            self._pending.append(row)
            lead, self._writing = not self._writing, True
        if lead:
            self._write_until_empty()
        row.done.wait()
        if row.error is not None:
            raise row.error
        return row.pk

    def _write_until_empty(self) -> None:
        try:
            while True:
                with self._lock:
                    batch = self._pending[:self.BATCH]
                    del self._pending[:self.BATCH]
                    if not batch:
                        self._writing = False
                        return
                self._write(batch)
        except BaseException as interrupted:  # e.g. the writer's greenlet was killed
            with self._lock:
                left, self._pending, self._writing = self._pending, [], False
            for row in left:
                row.error = interrupted
                row.done.set()
            raise

    def _write(self, batch: list[_PendingRow]) -> None:
        try:
            for alias in {row.alias for row in batch}:
                rows = [row for row in batch if row.alias == alias]
                try:
                    pks = _insert_rows(alias, [r.values for r in rows])
                except Exception as error:
                    if len(rows) == 1:
                        rows[0].error = error
                    else:  # find the bad row: the others must not fail with it
                        for row in rows:
                            self._write([row])
                else:
                    for row, pk in zip(rows, pks, strict=True):
                        row.pk = pk
        except BaseException as error:
            for row in batch:
                if not row.pk and row.error is None:
                    row.error = error
            raise
        finally:
            for row in batch:
                row.done.set()


_group_insert = _GroupInsert()


def discard_unpublished(log: MessageLog) -> None:
    """Remove the row of a message that never reached the broker."""
    MessageLog.objects.filter(pk=log.pk, status=MessageLog.PUBLISHED).delete()


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
    MessageLog.objects.filter(pk=log.pk, status=MessageLog.PUBLISHED).update(
        status=MessageLog.FAILED, failure_time=timezone.now(), exception=reason,
    )


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
    #: Set when the task ended before its start was recorded: both are written at once.
    start: Start | None = None


def start_many(starts: Sequence[Start]) -> list[Started]:
    """Mark the rows IN_PROGRESS, creating those a foreign producer never wrote.

    A redelivered message whose row already says COMPLETED finished before its ack was
    lost; it is reported as ``already_completed`` and left as it is.
    """
    alias = database()
    connection = connections[alias]
    with transaction.atomic(using=alias):
        rows: dict[str, tuple[int, str]] = {}
        if _psycopg(connection) is not None:
            rows = _start_by_message_id(connection, starts)
        # Rows not started above: none yet (a foreign producer's), or COMPLETED already.
        left = [s for s in starts if s.message_id not in rows]
        if left:
            found = _rows_of(alias, left)
            to_start = [pk for pk, status in found.values() if status != MessageLog.COMPLETED]
            if to_start:
                MessageLog.objects.using(alias).filter(pk__in=to_start).update(
                    status=MessageLog.IN_PROGRESS, attempts=F('attempts') + 1,
                )
            rows.update(found)
    return [
        Started(pk=rows[s.message_id][0],
                already_completed=rows[s.message_id][1] == MessageLog.COMPLETED)
        for s in starts
    ]


def _start_by_message_id(connection: BaseDatabaseWrapper,
                         starts: Sequence[Start]) -> dict[str, tuple[int, str]]:
    """PostgreSQL: one UPDATE from an array for the whole batch, rows found by message id.

    ``{message id: (pk, status before)}`` of the rows it started; a COMPLETED row is not
    started, nor is a row that does not exist.
    """
    quote = connection.ops.quote_name
    table = quote(MessageLog._meta.db_table)
    status, attempts, key = quote('status'), quote('attempts'), quote('id')
    # Joining the row to itself as ``old`` gives its status before the update.
    sql = (
        f'UPDATE {table} AS t SET {status} = %s, {attempts} = t.{attempts} + 1 '
        f'FROM unnest(%s::text[]) AS v(uuid), {table} AS old '
        f'WHERE t.{quote("uuid")} = v.uuid AND old.{key} = t.{key} AND t.{status} <> %s '
        f'RETURNING t.{key}, t.{quote("uuid")}, old.{status}'
    )
    message_ids = list(dict.fromkeys(s.message_id for s in starts))
    with _bound_cursor(connection) as cursor:
        cursor.execute(sql, [MessageLog.IN_PROGRESS, message_ids, MessageLog.COMPLETED])
        return {uuid: (pk, status) for pk, uuid, status in cursor.fetchall()}


def _rows_of(alias: str, starts: Sequence[Start]) -> dict[str, tuple[int, str]]:
    """``{message id: (pk, status)}`` of the starts' rows, creating the missing ones.

    Where the database can, the rows are locked: a status read from an older snapshot
    (MySQL's repeatable read) could miss another worker's COMPLETED, and the task would run
    again. They are locked by primary key, in its order, after a plain read finds them: a
    locking read by message id would also lock the gaps where missing rows go, and two
    workers inserting there would deadlock.
    """
    ids = [s.message_id for s in starts]
    objects = MessageLog.objects.using(alias)
    found = list(objects.filter(uuid__in=ids).values_list('pk', 'uuid', 'status'))
    if found and connections[alias].features.has_select_for_update:
        found = list(objects.select_for_update().filter(pk__in=[pk for pk, _, _ in found])
                     .order_by('pk').values_list('pk', 'uuid', 'status'))
    rows = {uuid: (pk, status) for pk, uuid, status in found}
    missing = [s for s in starts if s.message_id not in rows]
    if missing:
        now = timezone.now()
        created = MessageLog.objects.using(alias).bulk_create([
            MessageLog(
                status=MessageLog.PUBLISHED, uuid=s.message_id, task=_short(s.task),
                task_args=json.dumps(s.args), content=json.dumps(s.kwargs),
                queue=_short(s.queue),
                exchange=_short(s.exchange), routing_key=_short(s.routing_key),
                priority=s.priority, publish_time=now,
            ) for s in _unique(missing)
        ])
        if any(row.pk is None for row in created):
            created = list(MessageLog.objects.using(alias).filter(
                uuid__in=[s.message_id for s in missing]))
        rows.update({row.uuid: (row.pk, row.status) for row in created})
    return rows


def _short(text: str) -> str:
    """A name cut to the 200 characters its column holds (a foreign producer's may be longer)."""
    return clean(text)[:200]


def clean(text: str) -> str:
    """Text a database takes: no NUL (PostgreSQL refuses it) and no lone surrogate.

    A lone surrogate is what Python makes of bytes it could not decode (a file name, say);
    no driver can encode it, so it is written as its escape, ``\\udcff``.
    """
    if '\x00' in text:
        text = text.replace('\x00', '')
    if text.isascii():  # the usual case, and a constant-time check
        return text
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        text = text.encode('utf-8', 'backslashreplace').decode('utf-8')
    return text


def _clean_optional(text: str | None) -> str | None:
    return None if text is None else clean(text)


def _unique(starts: Sequence[Start]) -> list[Start]:
    seen: dict[str, Start] = {}
    for start in starts:
        seen.setdefault(start.message_id, start)
    return list(seen.values())


def finish_many(finishes: Sequence[Finish]) -> dict[str, Started]:
    """Write the end of each task: status, output, log, exception, time.

    A Finish with ``start`` set ended before its start was written (a short task): its
    start is recorded by the same UPDATE, and its Started is in the returned mapping, by
    message id. On PostgreSQL one statement writes the batch; elsewhere one per task.
    """
    alias = database()
    connection = connections[alias]
    with transaction.atomic(using=alias):
        rows: dict[str, tuple[int, str]] = {}
        left = list(finishes)
        if _psycopg(connection) is not None:
            rows, left = _finish_by_message_id(connection, finishes)
        if left:
            for message_id, row in _finish_by_pk(connection, left).items():
                rows.setdefault(message_id, row)  # the status before the batch
    return {f.start.message_id: Started(pk=rows[f.start.message_id][0],
                                        already_completed=rows[f.start.message_id][1]
                                        == MessageLog.COMPLETED)
            for f in finishes if f.start is not None}


_END_COLUMNS = ('status', 'output', 'log', 'exception', 'traceback', 'completion_time',
                'failure_time')


def _end_values(finish: Finish, connection: BaseDatabaseWrapper,
                now: datetime.datetime) -> tuple[Any, ...]:
    """The _END_COLUMNS of ``finish``, then 1 when it also records the start, else 0."""
    at = _completion_time_field().get_db_prep_value(finish.at or now, connection)
    completed = finish.status == MessageLog.COMPLETED
    return (finish.status, _clean_optional(finish.output), clean(finish.log),
            _clean_optional(finish.exception), _clean_optional(finish.traceback),
            at if completed else None, None if completed else at,
            0 if finish.start is None else 1)


@functools.cache
def _completion_time_field() -> Field[Any, Any]:
    """The field whose database form both end times take (looked up once)."""
    return MessageLog._meta.get_field('completion_time')


def _finish_by_message_id(
    connection: BaseDatabaseWrapper, finishes: Sequence[Finish],
) -> tuple[dict[str, tuple[int, str]], list[Finish]]:
    """PostgreSQL: one UPDATE from arrays for the whole batch, rows found by message id.

    Returns ``{message id: (pk, status before)}`` of the rows written, and the finishes
    left for ``_finish_by_pk``: those with no row yet (a foreign producer's message) and a
    message id's second Finish in the batch (written after the first, as it came).
    """
    first: dict[str, Finish] = {}
    for finish in finishes:
        first.setdefault(finish.message_id, finish)
    now = timezone.now()
    columns = [list(column) for column in zip(
        *[(f.message_id, *_end_values(f, connection, now)) for f in first.values()],
        strict=True)]
    quote = connection.ops.quote_name
    table = quote(MessageLog._meta.db_table)
    assignments = ', '.join(f'{quote(c)} = v.{c}' for c in _END_COLUMNS)
    attempts = quote('attempts')
    # Joining the row to itself as ``old`` gives its status before the update.
    sql = (
        f'UPDATE {table} AS t SET {assignments}, {attempts} = t.{attempts} + v.started '
        'FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], '
        '%s::text[], %s::timestamptz[], %s::timestamptz[], %s::integer[]) '
        'AS v(uuid, status, output, log, exception, traceback, completion_time, '
        f'failure_time, started), {table} AS old '
        f'WHERE t.{quote("uuid")} = v.uuid AND old.{quote("id")} = t.{quote("id")} '
        f'RETURNING t.{quote("id")}, t.{quote("uuid")}, old.{quote("status")}'
    )
    with _bound_cursor(connection) as cursor:
        cursor.execute(sql, columns)
        rows = {uuid: (pk, status) for pk, uuid, status in cursor.fetchall()}
    left = [f for f in finishes if f.message_id not in rows or first[f.message_id] is not f]
    return rows, left


def _finish_by_pk(connection: BaseDatabaseWrapper,
                  finishes: Sequence[Finish]) -> dict[str, tuple[int, str]]:
    """One UPDATE a row, by primary key, creating the rows of starts that have none.

    ``{message id: (pk, status before)}`` of the finishes that record their start.
    """
    quote = connection.ops.quote_name
    placeholders = ', '.join(f'{quote(c)} = %s' for c in _END_COLUMNS)
    attempts = quote('attempts')
    sql = (f'UPDATE {quote(MessageLog._meta.db_table)} SET {placeholders}, '
           f'{attempts} = {attempts} + %s WHERE {quote("id")} = %s')
    starting = [f.start for f in finishes if f.start is not None]
    rows = _rows_of(connection.alias, starting) if starting else {}
    now = timezone.now()
    parameters = [
        (*_end_values(f, connection, now),
         f.pk if f.start is None else rows[f.start.message_id][0])
        for f in finishes
    ]
    # One prepared statement for the whole batch: the ORM's bulk_update would build a
    # CASE expression per row and field.
    with _bound_cursor(connection) as cursor:
        cursor.executemany(sql, parameters)
    return rows


def record_refused(
    *, message_id: str | None, task: str, reason: str, queue: str,
) -> MessageLog | None:
    """FAILED with ``reason`` for a message that will not run.

    None, and no row written, without a message id or when its row says COMPLETED.
    """
    if not message_id or len(message_id) > MESSAGE_ID_LENGTH:
        return None
    now = timezone.now()
    log, created = MessageLog.objects.get_or_create(
        uuid=message_id,
        defaults=dict(
            status=MessageLog.FAILED, task=_short(task), task_args='[]',
            content='{}', queue=_short(queue), exchange='', routing_key=_short(queue),
            publish_time=now, failure_time=now, exception=clean(reason),
        ),
    )
    if not created:
        # Not over COMPLETED, even one another worker commits meanwhile: the message ran
        # before this redelivery, and the row stays as it ended.
        failed = dict(status=MessageLog.FAILED, failure_time=now, exception=clean(reason))
        if not MessageLog.objects.filter(pk=log.pk).exclude(
                status=MessageLog.COMPLETED).update(**failed):
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
