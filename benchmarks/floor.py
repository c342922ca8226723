"""The floor under one caller: ``.venv-bench/bin/python benchmarks/floor.py [CALLS]``.

A tracked ``publish_message`` returns once its MessageLog row is committed, so a caller that
publishes in a loop can go no faster than one INSERT and commit of that row. This prints the
median and 90th percentile of four things, each CALLS times (2,000) on the benchmark
database, with no worker running: the bare INSERT and commit of a PUBLISHED row through
psycopg (no Django, no message), the same with ``synchronous_commit`` off (the commit not
waiting for the disk), carrot's ``publish_message`` (row, message, confirm recorded by the
outbox thread), and the same with ``CARROT['synchronous_commit']`` False. Compare with the
one-caller figures of ``benchmarks/run.py``, where Celery's ``delay()`` neither writes nor
waits.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from collections.abc import Callable

from carrot_adapter import PG_NAME, QUEUE, _ensure_database, _setup_django, _using_sqlite

COLUMNS = ('status, uuid, task, task_args, content, queue, exchange, routing_key, priority, '
           'publish_time, attempts, awaiting_confirm')


def timed(call: Callable[[], object], calls: int) -> tuple[float, float]:
    """Median and 90th percentile of ``calls`` calls, in ms (after 100 not counted)."""
    for _ in range(100):
        call()
    durations = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        durations.append(1000 * (time.perf_counter() - started))
    durations.sort()
    return statistics.median(durations), durations[int(0.9 * len(durations))]


def main() -> int:
    if _using_sqlite():
        sys.exit('floor.py measures PostgreSQL commits; run it without BENCH_DB=sqlite.')
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    _ensure_database()
    _setup_django()
    import psycopg
    from django.conf import settings
    from django.core.management import call_command
    from django.test.utils import override_settings

    from carrot import outbox
    from carrot.models import MessageLog
    from carrot.utilities import publish_message

    call_command('migrate', verbosity=0)
    MessageLog.objects.all().delete()
    bare = psycopg.connect(f'host=127.0.0.1 user=postgres dbname={PG_NAME}', autocommit=True)
    sql = (f'INSERT INTO carrot_messagelog ({COLUMNS}) VALUES '
           '(%s, %s, %s, %s, %s, %s, %s, %s, %s, now(), 0, true) RETURNING id')

    def insert() -> None:
        bare.execute(sql, ('PUBLISHED', str(uuid.uuid4()), 'tasks.noop', '[]', '{}', QUEUE, '',
                           QUEUE, 0)).fetchone()

    results = {'INSERT + commit (psycopg)': timed(insert, calls)}
    bare.execute('SET synchronous_commit = off')
    results['the same, synchronous_commit off'] = timed(insert, calls)
    bare.close()
    def publish() -> None:
        publish_message('tasks.noop', queue=QUEUE)

    results['publish_message'] = timed(publish, calls)
    with override_settings(CARROT={**settings.CARROT, 'synchronous_commit': False}):
        results["the same, CARROT['synchronous_commit'] False"] = timed(publish, calls)
    outbox.drain(60)
    MessageLog.objects.all().delete()
    print(f'{calls:,} calls each, one caller, PostgreSQL, no worker: median / p90 in ms')
    for what, (median, p90) in results.items():
        print(f'  {what:44s} {median:.3f} / {p90:.3f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
