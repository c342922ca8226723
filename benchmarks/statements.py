"""The recorder's end UPDATE, two ways: ``.venv-bench/bin/python benchmarks/statements.py``.

On PostgreSQL the recorder ends a batch of tasks with one ``UPDATE … FROM
json_to_recordset(%s::json)`` (``carrot._sql.finish_by_message_id``). Before 2026-12-07 the
same statement read one array a column (``FROM unnest(%s::text[], …)``), which psycopg dumps
element by element in Python. This prints the client's CPU (``time.process_time``) per
statement, median over the number of statements given (2,000 by default) each way, for
batches of 2 and 20 ends, the two forms interleaved, on the benchmark database with no
worker running (it deletes the database's MessageLog rows before and after). The server's
work does not count: only what the worker's process pays. The old form is the statement
alone: the function it was sent from also built its SQL text each time and a few dicts,
which this leaves out, so the comparison if anything favours it.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from carrot_adapter import QUEUE, _ensure_database, _setup_django, _using_sqlite

# The statement of carrot/_sql.py before 2026-12-07 (commit 07a0016), table and column names
# written out.
ARRAYS_SQL = (
    'UPDATE "carrot_messagelog" AS t SET "status" = v.status, "output" = v.output, '
    '"log" = v.log, "exception" = v.exception, "traceback" = v.traceback, '
    '"completion_time" = v.completion_time, "failure_time" = v.failure_time, '
    '"worker" = v.worker, "attempts" = t."attempts" + CASE WHEN old."status" IN '
    "('COMPLETED', 'FAILED') THEN 0 ELSE v.started END, "
    '"start_time" = COALESCE(v.start_time, t."start_time") '
    'FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], '
    '%s::timestamptz[], %s::timestamptz[], %s::text[], %s::timestamptz[], %s::integer[]) '
    'AS v(uuid, status, output, log, exception, traceback, completion_time, failure_time, '
    'worker, start_time, started), "carrot_messagelog" AS old '
    'WHERE t."uuid" = v.uuid AND old."id" = t."id" RETURNING t."id", t."uuid", old."status"'
)


def main() -> int:
    if _using_sqlite():
        sys.exit('statements.py measures the PostgreSQL statement; run it without '
                 'BENCH_DB=sqlite.')
    statements = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    if statements < 1:
        sys.exit('Give a number of statements of 1 or more.')
    _ensure_database()
    _setup_django()
    from django.core.management import call_command
    from django.db import connection
    from django.utils import timezone

    from carrot import _sql, lifecycle
    from carrot.models import MessageLog

    call_command('migrate', verbosity=0)
    MessageLog.objects.all().delete()
    ids = [str(uuid.uuid4()) for _ in range(20)]
    MessageLog.objects.bulk_create(MessageLog(uuid=i, task='tasks.noop', queue=QUEUE,
                                              status=MessageLog.PUBLISHED) for i in ids)

    def arrays(finishes: Sequence[lifecycle.Finish]) -> None:
        now = timezone.now()
        rows = [(f.message_id, *_sql.end_values(f, connection, now)) for f in finishes]
        with _sql.bound_cursor(connection) as cursor:
            cursor.execute(ARRAYS_SQL, [list(column) for column in zip(*rows, strict=True)])
            cursor.fetchall()

    def recordset(finishes: Sequence[lifecycle.Finish]) -> None:
        _sql.finish_by_message_id(connection, finishes)

    forms: dict[str, Callable[[Sequence[lifecycle.Finish]], Any]] = {
        'one array a column (before)': arrays, 'one JSON recordset (now)': recordset}
    print(f'{statements:,} statements each, PostgreSQL, client CPU per statement, median, us')
    for size in (2, 20):
        finishes = [lifecycle.completed(i, output='null', log='') for i in ids[:size]]
        cpu: dict[str, list[float]] = {name: [] for name in forms}
        for _ in range(statements):
            for name, form in forms.items():
                started = time.process_time()
                form(finishes)
                cpu[name].append(1e6 * (time.process_time() - started))
        for name, values in cpu.items():
            print(f'  {size:2d} ends, {name:28s} {statistics.median(values):7.0f}')
    MessageLog.objects.all().delete()
    return 0


if __name__ == '__main__':
    sys.exit(main())
