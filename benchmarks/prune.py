"""How ``carrot_prune`` behaves on a big MessageLog: ``python3 benchmarks/prune.py [ROWS]``.

Fills MessageLog (database ``carrot_prune_bench``, not the main benchmark's: a million deleted
rows would slow it down until a VACUUM; or SQLite with BENCH_DB=sqlite) with ROWS old
COMPLETED rows (default 1,000,000) and 10,000 recent ones, then prunes while another thread
keeps inserting PUBLISHED rows, as publishers would, and reports how long the prune took,
its longest batch (the longest any row lock was held) and the slowest of those inserts (what
a publisher waited for meanwhile). Run it with the benchmarks' virtualenv, which
``benchmarks/run.py`` builds (``.venv-bench/bin/python benchmarks/prune.py``); it empties
MessageLog of that database first, and truncates it at the end.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
import uuid
from datetime import timedelta

os.environ.setdefault('BENCH_PG_NAME', 'carrot_prune_bench')
os.environ.setdefault('BENCH_SQLITE_PATH', '/tmp/carrot-prune-bench.sqlite3')

from carrot_adapter import _ensure_database, _setup_django, _using_sqlite  # noqa: E402


def main() -> int:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    _ensure_database()
    _setup_django()
    from django.core.management import call_command
    from django.db import connection
    from django.utils import timezone

    from carrot import retention
    from carrot.models import MessageLog

    call_command('migrate', verbosity=0)
    MessageLog.objects.all().delete()
    started = time.monotonic()
    _fill(rows, recent=10_000)
    with connection.cursor() as cursor:  # as autovacuum would, on a table of this size
        cursor.execute('ANALYZE carrot_messagelog')
    print(f'filled {rows:,} old and 10,000 recent COMPLETED rows in '
          f'{time.monotonic() - started:.1f} s ({connection.vendor})')

    waits: list[float] = []
    stop = threading.Event()

    def publish() -> None:
        from django.db import connection as own

        while not stop.is_set():
            begun = time.monotonic()
            MessageLog.objects.create(uuid=str(uuid.uuid4()), task='bench.noop',
                                      status=MessageLog.PUBLISHED, publish_time=timezone.now())
            waits.append(time.monotonic() - begun)
            time.sleep(0.01)
        own.close()

    publisher = threading.Thread(target=publish)
    publisher.start()
    started = time.monotonic()
    pruned = retention.prune(completed=timedelta(days=3))
    took = time.monotonic() - started
    stop.set()
    publisher.join()
    left = MessageLog.objects.filter(status=MessageLog.COMPLETED).count()
    print(f'pruned {pruned.completed:,} rows in {took:.1f} s ({pruned.completed / took:,.0f} '
          f'rows/s), batches of {retention.BATCH}; longest batch {pruned.longest_batch * 1000:.0f}'
          f' ms; {left:,} recent rows kept')
    print(f'{len(waits)} inserts meanwhile: median {statistics.median(waits) * 1000:.1f} ms, '
          f'slowest {max(waits) * 1000:.0f} ms')
    with connection.cursor() as cursor:  # leave no bloated table behind
        cursor.execute('DELETE FROM carrot_messagelog' if _using_sqlite()
                       else 'TRUNCATE carrot_messagelog')
    return 0 if pruned.completed == rows and left == 10_000 else 1


def _fill(rows: int, recent: int) -> None:
    from django.db import connection as db

    table = '"carrot_messagelog"'
    with db.cursor() as cursor:
        if not _using_sqlite():
            cursor.execute(
                f'INSERT INTO {table} (status, uuid, task, task_args, content, queue, exchange, '
                f'routing_key, priority, publish_time, completion_time, attempts, '
                f'awaiting_confirm) SELECT %s, md5(i::text) || i, %s, %s, %s, %s, %s, %s, 0, '
                f"now() - interval '10 days' + i * interval '1 ms', "
                f"now() - interval '10 days' + i * interval '2 ms', "
                f'1, false FROM generate_series(1, %s) AS i',
                ['COMPLETED', 'bench.noop', '[]', '{}', 'q', '', 'q', rows])
            cursor.execute(
                f'INSERT INTO {table} (status, uuid, task, priority, publish_time, '
                f'completion_time, attempts, awaiting_confirm) SELECT %s, %s || i, %s, 0, now(), '
                f'now(), 1, false FROM generate_series(1, %s) AS i',
                ['COMPLETED', 'recent-', 'bench.noop', recent])
        else:
            cursor.execute(
                f'WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < %s) '
                f'INSERT INTO {table} (status, uuid, task, task_args, content, queue, exchange, '
                f'routing_key, priority, publish_time, completion_time, attempts, '
                f"awaiting_confirm) SELECT 'COMPLETED', 'old-' || i, 'bench.noop', '[]', '{{}}', "
                f"'q', '', 'q', 0, datetime('now', '-10 days'), datetime('now', '-10 days'), 1, 0 "
                f'FROM n', [rows])
            cursor.execute(
                f'WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < %s) '
                f'INSERT INTO {table} (status, uuid, task, priority, publish_time, '
                f"completion_time, attempts, awaiting_confirm) SELECT 'COMPLETED', 'recent-' || i, "
                f"'bench.noop', 0, datetime('now'), datetime('now'), 1, 0 FROM n", [recent])


if __name__ == '__main__':
    sys.exit(main())
