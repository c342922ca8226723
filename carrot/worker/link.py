"""The connection a queue's consumers share, reopened with backoff when it breaks."""

from __future__ import annotations

import logging
import random

import gevent
from amqpstorm.exception import AMQPError
from gevent.lock import Semaphore

from carrot import broker, conf
from carrot.amqp import Connection, SignallingChannel
from carrot.exceptions import BrokerUnavailable

logger = logging.getLogger('carrot.worker')

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


def backoff_delay(attempt: int) -> float:
    """Exponential, capped, with jitter so a fleet of workers does not reconnect in step."""
    return min(BACKOFF_FIRST * 2.0 ** attempt, BACKOFF_MAX) * random.uniform(0.8, 1.2)


class QueueLink:
    """One connection per consumable queue, shared by that queue's consumers' channels."""

    def __init__(self, queue: conf.Queue) -> None:
        self.queue = queue
        self._connection: Connection | None = None
        self._lock = Semaphore()

    def open_channel(self, stopping: gevent.event.Event) -> SignallingChannel | None:
        """A channel on a healthy connection; waits with backoff while the broker is away.

        None when ``stopping`` is set while waiting.
        """
        attempt = 0
        while not stopping.is_set():
            try:
                connection = self._healthy_connection()
                return connection.channel()
            except (BrokerUnavailable, AMQPError) as error:
                delay = backoff_delay(attempt)
                logger.warning('Queue %s: broker unavailable (%s); retrying in %.1f s',
                               self.queue.name, error, delay)
                attempt += 1
                stopping.wait(delay)
        return None

    def _healthy_connection(self) -> Connection:
        with self._lock:
            connection = self._connection
            if connection is not None and connection.is_open:
                try:
                    connection.check_for_errors()
                    return connection
                except AMQPError:
                    pass
            if connection is not None:
                self._close(connection)
            connection = broker.connect(self.queue.broker, f'consumer of {self.queue.name}')
            try:
                with connection.channel() as channel:
                    broker.declare(channel, self.queue)
            except BaseException:
                self._close(connection)
                raise
            self._connection = connection
            return connection

    @staticmethod
    def _close(connection: Connection) -> None:
        try:
            connection.close()
        except AMQPError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._close(self._connection)
                self._connection = None
