"""Raw pika with publisher confirms: the floor for one confirmed publish at a time (c only)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

from common import AMQP_URL, Adapter

QUEUE = 'bench_pika'


class PikaAdapter(Adapter):
    name = 'pika'
    queues = (QUEUE,)
    has_worker = False
    confirm_description = (
        'BlockingChannel.confirm_delivery(), persistent messages, default exchange'
    )


ADAPTER = PikaAdapter()


def make_publisher(task: str, confirm: bool) -> Callable[[], None]:
    """Runs in the publisher subprocess."""
    import pika

    channel = pika.BlockingConnection(pika.URLParameters(AMQP_URL)).channel()
    if confirm:
        channel.confirm_delivery()
    channel.queue_declare(queue=QUEUE, durable=True)
    properties = pika.BasicProperties(delivery_mode=2, content_type='application/json')

    def publish() -> None:
        # A body of the size and shape a task message has; a fresh id like a real task.
        body = json.dumps({'task': task, 'id': str(uuid.uuid4()), 'args': [], 'kwargs': {}})
        channel.basic_publish(exchange='', routing_key=QUEUE, body=body, properties=properties)

    return publish
