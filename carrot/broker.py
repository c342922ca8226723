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
from collections.abc import Mapping
from typing import Any

from amqpstorm.channel import Channel
from amqpstorm.exception import AMQPChannelError, AMQPConnectionError, AMQPError, AMQPMessageError
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp.header import ContentHeader

from carrot import conf, frames
from carrot.amqp import Connection, SignallingChannel
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
                except _ENCODING_ERRORS as error:  # pamqp's, before anything was written
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
                _close_quietly(channel)  # do not return it to the pool, nor leak it
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
                threading.Thread(target=_close_quietly, args=(channel,), daemon=True).start()
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

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()


# What pamqp raises for a value it cannot encode.
_ENCODING_ERRORS = (TypeError, ValueError, OverflowError, struct.error)


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
    except _ENCODING_ERRORS:
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



def _close_quietly(channel: Channel | None) -> None:
    try:
        if channel is not None and channel.is_open:
            channel.close()
    except AMQPError:
        pass
