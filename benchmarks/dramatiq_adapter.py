"""Dramatiq: RabbitMQ broker, one gevent process with 100 worker greenlets."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from common import PEERS_DIR, Adapter, WorkerSpec

THREADS = 100


def _dramatiq_gevent_argv() -> list[str]:
    # The console script installed next to our python, else the same thing spelled inline.
    script = Path(sys.executable).parent / 'dramatiq-gevent'
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, '-c',
            'from gevent import monkey; monkey.patch_all()\n'
            'import sys; from dramatiq.cli import main; sys.exit(main())']


class DramatiqAdapter(Adapter):
    name = 'dramatiq'
    # Dramatiq declares a delay queue (.DQ) and a dead-letter queue (.XQ) per queue.
    queues = ('bench_dramatiq', 'bench_dramatiq.DQ', 'bench_dramatiq.XQ')
    publish_description = '`noop.send()` (Dramatiq default: confirm_delivery=False)'
    confirm_description = 'RabbitmqBroker(confirm_delivery=True) (it is off by default)'
    worker_description = (
        f'`dramatiq-gevent --processes 1 --threads {THREADS}`, default prefetch (2 x threads)'
    )

    def worker_spec(self) -> WorkerSpec:
        argv = [
            *_dramatiq_gevent_argv(), 'dramatiq_tasks',
            '--processes', '1', '--threads', str(THREADS),
            '--queues', 'bench_dramatiq', '--path', str(PEERS_DIR),
        ]
        ready = r'Worker process is ready for action'
        return WorkerSpec(argv=argv, cwd=PEERS_DIR, ready_pattern=ready)


ADAPTER = DramatiqAdapter()


def make_publisher(task: str, confirm: bool) -> Callable[[], None]:
    """Runs in the publisher subprocess."""
    if confirm:
        os.environ['BENCH_DRAMATIQ_CONFIRM'] = '1'
    sys.path.insert(0, str(PEERS_DIR))
    import dramatiq_tasks

    send: Callable[[], None] = getattr(dramatiq_tasks, task).send
    return send
