"""How fast the monitor answers on a big MessageLog: ``.venv/bin/python benchmarks/monitor.py``.

Fills MessageLog of its own database (PostgreSQL ``carrot_monitor_bench``; SQLite with
BENCH_DB=sqlite) with ROWS rows (``--rows``, default 1,000,000 on PostgreSQL and 100,000 on
SQLite: 90 % completed, 5 % failed, 3 % queued, 1 % running, 1 % delayed, over 5 queues and 20
tasks, each with a log), and QueueStats with the rollups two workers would have written over
30 days (an hour row per queue, hour and worker; a minute row per queue, minute and worker
for the last day: what carrot.rollups keeps), then asks every list page, API list, a task's
page, the health page and the overview, as a staff user, through Django's test client: the
time is the server's, from request to rendered answer, without a network. Prints the median
and 90th percentile of REPEAT requests each, with the target each is held to (lists and API
lists under 100 ms, a task's page under 50 ms, the health page and the overview under
200 ms). Run it with the tests' virtualenv, which ``python3 tests/run.py`` builds; the tables
are emptied at the end (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SQLITE = os.environ.get('BENCH_DB', 'postgresql') == 'sqlite'
PG_NAME = 'carrot_monitor_bench'
REPEAT = 15
QUEUES = [f'queue_{n}' for n in range(5)]
#: The targets, in ms: a list or API list, a task's page, the health page, the overview.
LIST_MS, TASK_MS, HEALTH_MS, OVERVIEW_MS = 100, 50, 200, 200
#: How many worker processes' rollups fill QueueStats, unless --writers says otherwise.
WRITERS = 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rows', type=int, default=100_000 if SQLITE else 1_000_000)
    parser.add_argument('--repeat', type=int, default=REPEAT)
    parser.add_argument('--keep', action='store_true', help='keep the filled table')
    parser.add_argument('--writers', type=int, default=WRITERS,
                        help='worker processes whose rollups fill QueueStats (each ran the '
                             'whole 30 days)')
    chosen = parser.parse_args()
    _configure()
    from django.core.management import call_command
    from django.db import connection

    call_command('migrate', verbosity=0)
    started = time.monotonic()
    _fill(chosen.rows)
    print(f'filled {chosen.rows:,} rows in {time.monotonic() - started:.1f} s '
          f'({connection.vendor})')
    started = time.monotonic()
    stats = _fill_rollups([f'bench-host:{n}/0' for n in range(1, chosen.writers + 1)])
    print(f'filled {stats:,} QueueStats rows in {time.monotonic() - started:.1f} s')
    # As the workers' rollups rounds do, a fold a minute: the finished periods' rows merged.
    from carrot import rollups

    started, folded = time.monotonic(), 0
    while taken := rollups.fold():
        folded += taken
    print(f'folded {folded:,} of them in {time.monotonic() - started:.1f} s, as the workers '
          f'would have')
    try:
        return _measure(chosen.repeat)
    finally:
        if not chosen.keep:
            with connection.cursor() as cursor:
                for table in ('carrot_messagelog', 'carrot_queuestats'):
                    cursor.execute(f'DELETE FROM {table}' if SQLITE else f'TRUNCATE {table}')


def _configure() -> None:
    sys.path.insert(0, str(ROOT))
    os.environ['DJANGO_SETTINGS_MODULE'] = 'tests.project.settings'
    os.environ['CARROT_TEST_CARROT'] = (
        '{"default_broker": "amqp://guest:guest@127.0.0.1:5672/", "task_modules": '
        '["tests.project.tasks"], "queues": ['
        + ', '.join(f'{{"name": "{name}"}}' for name in QUEUES) + ']}')
    if SQLITE:
        os.environ['CARROT_TEST_DB'] = 'sqlite'
        os.environ['CARROT_TEST_SQLITE_PATH'] = '/tmp/carrot-monitor-bench.sqlite3'
    else:
        os.environ['CARROT_TEST_DB'] = 'postgresql'
        os.environ['CARROT_TEST_PG_NAME'] = PG_NAME
        import psycopg

        with psycopg.connect('host=127.0.0.1 user=postgres dbname=postgres',
                             autocommit=True) as admin:
            if not admin.execute('SELECT 1 FROM pg_database WHERE datname = %s',
                                 [PG_NAME]).fetchone():
                admin.execute(f'CREATE DATABASE {PG_NAME}')
    import django

    django.setup()


def _fill(rows: int) -> None:
    """ROWS rows in one statement; row i's status, queue and task follow from i (``%%``:
    the database driver's placeholders take ``%``)."""
    from django.db import connection

    status = ("CASE WHEN i %% 100 < 90 THEN 'COMPLETED' WHEN i %% 100 < 95 THEN 'FAILED' "
              "WHEN i %% 100 < 98 THEN 'PUBLISHED' WHEN i %% 100 < 99 THEN 'IN_PROGRESS' "
              "ELSE 'DELAYED' END")
    newline = 'char(10)' if SQLITE else 'chr(10)'
    log = (f"'2026-12-01 09:30:00,001 INFO carrot.task: Starting task' || {newline} || "
           f"'2026-12-01 09:30:00,002 INFO carrot.task: Task completed'")
    with connection.cursor() as cursor:
        cursor.execute('DELETE FROM carrot_messagelog' if SQLITE
                       else 'TRUNCATE carrot_messagelog')
        columns = ('status, uuid, task, task_args, content, queue, exchange, routing_key, '
                   'priority, publish_time, start_time, completion_time, failure_time, '
                   'exception, log, attempts, awaiting_confirm, worker')
        if SQLITE:
            cursor.execute(
                f'WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < %s) '
                f'INSERT INTO carrot_messagelog ({columns}) SELECT {status}, '
                f"'bench-' || i, 'bench.tasks.task_' || (i %% 20), '[' || i || ', \"row ' || i "
                f"|| '\"]', '{{}}', 'queue_' || (i %% 5), '', 'queue_' || (i %% 5), 0, "
                f"datetime('now', '-' || (%s - i) || ' seconds'), "
                f"datetime('now', '-' || (%s - i) || ' seconds'), "
                f"datetime('now', '-' || (%s - i) || ' seconds'), NULL, "
                f"CASE WHEN i %% 100 >= 90 AND i %% 100 < 95 THEN 'ValueError: row ' || i END, "
                f"{log}, 1, 0, 'bench-host:1' FROM n", [rows, rows, rows, rows])
        else:
            cursor.execute(
                f'INSERT INTO carrot_messagelog ({columns}) SELECT {status}, '
                f"'bench-' || i, 'bench.tasks.task_' || (i %% 20), '[' || i || ', \"row ' || i "
                f"|| '\"]', '{{}}', 'queue_' || (i %% 5), '', 'queue_' || (i %% 5), 0, "
                f"now() - (%s - i) * interval '1 second', "
                f"now() - (%s - i) * interval '1 second', "
                f"now() - (%s - i) * interval '1 second', NULL, "
                f"CASE WHEN i %% 100 >= 90 AND i %% 100 < 95 THEN 'ValueError: row ' || i END, "
                f"{log}, 1, false, 'bench-host:1' "
                f'FROM generate_series(1, %s) AS i', [rows, rows, rows, rows])
            cursor.execute('ANALYZE carrot_messagelog')  # as autovacuum would


def _fill_rollups(writers: list[str]) -> int:
    """The QueueStats rows of ``writers`` on QUEUES: 30 days of hour rows and a day of minute
    rows (carrot.rollups keeps no more), with waits around 20 ms and run times around 80 ms
    over a dozen buckets each."""
    import random

    from django.utils import timezone

    from carrot import rollups
    from carrot.models import QueueStats

    QueueStats.objects.all().delete()
    now = timezone.now().timestamp()
    pick = random.Random(7)
    rows = []
    for resolution, step, count in ((QueueStats.HOUR, 3600, 30 * 24),
                                    (QueueStats.MINUTE, 60, 24 * 60)):
        last = int(now) // step * step
        for number in range(count):
            period = last - number * step
            for queue in QUEUES:
                for writer in writers:
                    tasks = pick.randint(step // 2, step * 2)
                    wait, run = [0] * rollups.BUCKETS, [0] * rollups.BUCKETS
                    for _ in range(40):  # a sample of the tasks, weighted to their number
                        wait[rollups.bucket(pick.lognormvariate(-4, 1.2))] += tasks // 40
                        run[rollups.bucket(pick.lognormvariate(-2.5, 0.8))] += tasks // 40
                    failed = tasks // 50
                    rows.append(QueueStats(
                        queue=queue, resolution=resolution, period=period, writer=writer,
                        succeeded=tasks - failed, failed=failed,
                        wait=rollups.trimmed(wait), run=rollups.trimmed(run)))
    QueueStats.objects.bulk_create(rows, batch_size=2000)
    if not SQLITE:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute('ANALYZE carrot_queuestats')
    return len(rows)


def _measure(repeat: int) -> int:
    from django.contrib.auth.models import User
    from django.test import Client

    from carrot.models import MessageLog

    user, _ = User.objects.get_or_create(username='bench-staff', is_staff=True,
                                         is_superuser=True)
    client = Client()
    client.force_login(user)
    middle = MessageLog.objects.order_by('-id').values_list('id', flat=True)[
        MessageLog.objects.count() // 2]
    task = MessageLog.objects.order_by('-id').first()
    failed = MessageLog.objects.filter(status='FAILED').order_by('-id').first()
    assert task is not None and failed is not None
    pages = [(f'tasks/{status}/', LIST_MS)
             for status in ('queued', 'delayed', 'running', 'failed', 'completed')]
    pages += [
        ('tasks/completed/?queue=queue_3', LIST_MS),
        ('tasks/completed/?task=bench.tasks.task_7', LIST_MS),
        ('tasks/failed/?queue=queue_2&task=bench.tasks.task_1', LIST_MS),
        (f'tasks/failed/?id={failed.uuid}', LIST_MS),
        ('tasks/completed/?args=row+123', LIST_MS),
        (f'tasks/completed/?after={middle}', LIST_MS),
        ('api/tasks/completed/', LIST_MS),
        ('api/tasks/failed/?queue=queue_2', LIST_MS),
        (f'api/tasks/completed/?after={middle}&limit=500', LIST_MS),
        (f'tasks/{task.pk}/', TASK_MS),
        (f'api/tasks/{task.pk}/', TASK_MS),
        ('health/', HEALTH_MS),
        ('api/health/', HEALTH_MS),
        ('overview/', OVERVIEW_MS),
        ('api/overview/', OVERVIEW_MS),
    ]
    print(f'\n{"page (under /monitor/)":<58} {"median":>8} {"p90":>8} {"target":>8}  met')
    missed = 0
    for path, target in pages:
        times = []
        for _ in range(repeat):
            begun = time.perf_counter()
            answer = client.get(f'/monitor/{path}')
            times.append((time.perf_counter() - begun) * 1000)
            assert answer.status_code == 200, (path, answer.status_code)
        median = statistics.median(times)
        p90 = sorted(times)[int(len(times) * 0.9) - 1 if len(times) >= 10 else -1]
        met = median < target
        missed += not met
        print(f'{path[:58]:<58} {median:7.1f}ms {p90:7.1f}ms {target:6d}ms  '
              f'{"yes" if met else "NO"}')
    rows = MessageLog.objects.count()
    print(f'\n{rows:,} rows; {repeat} requests each; {missed} page(s) past their target')
    return 1 if missed else 0


if __name__ == '__main__':
    sys.exit(main())
