"""carrot: the system under test. All carrot-specific benchmark code lives here.

Harness side (CarrotAdapter): creates the database, migrates, empties MessageLog, starts
``manage.py carrot`` and counts COMPLETED rows. Publisher side (make_publisher): runs in the
publisher subprocess (gevent-patched for 50 callers, as every system's is) and calls
``carrot.utilities.publish_message``.

Environment: BENCH_DB=sqlite switches the benchmark project to SQLite (see settings.py).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

from common import BENCH_DIR, Adapter, BenchError, WorkerSpec

PROJECT_DIR = BENCH_DIR / 'benchproject'
REPO_DIR = BENCH_DIR.parent
QUEUE = 'bench_carrot'
WORKER_LOG = Path('/tmp/carrot-bench.log')
PG_NAME = os.environ.get('BENCH_PG_NAME', 'carrot_bench')
# PostgreSQL 15 adds an idle server process's statistics within 10 s (see row_work).
STATS_FLUSH_SECONDS = 11.0


def _setup_django() -> None:
    """Make the benchmark project importable and configure Django (idempotent)."""
    for path in (str(REPO_DIR), str(PROJECT_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'settings')
    import django

    django.setup()


def _using_sqlite() -> bool:
    return os.environ.get('BENCH_DB', 'postgres') == 'sqlite'


def _ensure_database() -> None:
    """createdb carrot_bench when missing (PostgreSQL, trust auth on 127.0.0.1)."""
    if _using_sqlite():
        return
    query = ['psql', '-h', '127.0.0.1', '-U', 'postgres', '-Atc',
             f"SELECT 1 FROM pg_database WHERE datname = '{PG_NAME}'"]
    exists = subprocess.run(query, capture_output=True, text=True, timeout=30)
    if exists.returncode != 0:
        raise BenchError(f'cannot reach PostgreSQL: {exists.stderr.strip()}')
    if exists.stdout.strip() != '1':
        subprocess.run(['createdb', '-h', '127.0.0.1', '-U', 'postgres', PG_NAME],
                       check=True, timeout=30)


def _vacuum(full: bool = False) -> None:
    """PostgreSQL: VACUUM (and ANALYZE) MessageLog once it is emptied, as autovacuum would.

    This machine's PostgreSQL runs with ``autovacuum`` off, which no default installation
    does. Without this, the rows every workload deletes stay in the table and its indexes
    as dead tuples and each later measurement pays for all of them: on 2026-12-08 the
    table held 480,000 dead tuples (156 MB) for 947 live rows. With 360,000 (151 MB), one
    caller's no-op tasks ran end to end at 736-804 tasks/s, against 837-982 vacuumed (three
    runs each, interleaved). Within a workload the dead tuples of its own tasks stay, as
    they would between two autovacuums.
    """
    if _using_sqlite():
        return
    from django.db import connection

    from carrot.models import MessageLog

    table = connection.ops.quote_name(MessageLog._meta.db_table)
    with connection.cursor() as cursor:
        # VACUUM FULL locks the table: a worker or benchmark left running must not hang it.
        cursor.execute("SET lock_timeout = '10s'")
        try:
            cursor.execute(f'VACUUM {"FULL " if full else ""}ANALYZE {table}')
        except Exception as error:
            raise BenchError(f'could not vacuum {table} ({error}): is another benchmark or '
                             'carrot worker using the benchmark database? Stop it and run '
                             'again.') from error
        finally:
            cursor.execute('RESET lock_timeout')


class CarrotAdapter(Adapter):
    name = 'carrot'
    # carrot declares a direct exchange named after the queue, and a dead-letter queue.
    queues = (QUEUE, f'{QUEUE}.dead')
    exchanges = (QUEUE,)
    publish_description = (
        '`publish_message()`, outside any transaction (every call writes and commits its '
        'MessageLog row and writes its message, and returns; the outbox thread records the '
        'confirm)'
    )
    confirm_description = (
        '`publish_message()` (returns once its MessageLog row is committed and its message '
        'written; the clock stops once every confirm is recorded on its row)'
    )
    worker_description = (
        '`manage.py carrot --no-scheduler`, queue bench_carrot concurrency 100, '
        + (f'prefetch {os.environ["BENCH_CARROT_PREFETCH"]} (BENCH_CARROT_PREFETCH), '
           if 'BENCH_CARROT_PREFETCH' in os.environ else 'default prefetch (1), ') +
        f'{"SQLite (WAL)" if _using_sqlite() else "PostgreSQL"} MessageLog'
        + ('' if _using_sqlite() else ', vacuumed once emptied before each measurement (this '
           "machine's PostgreSQL runs with autovacuum off)")
    )
    # A COUNT(*) in the database costs more than a Redis GET; poll less often.
    poll_interval = 0.02
    #: (a) once more from one caller with CARROT['synchronous_commit'] False: the opt-in, not
    #: counted for a target.
    one_caller_variants = {'e2e1_async': {'BENCH_CARROT_SYNCHRONOUS_COMMIT': '0'}}

    def __init__(self) -> None:
        self._model: Any = None

    def prepare(self) -> None:
        _ensure_database()
        migrate = subprocess.run(
            [sys.executable, str(PROJECT_DIR / 'manage.py'), 'migrate', '--noinput', '-v', '0'],
            cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300,
        )
        if migrate.returncode != 0:
            raise BenchError(f'migrate failed:\n{migrate.stdout}\n{migrate.stderr}')
        _setup_django()
        from carrot.models import MessageLog

        self._model = MessageLog
        MessageLog.objects.all().delete()
        _vacuum(full=True)  # what earlier runs left: a table as fresh as a new install's

    def reset(self) -> None:
        super().reset()  # the Redis first-start stamp written by tasks.sleep50
        if self._model is not None:  # None when prepare() failed
            self._model.objects.all().delete()
            _vacuum()

    def worker_spec(self) -> WorkerSpec:
        argv = [
            sys.executable, str(PROJECT_DIR / 'manage.py'), 'carrot',
            '--logfile', str(WORKER_LOG), '--loglevel', 'WARNING', '--no-scheduler',
        ]
        return WorkerSpec(argv=argv, cwd=PROJECT_DIR, ready_pattern=r'carrot service ready')

    def idle_scheduler_spec(self) -> WorkerSpec:
        """The same service with its scheduler on, for workload (e)."""
        spec = self.worker_spec()
        spec.argv.remove('--no-scheduler')
        return spec

    def create_schedules(self, count: int) -> None:
        """``count`` active one-day schedules: none is due during the benchmark."""
        from carrot.models import ScheduledTask

        ScheduledTask.objects.all().delete()
        rows = [ScheduledTask(task='tasks.noop', task_name=f'bench-{index}', queue=QUEUE,
                              interval_type='days', interval_count=1)
                for index in range(count)]
        ScheduledTask.objects.bulk_create(rows, batch_size=1000)
        # bulk_create skips save(), which plans the first run; plan them all now.
        from django.utils import timezone

        ScheduledTask.objects.update(next_run_at=timezone.now() + timedelta(days=1))

    def delete_schedules(self) -> None:
        from carrot.models import ScheduledTask

        ScheduledTask.objects.all().delete()

    def database_statements(self) -> int | None:
        """Transactions committed in the benchmark database so far (PostgreSQL's own count).

        Every statement the idle service runs outside a transaction is one; read over a
        separate connection, so the reading itself is not counted. None on SQLite, which
        does not count them.
        """
        if _using_sqlite():
            return None
        query = ['psql', '-h', '127.0.0.1', '-U', 'postgres', '-d', 'postgres', '-Atc',
                 'SELECT xact_commit + xact_rollback FROM pg_stat_database '
                 f"WHERE datname = '{PG_NAME}'"]
        found = subprocess.run(query, capture_output=True, text=True, timeout=30)
        if found.returncode != 0:
            raise BenchError(f'cannot read pg_stat_database: {found.stderr.strip()}')
        return int(found.stdout.strip())

    def row_work(self) -> tuple[int, int, int] | None:
        """MessageLog's rows inserted and updated so far, and the cluster's WAL position in
        bytes: PostgreSQL's own counts, read over a separate connection. None on SQLite.

        A server process adds its counts when it ends, or within 10 s of going idle
        (PostgreSQL 15's cumulative statistics): read them after the worker has stopped and
        STATS_FLUSH_SECONDS have passed.
        """
        if _using_sqlite():
            return None
        query = ['psql', '-h', '127.0.0.1', '-U', 'postgres', '-d', PG_NAME, '-Atc',
                 "SELECT n_tup_ins, n_tup_upd, pg_current_wal_lsn() - '0/0' "
                 "FROM pg_stat_user_tables WHERE relname = 'carrot_messagelog'"]
        found = subprocess.run(query, capture_output=True, text=True, timeout=30)
        if found.returncode != 0 or not found.stdout.strip():
            raise BenchError(f'cannot read pg_stat_user_tables: {found.stderr.strip()}')
        inserted, updated, wal = found.stdout.strip().split('|')
        return int(inserted), int(updated), int(float(wal))

    def done_count(self) -> int:
        count: int = self._model.objects.filter(status='COMPLETED').count()
        return count

    def close(self) -> None:
        if self._model is not None:
            from django.db import connections

            connections.close_all()


ADAPTER = CarrotAdapter()


def make_publisher(task: str, confirm: bool) -> Callable[[], None]:
    """Runs in the publisher subprocess (gevent-patched already for 50 callers).

    carrot always confirms, so ``confirm`` changes nothing here.
    """
    return publisher_to(QUEUE, f'tasks.{task}')


def finish_publishing() -> None:
    """Inside the timed run: wait until every confirm due is recorded on its row."""
    from carrot import outbox

    if not outbox.drain(120):
        raise RuntimeError('RabbitMQ did not confirm every publish within 120 s')


def publisher_to(queue: str, task: str) -> Callable[[], None]:
    """One ``publish_message`` of ``task`` to ``queue`` per call.

    The task's module is imported here, before the clock starts, as the peers' adapters
    import theirs (carrot would otherwise import it on the first call).
    """
    _setup_django()
    importlib.import_module(task.rpartition('.')[0])
    from carrot.utilities import publish_message

    def publish() -> None:
        publish_message(task, queue=queue)

    return publish


@contextmanager
def one_transaction(together: bool = False) -> Iterator[None]:
    """The ``transaction.atomic()`` that workload (e) publishes in; ``together``: with
    ``publish_together()`` inside it, as workload (e') does."""
    from django.db import transaction

    from carrot.utilities import publish_together

    with transaction.atomic(), (publish_together() if together else nullcontext()):
        yield
