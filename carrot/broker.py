"""Connections to RabbitMQ, the topology carrot declares, and the confirmed publisher.

Publishing reuses one connection per broker per process and a small pool of channels in
confirm mode, so concurrent publishers (threads, or greenlets in the worker) pipeline their
confirms instead of queueing behind one channel. Every message is persistent, mandatory
(an unroutable message is an error, not a silent drop) and confirmed by the broker.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from amqpstorm.channel import Channel
from amqpstorm.exception import AMQPChannelError, AMQPConnectionError, AMQPError, AMQPMessageError
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from carrot import conf, frames
from carrot.amqp import Connection, SignallingChannel, close_quietly
from carrot.confirms import Confirms
from carrot.exceptions import (
    BrokerUnavailable,
    CarrotConfigException,
    CarrotError,
    MessageNotEncodable,
)

logger = logging.getLogger('carrot.broker')

HEARTBEAT_SECONDS = 60
CONNECT_TIMEOUT_SECONDS = 10
PUBLISH_CHANNELS_PER_BROKER = 64
PRECONDITION_FAILED = 406
# How long a pipelined run of publishes waits for all its confirms.
PIPELINE_CONFIRM_SECONDS = 60


def connect(broker: conf.Broker, purpose: str) -> Connection:
    """A new connection to ``broker``; BrokerUnavailable (password masked) when it fails."""
    options: dict[str, Any] = {
        'virtual_host': broker.virtual_host,
        'heartbeat': HEARTBEAT_SECONDS,
        'timeout': CONNECT_TIMEOUT_SECONDS,
        'client_properties': {'connection_name': f'carrot {purpose} (pid {os.getpid()})'},
    }
    if broker.secure:
        import ssl  # only for amqps: the worker imports ssl after monkey-patching

        options['ssl'] = True
        options['ssl_options'] = {
            'context': ssl.create_default_context(),
            'server_hostname': broker.host,
        }
    try:
        return Connection(broker.host, broker.username, broker.password, broker.port, **options)
    except (AMQPError, OSError) as error:
        raise BrokerUnavailable(
            f'Cannot connect to RabbitMQ at {broker.display}: {_safe(error, broker)}. Check that '
            f"RabbitMQ is running and that settings.CARROT['default_broker'] (or the queue's "
            f"'host') points at it."
        ) from None


def _safe(error: BaseException, broker: conf.Broker) -> str:
    text = str(error) or type(error).__name__
    return text.replace(broker.password, '***') if broker.password else text


@contextmanager
def queue_channel(queue: conf.Queue, purpose: str, declare_queue: bool = True
                  ) -> Iterator[Channel]:
    """A channel on a connection of its own to ``queue``'s broker, ``queue`` declared unless
    ``declare_queue`` is False; closed, connection and all, on the way out (its
    unacknowledged messages go back to their queue)."""
    connection = connect(queue.broker, purpose)
    try:
        channel = connection.channel()
        if declare_queue:
            declare(channel, queue)
        yield channel
    finally:
        close_quietly(connection)


def declare(channel: Channel, queue: conf.Queue) -> None:
    """Declare ``queue``, its exchange and binding, and its dead-letter queue.

    The publisher declares too, so a message published before any worker ever ran is kept.
    """
    try:
        channel.queue.declare(queue.name, durable=queue.durable,
                              arguments=dict(queue.queue_arguments))
        channel.exchange.declare(queue.name, exchange_type='direct', durable=queue.durable,
                                 arguments=dict(queue.exchange_arguments))
        channel.queue.bind(queue.name, exchange=queue.name, routing_key=queue.name)
        channel.queue.declare(queue.dead_letter_queue, durable=True)
    except AMQPChannelError as error:
        if error.error_code == PRECONDITION_FAILED:
            raise CarrotConfigException(
                f'RabbitMQ already has a queue or exchange {queue.name!r} declared with other '
                f"options than settings.CARROT gives ({error}). Make 'durable', "
                f"'queue_arguments' and 'exchange_arguments' match the existing queue, or "
                f'delete it (rabbitmqctl delete_queue {queue.name}) so it can be recreated.'
            ) from None
        raise


class _BrokerLink:
    """One publishing connection with its pool of confirm-mode channels."""

    def __init__(self, broker: conf.Broker) -> None:
        self.broker = broker
        self.pid = os.getpid()
        self.connection = connect(broker, 'publisher')
        self.idle: list[SignallingChannel] = []
        self.declared: set[str] = set()
        self.known_exchanges: set[str] = set()  # exchanges seen to exist on this connection
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(PUBLISH_CHANNELS_PER_BROKER)

    @property
    def usable(self) -> bool:
        return self.pid == os.getpid() and self.connection.is_open

    def checkout(self) -> SignallingChannel:
        self.slots.acquire()
        try:
            with self.lock:
                while self.idle:
                    channel = self.idle.pop()
                    if channel.is_open:
                        return channel
            channel = self.connection.channel()
            channel.confirm_deliveries()
            return channel
        except BaseException:
            self.slots.release()
            raise

    def checkin(self, channel: SignallingChannel | None) -> None:
        if channel is not None and channel.is_open:
            with self.lock:
                self.idle.append(channel)
        self.slots.release()

    def close(self) -> None:
        if self.pid != os.getpid():
            return  # a forked child must not close its parent's socket
        try:
            self.connection.close()
        except AMQPError:
            pass


class Publisher:
    """Sends messages, confirmed, over reused connections and channels."""

    def __init__(self) -> None:
        self._links: dict[conf.Broker, _BrokerLink] = {}
        self._lock = threading.Lock()
        self._connecting: dict[conf.Broker, threading.Lock] = {}

    def _link(self, broker: conf.Broker) -> _BrokerLink:
        with self._lock:
            link = self._links.get(broker)
            if link is not None and link.usable:
                return link
            connecting = self._connecting.setdefault(broker, threading.Lock())
        # Connect holding only this broker's lock: publishers to other brokers, and to this
        # one once connected, do not wait for a slow connect.
        with connecting:
            with self._lock:
                link = self._links.get(broker)
                if link is not None and link.usable:
                    return link
            if link is not None:
                link.close()
            fresh = _BrokerLink(broker)
            with self._lock:
                self._links[broker] = fresh
            return fresh

    def confirm_channel(self, broker: conf.Broker, declare_queue: conf.Queue) -> SignallingChannel:
        """A confirm-mode channel of the caller's own on this process's connection to
        ``broker``, once ``declare_queue`` is declared on that connection.

        Raises BrokerUnavailable when the broker cannot be reached, CarrotConfigException
        when the queue exists with other options, and amqpstorm's error when the
        connection fails meanwhile. The caller closes the channel.
        """
        link = self._link(broker)
        self.declare_once(broker, declare_queue)
        channel = link.connection.channel()
        channel.confirm_deliveries()
        return channel

    def declare_once(self, broker: conf.Broker, queue: conf.Queue) -> None:
        """Declare ``queue`` unless this process's connection to ``broker`` has."""
        link = self._link(broker)
        if queue.name in link.declared:
            return
        channel: SignallingChannel | None = link.checkout()
        try:
            declare(cast(SignallingChannel, channel), queue)
            link.declared.add(queue.name)
        except BaseException:
            close_quietly(channel)
            channel = None
            raise
        finally:
            link.checkin(channel)

    def _drop(self, link: _BrokerLink) -> None:
        with self._lock:
            if self._links.get(link.broker) is link:
                del self._links[link.broker]
        link.close()

    def send(
        self,
        broker: conf.Broker,
        body: bytes,
        properties: Mapping[str, Any],
        routing_key: str,
        exchange: str = '',
        declare_queue: conf.Queue | None = None,
    ) -> None:
        """Publish one message and return once RabbitMQ has confirmed it.

        A lost connection is reopened once. Raises BrokerUnavailable when the broker cannot
        be reached or refuses the message, CarrotConfigException when it is unroutable, and
        MessageNotEncodable when its exchange, routing key or properties cannot be encoded.
        """
        last_error: Exception | None = None
        for _ in range(2):
            link = self._link(broker)
            declared_before = declare_queue is not None and declare_queue.name in link.declared
            channel: SignallingChannel | None = None
            held = False
            try:
                channel = link.checkout()
                held = True
                if declare_queue is not None and not declared_before:
                    declare(channel, declare_queue)
                    link.declared.add(declare_queue.name)
                try:
                    confirmed = channel.publish_confirmed(
                        body, routing_key, exchange=exchange, properties=properties,
                        mandatory=True,
                    )
                except ENCODING_ERRORS as error:  # pamqp's, before anything was written
                    raise _not_encodable(error, exchange, routing_key, properties) from error
            except AMQPMessageError as error:
                # Raised only once the confirm has arrived: the channel is clean and is pooled.
                if declared_before and declare_queue is not None and not exchange \
                        and routing_key in (declare_queue.name, declare_queue.dead_letter_queue):
                    # The queue was deleted since this connection declared it: again.
                    link.declared.discard(declare_queue.name)
                    last_error = error
                    continue
                raise CarrotConfigException(
                    f'RabbitMQ could not route the message to exchange {exchange!r} with routing '
                    f'key {routing_key!r} ({error}); no queue is bound there. Check the '
                    f'exchange and routing_key given to publish_message.'
                ) from None
            except AMQPChannelError as error:
                close_quietly(channel)  # do not return it to the pool, nor leak it
                channel = None
                if 'NOT_FOUND' in str(error):
                    raise CarrotConfigException(
                        f'RabbitMQ refused the publish: {error}. Declare the exchange first or '
                        f'publish to the default exchange.'
                    ) from None
                last_error = error
            except AMQPConnectionError as error:
                channel = None
                self._drop(link)
                last_error = error
            except CarrotError:
                raise  # before the publish was written (or on a channel RabbitMQ closed)
            except BaseException:
                # Interrupted (gevent.Timeout, GreenletExit, KeyboardInterrupt, …), perhaps
                # after the frames were written: the confirm still due would be credited to
                # the channel's next publish, so the channel must not go back to the pool.
                # Closed in the background: waiting here for the broker that was too slow
                # would hold the interruption up.
                threading.Thread(target=close_quietly, args=(channel,), daemon=True).start()
                channel = None
                raise
            else:
                if not confirmed:
                    raise BrokerUnavailable(
                        f'RabbitMQ at {broker.display} refused (nacked) the message; it was not '
                        f'stored. Check the broker log for resource alarms.'
                    )
                return
            finally:
                if held:
                    link.checkin(channel)
        raise BrokerUnavailable(
            f'Publishing to RabbitMQ at {broker.display} failed: '
            f'{_safe(last_error or Exception(), broker)}.'
        )

    def send_outgoing(self, broker: conf.Broker, item: Outgoing) -> None:
        """``send`` of an Outgoing message."""
        self.send(broker, item.body, item.properties, item.routing_key, item.exchange,
                  item.declare_queue)

    def send_many(self, broker: conf.Broker, outgoing: Sequence[Outgoing],
                  progress: SendProgress) -> None:
        """Publish every message on one channel, then wait once for all the confirms.

        ``progress`` (made for ``outgoing``) says, also after an interruption, which
        messages were confirmed, which were handed to the socket, and each one's error. A
        message the broker returned (no queue bound), or left unconfirmed because the
        channel or the connection failed, is sent again on its own with ``send``, which
        knows each of those cases; so is every message when the run cannot begin.
        """
        unavailable: BrokerUnavailable | None = None
        try:
            self._publish_pipelined(broker, outgoing, progress)
        except BrokerUnavailable as error:  # no connection: nothing was sent
            unavailable = error
        except (AMQPError, CarrotError):
            pass  # whatever is not confirmed is sent one by one below
        for index, item in enumerate(outgoing):
            if progress.confirmed[index] or progress.errors[index] is not None:
                continue
            if unavailable is not None:  # do not wait for the same refusal once a message
                progress.errors[index] = unavailable
                continue
            progress.written[index] = True  # perhaps stored from here on
            try:
                self.send_outgoing(broker, item)
            except BrokerUnavailable as error:
                progress.errors[index] = unavailable = error
            except CarrotError as error:
                progress.errors[index] = error
            else:
                progress.confirmed[index] = True

    def _publish_pipelined(self, broker: conf.Broker, outgoing: Sequence[Outgoing],
                           progress: SendProgress) -> None:
        link = self._link(broker)
        channel = link.checkout()
        try:
            for queue in {o.declare_queue.name: o.declare_queue for o in outgoing
                          if o.declare_queue is not None}.values():
                if queue.name not in link.declared:
                    declare(channel, queue)
                    link.declared.add(queue.name)
            missing = self._missing_exchanges(link, {o.exchange for o in outgoing})
            sent: list[int] = []  # the indices of what is encoded, in the order written
            confirms = channel.confirms_for()
            try:
                channel.publish_all_confirmed(
                    _encoded(channel, outgoing, missing, progress, sent), confirms,
                    PIPELINE_CONFIRM_SECONDS)
            finally:
                for position, index in enumerate(sent):
                    progress.written[index] = position < confirms.written
                    answer = confirms.outcome(position)
                    progress.confirmed[index] = answer == Confirms.ACK
                    if answer == Confirms.NACK:
                        progress.errors[index] = BrokerUnavailable(
                            f'RabbitMQ at {broker.display} refused (nacked) the message; it '
                            f'was not stored. Check the broker log for resource alarms.')
                if channel._inbound:  # a returned message's frames: no consumer takes them
                    channel._inbound.clear()
        except AMQPConnectionError:
            self._drop(link)
            link.checkin(None)
            raise
        except BaseException:
            # Closed in the background, as in ``send``: an unanswered confirm would be
            # credited to the channel's next publish.
            threading.Thread(target=close_quietly, args=(channel,), daemon=True).start()
            link.checkin(None)
            raise
        link.checkin(channel)

    def queue_counts(self, broker: conf.Broker, names: Sequence[str]) -> dict[str, QueueCounts]:
        """The messages ready in each queue of ``names`` and its consumers, by passive
        declares on this process's connection to ``broker`` (zeros, ``exists`` False, for a
        queue that does not exist). Raises BrokerUnavailable or amqpstorm's error when the
        broker cannot say."""
        link = self._link(broker)
        counts: dict[str, QueueCounts] = {}
        channel = link.connection.channel()
        try:
            for name in names:
                try:
                    declared = channel.queue.declare(name, passive=True)
                    counts[name] = QueueCounts(int(declared['message_count']),
                                               int(declared['consumer_count']))
                except AMQPChannelError as error:
                    if 'NOT_FOUND' not in str(error):
                        raise
                    counts[name] = QueueCounts(0, 0, exists=False)
                    close_quietly(channel)  # RabbitMQ closed the channel: open another
                    channel = link.connection.channel()
        finally:
            close_quietly(channel)
        return counts

    @staticmethod
    def _missing_exchanges(link: _BrokerLink, exchanges: set[str]) -> dict[str, CarrotError]:
        """The error of each of ``exchanges`` that does not exist, looked up once a connection.

        A publish to a missing exchange makes RabbitMQ close the channel, and the messages
        before it in a pipelined run, stored perhaps but not yet confirmed, would be sent
        again: so the run sends none to an exchange not known to exist.
        """
        unknown = exchanges - link.known_exchanges - {''}
        if not unknown:
            return {}
        missing: dict[str, CarrotError] = {}
        channel = link.connection.channel()
        try:
            for name in sorted(unknown):
                try:
                    channel.exchange.declare(name, passive=True)
                except AMQPChannelError as error:
                    if 'NOT_FOUND' not in str(error):
                        raise
                    missing[name] = CarrotConfigException(
                        f'RabbitMQ refused the publish: {error}. Declare the exchange first or '
                        f'publish to the default exchange.')
                    close_quietly(channel)
                    channel = link.connection.channel()
                else:
                    link.known_exchanges.add(name)
        finally:
            close_quietly(channel)
        return missing

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()


@dataclass(frozen=True)
class QueueCounts:
    """What a passive declare tells of a queue: its messages ready (not those delivered and
    unacknowledged) and its consumers."""

    ready: int
    consumers: int
    exists: bool = True


# What pamqp raises for a value it cannot encode.
ENCODING_ERRORS = (TypeError, ValueError, OverflowError, struct.error)


@dataclass(frozen=True)
class Outgoing:
    """One message for ``Publisher.send_many``: ``send``'s arguments."""

    body: bytes
    properties: Mapping[str, Any]
    routing_key: str
    exchange: str = ''
    declare_queue: conf.Queue | None = None


class SendProgress:
    """What became of each message of a ``send_many``, by position."""

    def __init__(self, count: int) -> None:
        #: RabbitMQ confirmed it: stored.
        self.confirmed = [False] * count
        #: Handed to the socket: perhaps stored, even when not confirmed.
        self.written = [False] * count
        #: Why it was not stored, when that is known.
        self.errors: list[CarrotError | None] = [None] * count


def publication(channel: SignallingChannel, item: Outgoing) -> bytes:
    """The frames of ``item``'s publish on ``channel``: carrot.frames', else pamqp's."""
    properties = dict(item.properties)
    properties.setdefault('content_encoding', 'utf-8')  # as amqpstorm's publish does
    encoded = frames.publish_frames(channel.channel_id, item.exchange, item.routing_key,
                                    item.body, properties, True,
                                    channel._carrot_connection.max_frame_size)
    if encoded is not None:
        return encoded
    size = channel._carrot_connection.max_frame_size - frames.FRAME_OVERHEAD
    parts = [
        pamqp_frame.marshal(commands.Basic.Publish(exchange=item.exchange,
                                                   routing_key=item.routing_key,
                                                   mandatory=True), channel.channel_id),
        pamqp_frame.marshal(ContentHeader(0, len(item.body),
                                          commands.Basic.Properties(**properties)),
                            channel.channel_id),
    ]
    for start in range(0, len(item.body), size):
        parts.append(pamqp_frame.marshal(ContentBody(item.body[start:start + size]),
                                         channel.channel_id))
    return b''.join(parts)


def _encoded(channel: SignallingChannel, outgoing: Sequence[Outgoing],
             missing: Mapping[str, CarrotError], progress: SendProgress,
             sent: list[int]) -> Iterator[tuple[str | None, bytes]]:
    """Each message of ``outgoing`` that can be sent, encoded as it is asked for: its id and
    its frames (its index appended to ``sent``). One that cannot gets its error in
    ``progress`` instead: its exchange is ``missing``, or it cannot be encoded."""
    for index, item in enumerate(outgoing):
        if item.exchange in missing:
            progress.errors[index] = missing[item.exchange]
            continue
        try:
            encoded = publication(channel, item)
        except ENCODING_ERRORS as error:  # pamqp's, for what carrot.frames leaves it
            progress.errors[index] = _not_encodable(
                error, item.exchange, item.routing_key, item.properties)
            continue
        sent.append(index)
        yield _message_id(item.properties), encoded


def _message_id(properties: Mapping[str, Any]) -> str | None:
    found = properties.get('message_id')
    return None if found is None else str(found)


def _not_encodable(error: BaseException, exchange: str, routing_key: str,
                   properties: Mapping[str, Any]) -> MessageNotEncodable:
    fields = _unencodable_fields(exchange, routing_key, properties)
    return MessageNotEncodable(
        f'The message cannot be encoded for RabbitMQ because of its '
        f'{", ".join(fields) or "properties"} ({type(error).__name__}: {error}); it was not '
        f'sent. Keep the exchange to '
        f'{frames.MAX_EXCHANGE_NAME} letters, digits, spaces and "-_.:@#,/+", the routing key '
        f'and string properties to {frames.MAX_SHORT_STRING} bytes of UTF-8, priority and '
        f'delivery_mode to their AMQP ranges, and header values to text, numbers, booleans, '
        f'None, lists and tables of them.'
    )


def _unencodable_fields(exchange: str, routing_key: str,
                        properties: Mapping[str, Any]) -> list[str]:
    """The names of what pamqp cannot encode, each tried alone (headers key by key)."""
    found = [name for name, value in (('exchange', exchange), ('routing_key', routing_key))
             if not _encodes(commands.Basic.Publish, {name: value})]
    for name, value in properties.items():
        if _encodes(commands.Basic.Properties, {name: value}):
            continue
        if name == 'headers' and isinstance(value, Mapping):
            keys = [f'headers[{key!r}]' for key, item in value.items()
                    if not _encodes(commands.Basic.Properties, {'headers': {key: item}})]
            found.extend(keys or ['headers'])
        else:
            found.append(name)
    return found


def _encodes(kind: type[commands.Basic.Publish] | type[commands.Basic.Properties],
             fields: dict[str, Any]) -> bool:
    try:
        built = kind(**fields)
        pamqp_frame.marshal(ContentHeader(0, 0, built)
                            if isinstance(built, commands.Basic.Properties) else built, 1)
    except ENCODING_ERRORS:
        return False
    return True


_publisher: Publisher | None = None
_publisher_lock = threading.Lock()


def get_publisher() -> Publisher:
    """The process's publisher, created on first use."""
    global _publisher
    with _publisher_lock:
        if _publisher is None:
            _publisher = Publisher()
        return _publisher
