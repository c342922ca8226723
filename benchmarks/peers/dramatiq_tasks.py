"""The Dramatiq side of the benchmark: a no-op and a 50 ms actor on queue ``bench_dramatiq``.

Dramatiq's RabbitMQ broker does NOT confirm publishes by default (``confirm_delivery=False``);
set BENCH_DRAMATIQ_CONFIRM=1 (publisher only) to turn confirms on for workload (c).
"""

from __future__ import annotations

import os
import time

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

import probe

QUEUE = 'bench_dramatiq'

broker = RabbitmqBroker(
    url='amqp://guest:guest@127.0.0.1:5672/%2F',
    confirm_delivery=os.environ.get('BENCH_DRAMATIQ_CONFIRM') == '1',
)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def noop() -> None:
    probe.done('dramatiq')  # the only observable side effect: the harness polls the counter


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def sleep50() -> None:
    probe.first_start('dramatiq')
    time.sleep(0.05)  # gevent-patched: yields to the other greenlets
    probe.done('dramatiq')
