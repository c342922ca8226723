"""An idle consumer waits for its next message without looking up every second: whatever it
must act on ends its wait at once. Each wait here is a minute long, so only the wake-up can
end it within the few seconds a test allows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from amqpstorm.exception import AMQPConnectionError

from carrot.amqp import Connection, SignallingChannel
from tests.conftest import Broker, Worker, carrot_settings
from tests.proxy import Proxy

WAIT = 60.0  # what each test waits for at most: far longer than it allows


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    proxy = Proxy(('127.0.0.1', 5672))
    yield proxy
    proxy.close()


def _consuming(queue: str, port: int = 5672) -> tuple[Connection, SignallingChannel]:
    connection = Connection('127.0.0.1', 'guest', 'guest', port)
    channel = connection.channel()
    assert isinstance(channel, SignallingChannel)
    channel.basic.consume(queue=queue, no_ack=False)
    return connection, channel


def _meanwhile(action: Callable[[], object]) -> float:
    """Run ``action`` in half a second, once the wait has begun; when the wait began."""
    threading.Timer(0.5, action).start()
    return time.monotonic()


def test_a_connection_cut_without_a_word_ends_the_wait_at_once(
        queue: str, proxy: Proxy) -> None:
    """No Connection.Close comes: the reader's error is what wakes the consumer."""
    connection, channel = _consuming(queue, proxy.port)
    try:
        started = _meanwhile(proxy.cut)
        with pytest.raises(AMQPConnectionError):
            channel.wait_for_message(WAIT)
        assert time.monotonic() - started < 5
    finally:
        connection.close()


def test_a_deleted_queue_ends_its_consumers_wait_at_once(queue: str, broker: Broker) -> None:
    """RabbitMQ's Basic.Cancel: the wait returns None and the channel has no consumer left."""
    connection, channel = _consuming(queue)

    def delete() -> None:
        with broker.connection() as admin, admin.channel() as admin_channel:
            admin_channel.queue.delete(queue)

    try:
        started = _meanwhile(delete)
        assert channel.wait_for_message(WAIT) is None
        assert time.monotonic() - started < 5
        assert channel.consumer_tags == []
    finally:
        connection.close()


def test_a_message_still_arrives_as_soon_as_it_is_published(
        queue: str, broker: Broker) -> None:
    connection, channel = _consuming(queue)
    try:
        started = _meanwhile(lambda: broker.publish_raw(
            queue, b'{}', {'message_id': 'm-1', 'delivery_mode': 2}))
        received = channel.wait_for_message(WAIT)
        assert received is not None and received.properties['message_id'] == 'm-1'
        assert time.monotonic() - started < 5
    finally:
        connection.close()


def test_an_idle_service_stops_at_once(
        queue: str, start_worker: Callable[..., Worker]) -> None:
    """SIGTERM wakes every idle consumer: it does not wait for their next look up (30 s)."""
    worker = start_worker(carrot_settings(queue, concurrency=20))
    time.sleep(1.0)  # every consumer is in its wait
    started = time.monotonic()
    assert worker.stop(timeout=WAIT) == 0
    assert time.monotonic() - started < 15, worker.output
