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
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from amqpstorm.channel import CONTENT_FRAME, Channel
from amqpstorm.connection import Connection as AmqpstormConnection
from amqpstorm.exception import (
    AMQPChannelError,
    AMQPConnectionError,
    AMQPError,
    AMQPMessageError,
)
from amqpstorm.io import IO
from amqpstorm.message import Message
from amqpstorm.rpc import Rpc

from carrot.frames import ack_frame, publish_frames

logger = logging.getLogger('carrot.broker')

# How long a waiter sleeps at most before it looks again for a connection error that no
# frame announced (a socket that died quietly).
ERROR_CHECK_INTERVAL = 1.0
# Publishes written to the socket at a time by publish_all_confirmed: the broker's confirms
# for the first ones flow back while the next are written.
PIPELINE_WRITE = 200


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


class Returns:
    """The message ids of returned messages (mandatory, and no queue was bound), taken from
    the Basic.Return frames a channel receives, which come before the message's confirm."""

    def __init__(self) -> None:
        self.message_ids: set[str] = set()
        self._header_due = False
        self._body_left = 0

    def on_frame(self, frame_in: Any) -> bool:
        """Take a frame of a returned message; False for a frame that is not one."""
        if frame_in.name == 'Basic.Return':
            self._header_due = True
        elif frame_in.name == 'ContentHeader' and self._header_due:
            self._header_due = False
            self._body_left = frame_in.body_size
            message_id = frame_in.properties.message_id
            self.message_ids.add(message_id.decode() if isinstance(message_id, bytes)
                                 else str(message_id))
        elif frame_in.name == 'ContentBody' and self._body_left > 0:
            self._body_left -= len(frame_in.value)
        else:
            return False
        return True


class ConfirmListener(Protocol):
    """What takes a confirm-mode channel's answers instead of its RPC waiter."""

    def on_confirm(self, nacked: bool, delivery_tag: int, multiple: bool) -> None: ...

    def on_return_frame(self, frame_in: Any) -> bool: ...


class Confirms:
    """The broker's answers to a run of publishes sent without waiting, by delivery tag.

    Filled in by the connection's reader thread: ``ACK`` (stored), ``NACK`` (refused) or
    ``RETURNED`` (mandatory, and no queue was bound: a Basic.Return, which comes before the
    message's ack, names it by its ``message_id``); None while unanswered. The writer
    announces each part of the run with ``expect`` before writing it, and its end with
    ``complete``: ``answered`` is set once the run is complete and every publish answered.
    """

    ACK, NACK, RETURNED = 'ack', 'nack', 'returned'

    def __init__(self, first_tag: int) -> None:
        self.first_tag = first_tag
        self.message_ids: list[str | None] = []
        self.outcomes: list[str | None] = []
        self.unanswered = 0
        self.written = 0  # how many of the publishes went to the socket
        self._lowest = 0  # every outcome below this index is known
        self._complete = False
        self._returns = Returns()
        self._lock = threading.Lock()  # the writer expects while the reader fills in
        self.answered = threading.Event()

    def expect(self, message_ids: Sequence[str | None]) -> None:
        """The next publishes of the run, one per message id, about to be written."""
        with self._lock:
            self.message_ids.extend(message_ids)
            self.outcomes.extend([None] * len(message_ids))
            self.unanswered += len(message_ids)

    def complete(self) -> None:
        """No more publishes come in this run."""
        with self._lock:
            self._complete = True
            self._note_answered()

    def outcome(self, position: int) -> str | None:
        """The answer to the run's publish number ``position`` (from 0); None if none yet,
        or if it was never expected."""
        return self.outcomes[position] if position < len(self.outcomes) else None

    def on_confirm(self, nacked: bool, delivery_tag: int, multiple: bool) -> None:
        with self._lock:
            last = delivery_tag - self.first_tag
            for index in range(self._lowest if multiple else last, last + 1):
                if 0 <= index < len(self.outcomes) and self.outcomes[index] is None:
                    returned = self.message_ids[index] in self._returns.message_ids
                    self.outcomes[index] = (self.NACK if nacked else
                                            self.RETURNED if returned else self.ACK)
                    self.unanswered -= 1
            while self._lowest < len(self.outcomes) and self.outcomes[self._lowest] is not None:
                self._lowest += 1
            self._note_answered()

    def _note_answered(self) -> None:
        if self._complete and not self.unanswered:
            self.answered.set()

    def on_return_frame(self, frame_in: Any) -> bool:
        return self._returns.on_frame(frame_in)


class SignallingChannel(Channel):
    """A Channel that announces deliveries and can wait for the next one without polling."""

    def __init__(self, channel_id: int, connection: Any, rpc_timeout: float) -> None:
        super().__init__(channel_id, connection, rpc_timeout)
        self.rpc: SignallingRpc = SignallingRpc(self, timeout=rpc_timeout)
        self.delivery_arrived = threading.Event()
        self._carrot_connection: Connection = connection  # amqpstorm types it as its own
        self._published = 0  # publishes since confirm mode began: the last delivery tag
        #: Takes the answers to publishes instead of the RPC waiter, while set.
        self.confirm_listener: ConfirmListener | None = None

    def confirm_deliveries(self) -> Any:
        answer = super().confirm_deliveries()
        self._published = 0
        return answer

    def confirms_for(self) -> Confirms:
        """What will collect the answers to the next publishes."""
        return Confirms(self._published + 1)

    def publish_all_confirmed(self, publications: Iterable[tuple[str | None, bytes]],
                              confirms: Confirms, timeout: float) -> None:
        """Write every publish (its message id and its encoded frames), then wait once for
        all confirms.

        ``publications`` is read PIPELINE_WRITE at a time, each part written before the
        next is read: given a generator that encodes, the broker stores the first messages
        while the next are encoded. For a pooled confirm-mode channel whose earlier
        publishes are all confirmed; ``confirms`` (from ``confirms_for``) gets the answers,
        and counts in ``written`` the publishes handed to the socket (from the moment their
        write begins). Raises the channel's or the connection's error, or AMQPChannelError
        after ``timeout`` seconds, when not every answer came: the answers that did are in
        ``confirms`` all the same.
        """
        self.check_for_errors()
        with self.rpc.lock:
            self.confirm_listener = confirms
            try:
                remaining = iter(publications)
                while part := list(itertools.islice(remaining, PIPELINE_WRITE)):
                    confirms.expect([message_id for message_id, _ in part])
                    # Counted before the write: one cut short may have reached the broker.
                    confirms.written += len(part)
                    self._published += len(part)
                    self._carrot_connection.write_bytes(b''.join(frames for _, frames in part))
                confirms.complete()
                deadline = time.monotonic() + timeout
                while not confirms.answered.is_set():
                    _check_for_failure(self)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise AMQPChannelError(
                            f'RabbitMQ did not confirm {confirms.unanswered} publish(es) '
                            f'within {timeout:.0f} s')
                    confirms.answered.wait(min(left, ERROR_CHECK_INTERVAL))
            finally:
                self.confirm_listener = None

    @property
    def next_delivery_tag(self) -> int:
        """The delivery tag the broker will confirm the next publish on this channel by."""
        return self._published + 1

    def write_unconfirmed(self, publication: bytes) -> None:
        """Write one encoded publish and return without waiting for its confirm, which goes
        to ``confirm_listener`` by the tag ``next_delivery_tag`` said. One writer at a time."""
        self.check_for_errors()
        self._published += 1
        self._carrot_connection.write_bytes(publication)

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
                self._published += 1
                return bool(self.basic.publish(body, routing_key, exchange=exchange,
                                               properties=dict(properties),
                                               mandatory=mandatory))
            self.check_for_errors()
            with self.rpc.lock:
                confirm = self.rpc.register_request(['Basic.Ack', 'Basic.Nack'])
                self._carrot_connection.write_bytes(frames)
                self._published += 1
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
        confirms = self.confirm_listener
        if confirms is not None:
            if frame_in.name in ('Basic.Ack', 'Basic.Nack'):
                confirms.on_confirm(frame_in.name == 'Basic.Nack', frame_in.delivery_tag,
                                    frame_in.multiple)
                return
            if confirms.on_return_frame(frame_in):
                return
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


class ReadingIO(IO):
    """amqpstorm's socket handler, whose reader waits in ``recv`` instead of ``select``.

    amqpstorm's reader calls ``select`` (1 s timeout) before each ``recv``. Under gevent
    every such call registers and removes a watcher for the socket and arms a timer, once
    per read, which in a worker fed one message at a time is once per delivery. A blocking
    ``recv`` with the socket's timeout waits on the socket's own watcher, and wakes at once
    when ``close`` shuts the socket down. TLS keeps amqpstorm's loop: its reads hold the
    lock that ``close`` takes.
    """

    def _process_incoming_data(self) -> None:
        read = self._on_read_impl
        if self.use_ssl or read is None:
            super()._process_incoming_data()
            return
        try:
            while self._running.is_set():
                received = self._receive()  # b'' after a socket timeout
                if received:
                    self.data_in = read(self.data_in + received)
        except Exception as why:  # as amqpstorm's loop: the connection has failed
            self._exceptions.append(AMQPConnectionError(why))
            if self._running.is_set():
                logger.warning('Stopping the reader of a RabbitMQ connection: %s', why,
                               exc_info=True)
            self._running.clear()


class Connection(AmqpstormConnection):
    """An amqpstorm Connection whose channels wait by wake-up, not by polling."""

    def __init__(self, hostname: str, username: str, password: str, port: int = 5672,
                 **kwargs: Any) -> None:
        lazy = kwargs.pop('lazy', False)
        super().__init__(hostname, username, password, port, lazy=True, **kwargs)
        self._io = ReadingIO(self.parameters, exceptions=self._exceptions,
                             on_read_impl=self._read_buffer)
        if not lazy:
            self.open()

    def open(self) -> None:
        super().open()
        # amqpstorm's open() gives the connection a new list of errors after its reader
        # thread and poller were handed the old one: a socket the network or the broker
        # closed without a Connection.Close would go unseen until heartbeats fail.
        io = self._io
        io._exceptions = self._exceptions
        if io.poller is not None:
            io.poller._exceptions = self._exceptions

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


def close_quietly(opened: Channel | AmqpstormConnection | None) -> None:
    """Close a channel or a connection, whether or not RabbitMQ or the network did first."""
    try:
        if opened is not None:
            opened.close()
    except AMQPError:
        pass
