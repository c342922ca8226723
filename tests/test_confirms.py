"""Publisher confirms on carrot's channels: each confirm credited to its own publish."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from amqpstorm.exception import AMQPMessageError
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from carrot.amqp import Connection
from tests.conftest import Broker


@pytest.fixture
def connection(broker: Broker) -> Iterator[Connection]:
    opened = Connection('127.0.0.1', 'guest', 'guest', 5672)
    yield opened
    opened.close()


def test_a_return_before_its_ack_is_raised_after_the_ack_not_during_the_wait(
        connection: Connection) -> None:
    """RabbitMQ sends a mandatory message's Basic.Return, then its content, then the Ack.

    The frames are fed to a real channel in that order, the Ack only once the publisher is
    waiting, which is the interleaving the reader thread can produce.
    """
    channel = connection.channel()
    channel.confirm_deliveries()
    ack = Basic.Ack(delivery_tag=1)
    with channel.rpc.lock:
        request = channel.rpc.register_request(['Basic.Ack', 'Basic.Nack'])
        channel.on_frame(Basic.Return(reply_code=312, reply_text='NO_ROUTE', exchange='',
                                      routing_key='nowhere'))
        channel.on_frame(ContentHeader(body_size=2, properties=Basic.Properties()))
        channel.on_frame(ContentBody(b'{}'))
        late = threading.Timer(0.05, channel.on_frame, [ack])
        late.start()
        try:
            result = channel.rpc.get_request(request, raw=True)
        finally:
            late.join()
    assert result is ack
    assert (channel.rpc._request, channel.rpc._response) == ({}, {})  # settled, not left over
    with pytest.raises(AMQPMessageError, match='NO_ROUTE'):
        channel.check_for_exceptions()
