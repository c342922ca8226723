"""Publisher confirms on carrot's channels: each confirm credited to its own publish."""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from amqpstorm.exception import AMQPMessageError
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from carrot import amqp
from carrot.amqp import Connection, SignallingChannel, SignallingRpc
from carrot.broker import get_publisher
from carrot.exceptions import CarrotConfigException
from carrot.utilities import get_host_from_name
from tests.conftest import Broker, wait_for


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


def test_a_publish_interrupted_after_its_frames_were_written_does_not_pool_its_channel(
        queue: str, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its confirm is still due: on a pooled channel it would confirm the next publish."""
    publisher = get_publisher()
    host = get_host_from_name(queue)
    publisher.send(host, b'{}', {'message_id': 'before'}, routing_key=queue)
    [link] = publisher._links.values()
    [channel] = link.idle

    # Interrupt the confirm wait once, as a gevent.Timeout or a ^C would: after the
    # frames were written.
    waits: list[str] = []
    wait = SignallingRpc._wait_for_request

    def interrupted_once(rpc: SignallingRpc, uuid: str, connection_adapter: Any = None) -> None:
        waits.append(uuid)
        if len(waits) == 1:
            raise KeyboardInterrupt
        wait(rpc, uuid, connection_adapter)

    monkeypatch.setattr(SignallingRpc, '_wait_for_request', interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        publisher.send(host, b'{}', {'message_id': 'interrupted'}, routing_key=queue)
    assert channel not in link.idle
    wait_for(lambda: channel.is_closed, timeout=10, what='the interrupted channel to close')

    # The publishes after it each get their own confirm: delivery tags 1, 2, 3 of a new channel.
    confirms: list[tuple[SignallingChannel, int]] = []
    get_request = SignallingRpc.get_request

    def recorded(rpc: SignallingRpc, uuid: str | None, *args: Any, **kwargs: Any) -> Any:
        result = get_request(rpc, uuid, *args, **kwargs)
        if getattr(result, 'name', None) == 'Basic.Ack':
            confirms.append((rpc._default_connection_adapter, result.delivery_tag))
        return result

    monkeypatch.setattr(SignallingRpc, 'get_request', recorded)
    for number in range(3):
        publisher.send(host, b'{}', {'message_id': f'after-{number}'}, routing_key=queue)
    [fresh] = link.idle
    assert fresh is not channel
    assert confirms == [(fresh, 1), (fresh, 2), (fresh, 3)]
    sent = [m.properties['message_id'] for m in broker.get_all(queue)]
    assert sent == ['before', 'interrupted', 'after-0', 'after-1', 'after-2']


@pytest.mark.parametrize('properties', [
    {'message_id': 'carrot encodes this'},
    {'message_id': 'amqpstorm encodes this', 'timestamp': datetime.datetime.now(datetime.UTC)},
])
def test_a_returned_message_leaves_nothing_in_its_pooled_channel(
        queue: str, broker: Broker, properties: dict[str, Any]) -> None:
    """The header and body frames that follow a Basic.Return are not kept forever."""
    host = get_host_from_name(queue)
    with pytest.raises(CarrotConfigException, match='could not route'):
        get_publisher().send(host, b'{}', properties, routing_key='no-queue-has-this-name')
    [link] = get_publisher()._links.values()
    [channel] = link.idle  # its confirm came: the channel is clean and reused
    assert channel._inbound is not None and len(channel._inbound) == 0
    get_publisher().send(host, b'{}', properties, routing_key=queue)
    assert broker.message_count(queue) == 1


@pytest.mark.timeout(30)
def test_a_channel_closed_by_the_broker_wakes_the_publisher_at_once(
        queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Publishing to a missing exchange: the broker's Channel.Close is what ends the wait.

    With the periodic error check a minute apart, only that frame can end it in time.
    """
    monkeypatch.setattr(amqp, 'ERROR_CHECK_INTERVAL', 60.0)
    host = get_host_from_name(queue)
    get_publisher().send(host, b'{}', {}, routing_key=queue)  # connected, channel open
    started = time.monotonic()
    with pytest.raises(CarrotConfigException, match='NOT_FOUND'):
        get_publisher().send(host, b'{}', {}, routing_key=queue,
                             exchange='carrot-test-no-such-exchange')
    assert time.monotonic() - started < 5
