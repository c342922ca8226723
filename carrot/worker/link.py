"""The connection a queue's consumers share, reopened with backoff when it breaks."""

from __future__ import annotations

import logging
import random
import time

from amqpstorm.exception import AMQPError
from gevent.event import Event
from gevent.lock import Semaphore

from carrot import broker, conf
from carrot.amqp import Connection, SignallingChannel, close_quietly
from carrot.exceptions import CarrotError

logger = logging.getLogger('carrot.worker')

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STARTING_TOGETHER_SECONDS = 10.0


def backoff_delay(attempt: int) -> float:
    """Exponential, capped, with jitter so a fleet of workers does not reconnect in step."""
    return min(BACKOFF_FIRST * 2.0 ** attempt, BACKOFF_MAX) * random.uniform(0.8, 1.2)


class QueueLink:
    """One connection per consumable queue, shared by that queue's consumers' channels.

    While the broker is away, one consumer tries to reconnect at a time and the others wait
    for the next try, so a hundred consumers do not hammer the broker (or the log).
    """

    def __init__(self, queue: conf.Queue) -> None:
        self.queue = queue
        self._connection: Connection | None = None
        self._lock = Semaphore()
        self._failures = 0
        self._retry_at = 0.0
        self._declared = False
        # Consumers with a channel ready to subscribe (see arrive_and_wait()).
        self._arrived = 0
        self._all_arrived = Event()

    def open_channel(self, stopping: Event) -> SignallingChannel | None:
        """A channel on a healthy connection, once there is one; None when stopping."""
        while not stopping.is_set():
            with self._lock:
                wait = self._retry_at - time.monotonic()
                if wait <= 0:
                    try:
                        return self._healthy_connection().channel()
                    except (CarrotError, AMQPError) as error:
                        delay = backoff_delay(self._failures)
                        self._failures += 1
                        self._retry_at = time.monotonic() + delay
                        logger.warning('Queue %s: broker unavailable (%s); reconnecting in '
                                       '%.1f s', self.queue.name, error, delay)
                        wait = delay
            stopping.wait(wait)
        return None

    def _healthy_connection(self) -> Connection:
        connection = self._connection
        if connection is not None and connection.is_open:
            try:
                connection.check_for_errors()
                return connection
            except AMQPError:
                pass
        if connection is not None:
            close_quietly(connection)
            self._connection = None
        connection = broker.connect(self.queue.broker, f'consumer of {self.queue.name}')
        self._declared = False
        if self._failures:
            logger.warning('Queue %s: reconnected to %s', self.queue.name, self.queue.broker)
        self._failures = 0
        self._connection = connection
        return connection

    def ensure_declared(self, channel: SignallingChannel) -> None:
        """Declare the queue once per connection (and again after ``forget_declared``)."""
        with self._lock:
            if not self._declared:
                broker.declare(channel, self.queue)
                self._declared = True

    def arrive_and_wait(self, timeout: float = STARTING_TOGETHER_SECONDS) -> None:
        """Wait (once, at start-up) until every consumer of the queue has its channel.

        Otherwise the first consumers to open a channel take a backlog's first messages
        while the others are still opening theirs, and compete with them for the hub.
        """
        if self._all_arrived.is_set():
            return
        self._arrived += 1
        if self._arrived >= self.queue.concurrency:
            self._all_arrived.set()
        self._all_arrived.wait(timeout)

    def forget_declared(self) -> None:
        """The queue may be gone (RabbitMQ cancelled a consumer): declare it again."""
        self._declared = False

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                close_quietly(self._connection)
                self._connection = None
