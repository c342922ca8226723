"""amqpstorm, with its polling waits replaced by wake-ups.

amqpstorm waits for an RPC answer (a publisher confirm, a declare) and for a delivery by
sleeping 10 ms in a loop until its reader thread has put the frame in place. That caps one
channel at about 95 confirmed publishes/s and, with 100 idle consumers, keeps the hub busy.
Here the reader thread sets an event as each frame arrives, so a waiter sleeps until there is
something to read, and an idle channel costs nothing. Publishes and acks write frames encoded
by ``carrot.frames``. Everything else is amqpstorm's own.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Mapping
from typing import Any

from amqpstorm.channel import CONTENT_FRAME, Channel
from amqpstorm.connection import Connection as AmqpstormConnection
from amqpstorm.exception import AMQPChannelError, AMQPConnectionError, AMQPMessageError
from amqpstorm.message import Message
from amqpstorm.rpc import Rpc

from carrot.frames import ack_frame, publish_frames

# How long a waiter sleeps at most before it looks again for a connection error that no
# frame announced (a socket that died quietly).
ERROR_CHECK_INTERVAL = 1.0


class SignallingRpc(Rpc):
    """An Rpc whose waiter is woken by the arriving frame instead of polling."""

    def __init__(self, default_adapter: Any, timeout: float = 360) -> None:
        super().__init__(default_adapter, timeout=timeout)
        self.frame_arrived = threading.Event()
        self._request_ids = itertools.count()

    def register_request(self, valid_responses: list[str]) -> str:
        # A counter names a request as well as amqpstorm's uuid4 string, at a tenth the cost.
        request_id = str(next(self._request_ids))
        self._response[request_id] = collections.deque()
        for action in valid_responses:
            self._request[action] = request_id
        return request_id

    def on_frame(self, frame_in: Any) -> bool:
        delivered = super().on_frame(frame_in)
        if delivered:
            self.frame_arrived.set()
        return delivered

    def _wait_for_request(self, uuid: str, connection_adapter: Any = None) -> None:
        deadline = time.monotonic() + self._timeout
        while True:
            # Clear before looking, so a frame that lands after the look still wakes us.
            self.frame_arrived.clear()
            if self._response[uuid]:
                return
            _check_for_failure(connection_adapter)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._raise_rpc_timeout_error(uuid)
            self.frame_arrived.wait(min(remaining, ERROR_CHECK_INTERVAL))


def _check_for_failure(adapter: Any) -> None:
    """Raise if the connection failed or, for a channel, the channel was closed.

    Not the channel's ``check_for_errors``: that also pops and raises a stored Basic.Return,
    which arrives before its publish's confirm. Raised in the middle of a wait, it would leave
    the confirm to be credited to the channel's next publish.
    """
    if not isinstance(adapter, Channel):
        adapter.check_for_errors()
        return
    try:
        adapter._connection.check_for_errors()
    except AMQPConnectionError:
        adapter.set_state(adapter.CLOSED)  # as Channel.check_for_errors does
        raise
    if adapter.is_closed:
        closed = [error for error in adapter.exceptions
                  if isinstance(error, AMQPChannelError)
                  and not isinstance(error, AMQPMessageError)]
        raise closed[0] if closed else AMQPChannelError('channel closed')


class SignallingChannel(Channel):
    """A Channel that announces deliveries and can wait for the next one without polling."""

    def __init__(self, channel_id: int, connection: Any, rpc_timeout: float) -> None:
        super().__init__(channel_id, connection, rpc_timeout)
        self.rpc: SignallingRpc = SignallingRpc(self, timeout=rpc_timeout)
        self.delivery_arrived = threading.Event()
        self._carrot_connection: Connection = connection  # amqpstorm types it as its own

    def publish_confirmed(self, body: bytes, routing_key: str, exchange: str,
                          properties: Mapping[str, Any], mandatory: bool) -> bool:
        """Publish on this confirm-mode channel: True once the broker acks, False on a nack.

        Raises amqpstorm's AMQPMessageError when a mandatory message could not be routed,
        and its channel or connection error when those fail.
        """
        if 'content_encoding' not in properties:  # as amqpstorm's publish does
            properties = {**properties, 'content_encoding': 'utf-8'}
        frames = publish_frames(self.channel_id, exchange, routing_key, body, properties,
                                mandatory, self._carrot_connection.max_frame_size)
        try:
            if frames is None:
                return bool(self.basic.publish(body, routing_key, exchange=exchange,
                                               properties=dict(properties),
                                               mandatory=mandatory))
            self.check_for_errors()
            with self.rpc.lock:
                confirm = self.rpc.register_request(['Basic.Ack', 'Basic.Nack'])
                self._carrot_connection.write_bytes(frames)
                result = self.rpc.get_request(confirm, raw=True)
                if mandatory:
                    self.check_for_exceptions()  # a Basic.Return comes before the confirm
        except AMQPMessageError:
            # The returned message's header and body frames: a publisher channel never
            # consumes, so nothing else would take them out of the buffer.
            if self._inbound:
                self._inbound.clear()
            raise
        return getattr(result, 'name', None) == 'Basic.Ack'

    def ack(self, delivery_tag: int) -> None:
        """Acknowledge one delivery (amqpstorm's ``Message.ack``, without pamqp)."""
        self.check_for_errors()
        self._carrot_connection.write_bytes(ack_frame(self.channel_id, delivery_tag))

    def on_frame(self, frame_in: Any) -> None:
        super().on_frame(frame_in)
        if frame_in.name in CONTENT_FRAME:
            self.delivery_arrived.set()
        elif frame_in.name == 'Channel.Close':
            # Wake every waiter: a publish to a missing exchange fails now, not at its
            # next ERROR_CHECK_INTERVAL look.
            self.delivery_arrived.set()
            self.rpc.frame_arrived.set()

    def wait_for_message(self, timeout: float) -> Message | None:
        """The next delivered message, or None when none came within ``timeout`` seconds.

        Raises amqpstorm's channel or connection error when the channel has failed.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.delivery_arrived.clear()
            self.check_for_errors()
            if self._message_is_complete():
                message = self._build_message(auto_decode=False, message_impl=Message)
                if message is not None:
                    return message  # type: ignore[return-value]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.delivery_arrived.wait(min(remaining, ERROR_CHECK_INTERVAL))

    def _message_is_complete(self) -> bool:
        """Whether the first message in the inbound buffer has all of its body frames.

        amqpstorm would otherwise poll for the missing body frames of a large message.
        """
        inbound = self._inbound
        if inbound is None or len(inbound) < 2:
            return False
        header = inbound[1]
        size = getattr(header, 'body_size', None)
        if size is None:
            return True  # out of order: let amqpstorm log it and drop it
        received = 0
        for frame in list(inbound)[2:]:
            if frame.name != 'ContentBody':
                break
            received += len(frame.value)
            if received >= size:
                break
        return bool(received >= size)


class Connection(AmqpstormConnection):
    """An amqpstorm Connection whose channels wait by wake-up, not by polling."""

    def write_bytes(self, data: bytes) -> None:
        """Write frames that are encoded already."""
        self.heartbeat.register_write()
        self._io.write_to_socket(data)

    def channel(self, rpc_timeout: float = 60, lazy: bool = False) -> SignallingChannel:
        if self.is_closed:
            raise AMQPConnectionError('connection closed')
        with self.lock:
            channel_id = self._get_next_available_channel_id()
            channel = SignallingChannel(channel_id, self, rpc_timeout)
            self._channels[channel_id] = channel
        # Opened outside the connection's lock (amqpstorm opens inside it), so a hundred
        # consumers starting together open their channels in parallel.
        if not lazy:
            channel.open()
        return channel
