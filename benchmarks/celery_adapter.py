"""Celery: gevent pool of 100, no result backend, results ignored."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from common import PEERS_DIR, Adapter, WorkerSpec

CONCURRENCY = 100


class CeleryAdapter(Adapter):
    name = 'celery'
    # Celery's default queue gets a direct exchange of the same name.
    queues = ('bench_celery',)
    exchanges = ('bench_celery',)
    publish_description = '`noop.delay()` (Celery default: no publisher confirms)'
    confirm_description = "`delay()` with broker_transport_options={'confirm_publish': True}"
    worker_description = (
        f'`celery worker -P gevent -c {CONCURRENCY} --without-gossip --without-mingle '
        '--without-heartbeat -l WARNING`, default prefetch multiplier (4 x 100), early ack'
    )

    def worker_spec(self) -> WorkerSpec:
        argv = [
            sys.executable, '-m', 'celery', '-A', 'celery_tasks', 'worker',
            '-P', 'gevent', '-c', str(CONCURRENCY), '-Q', 'bench_celery', '-l', 'WARNING',
            '-n', 'bench@%h',
            # Cluster chatter the benchmark does not need; mingle alone adds ~1 s to start-up.
            '--without-gossip', '--without-mingle', '--without-heartbeat',
        ]
        return WorkerSpec(argv=argv, cwd=PEERS_DIR, ready_pattern=r'bench celery worker ready')


ADAPTER = CeleryAdapter()


def make_publisher(task: str, confirm: bool) -> Callable[[], None]:
    """Runs in the publisher subprocess."""
    if confirm:
        os.environ['BENCH_CELERY_CONFIRM'] = '1'
    sys.path.insert(0, str(PEERS_DIR))
    import celery_tasks

    delay: Callable[[], None] = getattr(celery_tasks, task).delay
    return delay
