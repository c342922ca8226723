"""carrot with untracked tasks: no MessageLog row for a task that succeeds.

The same service, publisher and settings as carrot_adapter.py, on a queue with
``'tracked': False``; the tasks report their completion through the peers' Redis counter
(peers/probe.py), as Celery's and Dramatiq's do, since there is no row to count.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import carrot_adapter
from common import Adapter, WorkerSpec

QUEUE = 'bench_carrot_untracked'
ENV = {'BENCH_CARROT_UNTRACKED': '1'}


class CarrotUntrackedAdapter(carrot_adapter.CarrotAdapter):
    name = 'carrot_untracked'
    queues = (QUEUE, f'{QUEUE}.dead')
    exchanges = (QUEUE,)
    publish_description = (
        "`publish_message()` outside any transaction to a queue with 'tracked': False (no "
        'row is written; each call waits for its confirm)')
    confirm_description = '`publish_message()` untracked (confirmed publish, no row)'
    worker_description = (
        '`manage.py carrot --no-scheduler`, queue bench_carrot_untracked (tracked: False) '
        'concurrency 100, default prefetch (1); completions counted in Redis like the peers\'')
    poll_interval = Adapter.poll_interval
    #: (e) and (g) measure the tracked service only.
    create_schedules = None  # type: ignore[assignment]
    #: No row, so nothing for synchronous_commit to change.
    one_caller_variants: dict[str, dict[str, str]] = {}

    def reset(self) -> None:
        Adapter.reset(self)

    def worker_spec(self) -> WorkerSpec:
        spec = super().worker_spec()
        return WorkerSpec(argv=spec.argv, cwd=spec.cwd, ready_pattern=spec.ready_pattern,
                          env={**spec.env, **ENV})

    def done_count(self) -> int:
        return Adapter.done_count(self)


ADAPTER = CarrotUntrackedAdapter()


def make_publisher(task: str, confirm: bool) -> Callable[[], None]:
    """Runs in the publisher subprocess (gevent-patched already for 50 callers)."""
    os.environ.update(ENV)
    return carrot_adapter.publisher_to(QUEUE, f'tasks.counted_{task}')


def one_transaction(together: bool = False) -> Any:
    return carrot_adapter.one_transaction(together)


finish_publishing = carrot_adapter.finish_publishing
