"""The Celery side of the benchmark: a no-op and a 50 ms task on queue ``bench_celery``.

Configured the way a Celery user would for throughput: no result backend, results ignored.
Set BENCH_CELERY_CONFIRM=1 (publisher only) to turn on publisher confirms.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from celery.signals import worker_ready

import probe

QUEUE = 'bench_celery'

app = Celery('bench_celery', broker='amqp://guest:guest@127.0.0.1:5672//')
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    result_backend=None,
    broker_connection_retry_on_startup=True,
    # Celery publishes without confirms unless asked; workload (c) asks.
    broker_transport_options=(
        {'confirm_publish': True} if os.environ.get('BENCH_CELERY_CONFIRM') == '1' else {}
    ),
)


@worker_ready.connect
def announce_ready(**_: object) -> None:
    # The worker runs at WARNING (INFO logs two lines per task, which costs throughput), so
    # Celery's own INFO "ready." line is not printed: say it ourselves.
    print('bench celery worker ready', flush=True)


@app.task(ignore_result=True)
def noop() -> None:
    probe.done('celery')  # the only observable side effect: the harness polls the counter


@app.task(ignore_result=True)
def sleep50() -> None:
    probe.first_start('celery')
    time.sleep(0.05)  # gevent-patched: yields to the other greenlets
    probe.done('celery')
