"""amqpstorm, with its polling waits replaced by wake-ups.

amqpstorm waits for an RPC answer (a publisher confirm, a declare) and for a delivery by
sleeping 10 ms in a loop until its reader thread has put the frame in place. That caps one
channel at about 95 confirmed publishes/s and, with 100 idle consumers, keeps the hub busy.
Here the reader thread sets an event as each frame arrives, so a waiter sleeps until there is
something to read, and an idle channel costs nothing. Publishes and acks write frames encoded
by ``carrot.frames``, deliveries are read by it, and ``acks_together()`` writes many acks at
once. The broker's answers to publishes are ``carrot.confirms``'. Everything else is
amqpstorm's own.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from amqpstorm.base import BaseMessage
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

from carrot.confirms import ConfirmListener, Confirms
from carrot.frames import (
    FRAME_BODY,
    FRAME_END_BYTE,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    FRAME_OVERHEAD,
    Body,
    Deliver,
    Header,
    ack_frame,
    body_size_of,
    decode_deliver,
    decode_properties,
    frame_start,
    publish_frames,
)

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


class SignallingChannel(Channel):
    """A Channel that announces deliveries and can wait for the next one without polling."""

    def __init__(self, channel_id: int, connection: Any, rpc_timeout: float) -> None:
        super().__init__(channel_id, connection, rpc_timeout)
        self.rpc: SignallingRpc = SignallingRpc(self, timeout=rpc_timeout)
        self.delivery_arrived = threading.Event()
        self._woken = False  # by wake(): wait_for_message returns
        self._carrot_connection: Connection = connection  # amqpstorm types it as its own
        self._published = 0  # publishes since confirm mode began: the last delivery tag
        #: Takes the answers to publishes instead of the RPC waiter, while set.
        self.confirm_listener: ConfirmListener | None = None
        # Of the delivery whose frames carrot decodes: is its header next, how many bytes
        # of its body are still to come.
        self._header_next = False
        self._body_left = 0

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
        """Acknowledge one delivery (amqpstorm's ``Message.ack``, without pamqp); inside
        ``acks_together()``, at the end of its block."""
        self.check_for_errors()
        frame = ack_frame(self.channel_id, delivery_tag)
        held = _held_acks.get(threading.get_ident())
        if held is None:
            self._carrot_connection.write_bytes(frame)
        else:
            held.append((self, frame))

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
        elif frame_in.name in ('Channel.Close', 'Basic.Cancel'):
            # A publish to a missing exchange fails now, not at its next
            # ERROR_CHECK_INTERVAL look; a consumer whose queue was deleted hears of it now.
            self.wake()

    def wake(self) -> None:
        """Wake whoever waits on this channel, to look at it again: ``wait_for_message``
        returns None if no message is there."""
        self._woken = True
        self.delivery_arrived.set()
        self.rpc.frame_arrived.set()

    def decode_frame(self, kind: int, data: bytes, start: int, end: int) -> Any | None:
        """The frame whose payload is ``data[start:end]`` as carrot.frames decodes it: a
        Basic.Deliver, and the content frames after one. None: pamqp decodes it."""
        if kind == FRAME_BODY and self._body_left > 0:
            self._body_left -= end - start
            return Body(data[start:end])
        self._body_left = 0
        if kind == FRAME_METHOD:
            method = decode_deliver(data, start, end)
            self._header_next = method is not None
            return None if method is None else Deliver(method)
        if kind == FRAME_HEADER and self._header_next:
            self._header_next = False
            self._body_left = body_size_of(data, start)
            properties = decode_properties(data, start, end)
            return None if properties is None else Header(self._body_left, properties)
        self._header_next = False
        return None

    def _build_message(self, auto_decode: bool, message_impl: type[BaseMessage],
                       ) -> BaseMessage | None:
        inbound = self._inbound
        if len(inbound) < 2 or not isinstance(inbound[0], Deliver):
            return super()._build_message(auto_decode, message_impl)
        deliver = inbound.popleft()
        header = inbound.popleft()
        if header.name != 'ContentHeader':
            logger.warning('Received an out-of-order frame: %s where a ContentHeader frame '
                           'was expected', header.name)
            return None
        # A header pamqp decoded (one with a timestamp, say) has its properties as an object.
        properties = (header.properties if isinstance(header, Header)
                      else dict(header.properties))
        return message_impl(channel=self, body=self._build_message_body(header.body_size),
                            method=deliver.method, properties=properties,
                            auto_decode=auto_decode)

    def wait_for_message(self, timeout: float) -> Message | None:
        """The next delivered message, or None when none came within ``timeout`` seconds
        or when ``wake()`` was called.

        Raises amqpstorm's channel or connection error when the channel has failed: a
        failure of its connection, a Channel.Close and a Basic.Cancel end the wait at once,
        so an idle consumer need not look up every second.
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
            if self._woken or remaining <= 0:
                self._woken = False
                return None  # woken: the caller looks at what it waits for
            self.delivery_arrived.wait(remaining)

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


class _Failures(list[Exception]):
    """A connection's list of errors that wakes every waiter on its channels when one is
    added: by the reader, the heartbeat checker or the Connection.Close of the broker."""

    def __init__(self, connection: Connection, errors: Iterable[Exception]) -> None:
        super().__init__(errors)
        self.connection = connection

    def append(self, error: Exception) -> None:
        super().append(error)
        for channel in list(getattr(self.connection, '_channels', {}).values()):
            if isinstance(channel, SignallingChannel):
                channel.wake()


class Connection(AmqpstormConnection):
    """An amqpstorm Connection whose channels wait by wake-up, not by polling."""

    _failures: _Failures

    @property
    def _exceptions(self) -> list[Exception]:
        return self._failures

    @_exceptions.setter
    def _exceptions(self, errors: list[Exception]) -> None:
        # amqpstorm gives the connection a new list at each open(), after its reader and
        # poller were handed the old one: all of them are kept on the one list, so a socket
        # closed without a Connection.Close is not left unseen until heartbeats fail.
        failures = self._failures = _Failures(self, errors)
        io = getattr(self, '_io', None)  # a slot of amqpstorm's, unset until its __init__
        if io is not None:
            io._exceptions = failures
            if io.poller is not None:
                io.poller._exceptions = failures

    def __init__(self, hostname: str, username: str, password: str, port: int = 5672,
                 **kwargs: Any) -> None:
        lazy = kwargs.pop('lazy', False)
        super().__init__(hostname, username, password, port, lazy=True, **kwargs)
        self._io = ReadingIO(self.parameters, exceptions=self._exceptions,
                             on_read_impl=self._read_buffer)
        if not lazy:
            self.open()

    def _read_buffer(self, data_in: bytes) -> bytes:
        """Hand each complete frame of ``data_in`` to its channel; what is left over.

        A delivery's frames are decoded by carrot.frames, the rest by amqpstorm and pamqp,
        frame by frame, in order. amqpstorm's own loop cut each frame off the front of the
        buffer, copying the rest of it every time.
        """
        at, size, channels = 0, len(data_in), self._channels
        while size - at >= FRAME_OVERHEAD:
            kind, channel_id, length = frame_start(data_in, at)
            end = at + FRAME_OVERHEAD - 1 + length  # where its end byte is
            if kind not in (FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT):
                return super()._read_buffer(data_in[at:])  # a protocol header, say
            if end >= size:
                break  # the rest of it is still to come
            channel = channels.get(channel_id) if channel_id else None
            frame_in = None
            if isinstance(channel, SignallingChannel) and data_in[end] == FRAME_END_BYTE:
                frame_in = channel.decode_frame(kind, data_in, end - length, end)
            if frame_in is None:
                _, _, frame_in = self._handle_amqp_frame(data_in[at:end + 1])
                if frame_in is None:  # amqpstorm logged why, as its own loop does
                    break
            at = end + 1
            self.heartbeat.register_read()
            if channel_id == 0:
                self._channel0.on_frame(frame_in)
            elif channel_id in channels:
                channels[channel_id].on_frame(frame_in)
        return data_in[at:]

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


# The acks each greenlet (each thread, unpatched) inside acks_together() holds back, by
# threading.get_ident(), in the order they were made.
_held_acks: dict[int, list[tuple[SignallingChannel, bytes]]] = {}


@contextmanager
def acks_together() -> Iterator[None]:
    """Hold back this greenlet's acks until the block ends, then write each connection's
    in one go: a round of the recorder settles up to a few hundred messages, and one socket
    write costs what one ack did. An ack for a channel closed meanwhile is dropped (RabbitMQ
    hands back what a closed channel held, and would close the connection for it).
    """
    me = threading.get_ident()
    if me in _held_acks:  # nested: the outer block writes them
        yield
        return
    held = _held_acks[me] = []
    try:
        yield
    finally:
        del _held_acks[me]
        _write_acks(held)


def _write_acks(held: list[tuple[SignallingChannel, bytes]]) -> None:
    by_connection: dict[Connection, list[bytes]] = {}
    for channel, frame in held:
        if channel.is_open:
            by_connection.setdefault(channel._carrot_connection, []).append(frame)
    for connection, frames in by_connection.items():
        try:
            connection.write_bytes(b''.join(frames))
        except Exception as error:  # RabbitMQ hands the messages back when it notices
            logger.warning('Writing %d acknowledgement(s) failed: %s', len(frames), error)


def close_quietly(opened: Channel | AmqpstormConnection | None) -> None:
    """Close a channel or a connection, whether or not RabbitMQ or the network did first."""
    try:
        if opened is not None:
            opened.close()
    except AMQPError:
        pass
