"""How MessageLog rows are written fast: prepared SQL, per database.

The status API (``carrot.lifecycle``) decides what a row becomes; this module holds the
statements that write it: a multi-row INSERT (from arrays on PostgreSQL), and the batch
UPDATEs of starts and ends (one statement from a JSON recordset on PostgreSQL, one prepared
statement a row elsewhere), sent through server-bound cursors where psycopg 3 offers them.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, signals
from django.db.models.base import ModelState
from django.utils import timezone

from carrot import _text
from carrot._process import worker_id
from carrot.models import MessageLog

if TYPE_CHECKING:
    from carrot import lifecycle

try:
    import psycopg
except ImportError:  # another database driver
    psycopg = None  # type: ignore[assignment]

PUBLISHED_COLUMNS = ('status', 'uuid', 'task', 'task_args', 'content', 'queue', 'exchange',
                     'routing_key', 'priority', 'publish_time', 'attempts', 'awaiting_confirm')


def loaded_row(alias: str, pk: int | None, values: list[Any]) -> MessageLog:
    """The MessageLog instance of a row just inserted with ``values``, as if loaded.

    Built as ``Model.from_db`` builds an instance from every column, without its
    ``__init__`` (which is most of the cost on the publishing hot path) unless a receiver
    of ``pre_init`` or ``post_init`` for MessageLog must see it.
    """
    if len(values) != len(PUBLISHED_COLUMNS):
        raise ValueError(f'{len(values)} values for the {len(PUBLISHED_COLUMNS)} columns '
                         f'{PUBLISHED_COLUMNS}')
    _, names = concrete_fields()
    # Defaults are taken per row, as Model.__init__ takes them.
    row = [values[index] if index is not None else pk if field.primary_key
           else field.get_default() for index, field in _published_places()]
    if signals.pre_init.has_listeners(MessageLog) or signals.post_init.has_listeners(MessageLog):
        return MessageLog.from_db(alias, names, row)
    log = MessageLog.__new__(MessageLog)  # as Django unpickles a model instance
    log.__dict__.update(zip(names, row, strict=True))
    log._state = ModelState()
    log._state.adding = False
    log._state.db = alias
    return log


@functools.cache
def _published_places() -> tuple[tuple[int | None, Field[Any, Any]], ...]:
    """Per MessageLog column, in order: its index in PUBLISHED_COLUMNS (None: the primary key,
    or a column its default fills), and its field."""
    fields, _ = concrete_fields()
    return tuple((PUBLISHED_COLUMNS.index(f.attname) if f.attname in PUBLISHED_COLUMNS
                  else None, f) for f in fields)


@functools.cache
def concrete_fields() -> tuple[tuple[Field[Any, Any], ...], list[str]]:
    """MessageLog's columns in order, and their attribute names (looked up once, on first use,
    when the app registry is ready)."""
    fields = tuple(MessageLog._meta.concrete_fields)
    return fields, [f.attname for f in fields]


# Measured here: arrays cost more than a VALUES list for a few rows and less for many
# (0.44 against 0.23 ms of CPU for one row, 2.6 against 2.9 ms for fifty).
UNNEST_FROM_ROWS = 20
# PUBLISHED_COLUMNS' types, in order.
_UNNEST = ('SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], '
           '%b::text[], %b::text[], %b::text[], %b::integer[], %b::timestamptz[], '
           '%b::integer[], %b::boolean[])')
_ROW_PLACEHOLDERS = '(' + ', '.join(['%s'] * len(PUBLISHED_COLUMNS)) + ')'


def _insert_sql(quote: Callable[[str], str]) -> str:
    """The start of ``insert_rows``' statement, up to its rows."""
    columns = ', '.join(quote(c) for c in PUBLISHED_COLUMNS)
    return f'INSERT INTO {quote(MessageLog._meta.db_table)} ({columns}) '


def _returning_sql(quote: Callable[[str], str]) -> str:
    """``insert_rows``' RETURNING clause."""
    return f' RETURNING {quote("id")}, {quote("uuid")}'


def insert_rows(alias: str, rows: list[list[Any]], *, synchronous: bool = True) -> list[int]:
    """INSERT ``rows`` (in PUBLISHED_COLUMNS order) in one statement; their primary keys.

    ``synchronous=False``, in autocommit mode outside a transaction on PostgreSQL, commits
    the statement without waiting for its WAL to reach the disk (``synchronous_commit`` off
    for its own transaction only, set by the statement itself: no extra round trip); other
    databases commit as they always do. Refused inside a transaction, whose whole commit
    it would change.
    """
    connection = connections[alias]
    if not synchronous and (connection.in_atomic_block or not connection.get_autocommit()):
        raise ValueError('synchronous=False is for a statement that commits by itself, '
                         'outside a transaction')
    time_field = MessageLog._meta.get_field('publish_time')
    prepared = [[*row[:9], time_field.get_db_prep_value(row[9], connection), *row[10:]]
                for row in rows]
    sql = statement(connection, _insert_sql)
    returning = statement(connection, _returning_sql)
    if not synchronous and connection.vendor == 'postgresql':
        # Evaluated while the statement runs, so its transaction commits with it; the
        # setting is local to that transaction and the session's stays as it was.
        returning += ", set_config('synchronous_commit', 'off', true)"
    if len(rows) >= UNNEST_FROM_ROWS and psycopg_of(connection) is not None:
        # One array a column: the same short statement for any number of rows, which
        # psycopg converts once (and prepares once, where prepare_threshold is set).
        by_column = [list(column) for column in zip(*prepared, strict=True)]
        with bound_cursor(connection) as cursor:
            cursor.execute(sql + _UNNEST + returning, by_column)
            by_uuid = {row[1]: row[0] for row in cursor.fetchall()}
        return [by_uuid[row[1]] for row in rows]
    with bound_cursor(connection) as cursor:
        if connection.features.can_return_rows_from_bulk_insert:
            cursor.execute(sql + 'VALUES ' + ', '.join([_ROW_PLACEHOLDERS] * len(rows))
                           + returning,
                           [value for row in prepared for value in row])
            by_uuid = {row[1]: row[0] for row in cursor.fetchall()}
            return [by_uuid[row[1]] for row in rows]
        pks = []
        for row in prepared:  # no multi-row RETURNING here (MySQL): one row at a time
            cursor.execute(sql + 'VALUES ' + _ROW_PLACEHOLDERS, row)
            pks.append(cursor.lastrowid)
        return pks


def psycopg_of(connection: BaseDatabaseWrapper) -> Any:
    """The connection's psycopg 3 connection; None for another driver or database."""
    if psycopg is None or connection.vendor != 'postgresql':
        return None
    connection.ensure_connection()
    raw = connection.connection
    return raw if isinstance(raw, psycopg.Connection) else None


@contextmanager
def bound_cursor(connection: BaseDatabaseWrapper) -> Iterator[Any]:
    """A cursor that sends parameters apart from the SQL, where the driver can.

    Django's psycopg 3 cursors interpolate every parameter into the SQL text by default
    (``server_side_binding`` off); for a batch of rows that costs more CPU than the round
    trip, and PostgreSQL must parse each text anew. A server-bound psycopg cursor on the
    same connection (same transaction) sends the parameters separately. psycopg prepares
    a statement it sees repeatedly only when the project's ``DATABASES`` ``OPTIONS`` set
    ``prepare_threshold`` (Django's default, None, prepares nothing, as PgBouncer's
    transaction pooling needs). Errors are still Django's.
    """
    raw = psycopg_of(connection)
    if raw is None:  # psycopg2, SQLite, …
        with connection.cursor() as cursor:
            yield cursor
        return
    with connection.wrap_database_errors, psycopg.Cursor(raw) as cursor:
        yield cursor


#: Makes a statement's SQL text from a backend's ``quote_name``.
SqlBuilder = Callable[[Callable[[str], str]], str]
_statements: dict[tuple[type, SqlBuilder], str] = {}


def statement(connection: BaseDatabaseWrapper, build: SqlBuilder) -> str:
    """The SQL text ``build`` makes from the connection's ``quote_name``, built once per
    database backend: the recorder sends the same statements every round. ``build`` is a
    module-level function that reads only ``quote`` and this module's constants."""
    key = (type(connection.ops), build)
    sql = _statements.get(key)
    if sql is None:
        sql = _statements[key] = build(connection.ops.quote_name)
    return sql


def _delivered(quote: Callable[[str], str]) -> str:
    """The assignment that every start and end writes: the row's confirm is settled
    (``lifecycle``'s ends of retried attempts and refused messages set it as well).

    A row that a worker starts or ends was delivered, so RabbitMQ had its message. Clearing
    ``awaiting_confirm`` in the same UPDATE spares the publisher's outbox an UPDATE of its
    own (a new version of the row in the table and in each of its indexes) for every task
    that a worker starts before the outbox records its confirm, as happens whenever the
    workers keep up: the outbox's UPDATE only takes rows still awaiting their confirm.
    """
    return f'{quote("awaiting_confirm")} = false'


def _start_by_message_id_sql(quote: Callable[[str], str]) -> str:
    """``start_by_message_id``'s statement."""
    table = quote(MessageLog._meta.db_table)
    status, attempts, key = quote('status'), quote('attempts'), quote('id')
    # Joining the row to itself as ``old`` gives its status before the update.
    return (
        f'UPDATE {table} AS t SET {status} = %s, {attempts} = t.{attempts} + 1, '
        f'{quote("start_time")} = v.start_time, {quote("worker")} = %s, {_delivered(quote)} '
        f'FROM {recordset(START_RECORD)}, {table} AS old '
        f'WHERE t.{quote("uuid")} = v.uuid AND old.{key} = t.{key} AND t.{status} <> %s '
        f'RETURNING t.{key}, t.{quote("uuid")}, old.{status}'
    )


def start_by_message_id(connection: BaseDatabaseWrapper,
                         starts: Sequence[lifecycle.Start]) -> dict[str, tuple[int, str]]:
    """PostgreSQL: one UPDATE from a JSON recordset for the whole batch, rows found by
    message id.

    ``{message id: (pk, status before)}`` of the rows it started; a COMPLETED row is not
    started, nor is a row that does not exist.
    """
    first = {s.message_id: s for s in reversed(starts)}  # a message id's first start
    prepare = completion_time_field().get_db_prep_value
    records = [(message_id, prepare(start.at, connection)) for message_id, start in first.items()]
    with bound_cursor(connection) as cursor:
        cursor.execute(statement(connection, _start_by_message_id_sql),
                       [MessageLog.IN_PROGRESS, worker_id(), records_json(START_RECORD, records),
                        MessageLog.COMPLETED])
        return {uuid: (pk, status) for pk, uuid, status in cursor.fetchall()}


def _start_by_pk_sql(quote: Callable[[str], str]) -> str:
    """``start_by_pk``'s statement."""
    attempts = quote('attempts')
    return (f'UPDATE {quote(MessageLog._meta.db_table)} SET {quote("status")} = %s, '
            f'{attempts} = {attempts} + 1, {quote("start_time")} = %s, {quote("worker")} = %s, '
            f'{_delivered(quote)} WHERE {quote("id")} = %s')


def start_by_pk(connection: BaseDatabaseWrapper,
                times: Sequence[tuple[int, datetime.datetime]]) -> None:
    """Mark each row of ``times`` (``(pk, start time)``) IN_PROGRESS with one more attempt
    and its own start time: one prepared statement a row."""
    prepare = completion_time_field().get_db_prep_value
    worker = worker_id()
    with bound_cursor(connection) as cursor:
        cursor.executemany(statement(connection, _start_by_pk_sql),
                           [(MessageLog.IN_PROGRESS, prepare(at, connection), worker, pk)
                            for pk, at in times])


def rows_of(alias: str, starts: Sequence[lifecycle.Start]) -> dict[str, tuple[int, str]]:
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
                status=MessageLog.PUBLISHED, uuid=s.message_id, task=_text.fit(s.task, 'task'),
                task_args=json.dumps(s.args), content=json.dumps(s.kwargs),
                queue=_text.fit(s.queue, 'queue'), exchange=_text.fit(s.exchange, 'exchange'),
                routing_key=_text.fit(s.routing_key, 'routing_key'),
                priority=s.priority, publish_time=now, options=s.options or None,
                expires_at=database_time(s.expires_at),
            ) for s in _unique(missing)
        ])
        if any(row.pk is None for row in created):
            created = list(MessageLog.objects.using(alias).filter(
                uuid__in=[s.message_id for s in missing]))
        rows.update({row.uuid: (row.pk, row.status) for row in created})
    return rows


def database_time(at: datetime.datetime | None) -> datetime.datetime | None:
    """An aware time (as a message carries it) as a DateTimeField takes it: naive, in local
    time, when USE_TZ is off."""
    if at is None or settings.USE_TZ or timezone.is_naive(at):
        return at
    return timezone.make_naive(at)


def _unique(starts: Sequence[lifecycle.Start]) -> list[lifecycle.Start]:
    seen: dict[str, lifecycle.Start] = {}
    for start in starts:
        seen.setdefault(start.message_id, start)
    return list(seen.values())


END_COLUMNS = ('status', 'output', 'log', 'exception', 'traceback', 'completion_time',
                'failure_time', 'worker')

# The records the batch UPDATEs read, as (name, PostgreSQL type): a message id, then what
# start_by_message_id writes, or END_COLUMNS, the start time and 1 when the start is new.
START_RECORD = (('uuid', 'text'), ('start_time', 'timestamptz'))
END_RECORD = (('uuid', 'text'), ('status', 'text'), ('output', 'text'), ('log', 'text'),
              ('exception', 'text'), ('traceback', 'text'), ('completion_time', 'timestamptz'),
              ('failure_time', 'timestamptz'), ('worker', 'text'),
              ('start_time', 'timestamptz'), ('started', 'integer'))


def recordset(record: Sequence[tuple[str, str]]) -> str:
    """The FROM item ``v`` of a batch UPDATE: one parameter, a JSON list of ``record``s.

    One JSON text costs psycopg less CPU than one array per column, which it dumps element
    by element in Python: about 70 % of it for the end UPDATE of two or of twenty records
    (``benchmarks/statements.py``, figures in docs/performance.rst).
    """
    columns = ', '.join(f'{name} {kind}' for name, kind in record)
    return f'json_to_recordset(%s::json) AS v({columns})'


def records_json(record: Sequence[tuple[str, str]], values: Sequence[Sequence[Any]]) -> str:
    """``values`` (one tuple a record, in ``record``'s order) as ``recordset`` reads them.

    The text values are clean already (no NUL, no lone surrogate: carrot._text); a time is
    written in ISO 8601, with its offset when it has one, as PostgreSQL reads it.
    """
    names = [name for name, _ in record]
    return json.dumps([dict(zip(names, row, strict=True)) for row in values],
                      ensure_ascii=False, default=_iso_time)


def _iso_time(value: Any) -> str:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    raise TypeError(f'{type(value).__name__} is not a time: it has no JSON form here')


def end_values(finish: lifecycle.Finish, connection: BaseDatabaseWrapper,
                now: datetime.datetime) -> tuple[Any, ...]:
    """The END_COLUMNS of ``finish``; then its start time when it also records the start
    (else None, which keeps the row's), and 1 when it does, else 0."""
    prepare = completion_time_field().get_db_prep_value
    at = prepare(finish.at or now, connection)
    completed = finish.status == MessageLog.COMPLETED
    start = finish.start
    return (finish.status, _text.clean_optional(finish.output), _text.clean(finish.log),
            _text.clean_optional(finish.exception), _text.clean_optional(finish.traceback),
            at if completed else None, None if completed else at, worker_id(),
            None if start is None else prepare(start.at, connection),
            0 if start is None else 1)


@functools.cache
def completion_time_field() -> Field[Any, Any]:
    """The field whose database form the start and end times take (looked up once)."""
    return MessageLog._meta.get_field('completion_time')


def _finish_by_message_id_sql(quote: Callable[[str], str]) -> str:
    """``finish_by_message_id``'s statement."""
    table = quote(MessageLog._meta.db_table)
    assignments = ', '.join(f'{quote(c)} = v.{c}' for c in END_COLUMNS)
    attempts, status, start_time = quote('attempts'), quote('status'), quote('start_time')
    # Joining the row to itself as ``old`` gives its status before the update. A start
    # written with its end counts an attempt unless the row has ended already: written
    # again, the same end must not count one more.
    return (
        f'UPDATE {table} AS t SET {assignments}, {attempts} = t.{attempts} + CASE WHEN '
        f"old.{status} IN ('{MessageLog.COMPLETED.value}', '{MessageLog.FAILED.value}') "
        'THEN 0 ELSE v.started END '
        f', {start_time} = COALESCE(v.start_time, t.{start_time}), {_delivered(quote)} '
        f'FROM {recordset(END_RECORD)}, {table} AS old '
        f'WHERE t.{quote("uuid")} = v.uuid AND old.{quote("id")} = t.{quote("id")} '
        f'RETURNING t.{quote("id")}, t.{quote("uuid")}, old.{status}'
    )


def finish_by_message_id(
    connection: BaseDatabaseWrapper, finishes: Sequence[lifecycle.Finish],
) -> tuple[dict[str, tuple[int, str]], list[lifecycle.Finish]]:
    """PostgreSQL: one UPDATE from a JSON recordset for the whole batch, rows found by
    message id.

    Returns ``{message id: (pk, status before)}`` of the rows written, and the finishes
    left for ``finish_by_pk``: those with no row yet (a foreign producer's message) and a
    message id's second Finish in the batch (written after the first, as it came).
    """
    first: dict[str, lifecycle.Finish] = {}
    for finish in finishes:
        first.setdefault(finish.message_id, finish)
    now = timezone.now()
    records = [(f.message_id, *end_values(f, connection, now)) for f in first.values()]
    with bound_cursor(connection) as cursor:
        cursor.execute(statement(connection, _finish_by_message_id_sql),
                       [records_json(END_RECORD, records)])
        rows = {uuid: (pk, before) for pk, uuid, before in cursor.fetchall()}
    left = [f for f in finishes if f.message_id not in rows or first[f.message_id] is not f]
    return rows, left


def _finish_by_pk_sql(quote: Callable[[str], str]) -> str:
    """``finish_by_pk``'s statement."""
    placeholders = ', '.join(f'{quote(c)} = %s' for c in END_COLUMNS)
    attempts = quote('attempts')
    start_time = quote('start_time')
    return (f'UPDATE {quote(MessageLog._meta.db_table)} SET {placeholders}, '
            f'{start_time} = COALESCE(%s, {start_time}), {attempts} = {attempts} + %s, '
            f'{_delivered(quote)} WHERE {quote("id")} = %s')


def finish_by_pk(connection: BaseDatabaseWrapper,
                  finishes: Sequence[lifecycle.Finish]) -> dict[str, tuple[int, str]]:
    """One UPDATE a row, by primary key, creating the rows of starts that have none.

    ``{message id: (pk, status before)}`` of the finishes that record their start.
    """
    starting = [f.start for f in finishes if f.start is not None]
    rows = rows_of(connection.alias, starting) if starting else {}
    now = timezone.now()
    parameters = [
        (*end_values(f, connection, now),
         f.pk if f.start is None else rows[f.start.message_id][0])
        for f in finishes
    ]
    # One prepared statement for the whole batch: the ORM's bulk_update would build a
    # CASE expression per row and field.
    with bound_cursor(connection) as cursor:
        cursor.executemany(statement(connection, _finish_by_pk_sql), parameters)
    return rows
