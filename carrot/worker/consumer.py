"""A consumer: one greenlet, one channel, one message at a time.

Each message received becomes a carrot.worker.delivery.Delivery, which runs it and settles it
exactly once. The consumer keeps its channel, reconnects when it breaks, and at a stop hands
back what it prefetched and waits until the recorder has settled what ran on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
from amqpstorm.exception import AMQPChannelError, AMQPError
from django.db import close_old_connections
from gevent.event import AsyncResult, Event
from gevent.pool import Group

from carrot import conf, lifecycle, message, registry
from carrot.amqp import SignallingChannel, close_quietly
from carrot.models import MessageLog
from carrot.worker import executor
from carrot.worker.delivery import Delivery
from carrot.worker.link import QueueLink, backoff_delay
from carrot.worker.recorder import Recorder

FailureCallback = Callable[[MessageLog, Any], None]

# How long an idle consumer waits before it looks up from its channel anyway. The service's
# stop, a failed connection, a closed channel and a cancelled consumer all wake it at once:
# this is a safety net, and 100 idle consumers looking up every second cost the worker
# about 0.4 % of a core.
IDLE_CHECK_SECONDS = 30.0


@dataclass
class Runtime:
    """What the service gives each consumer to work with."""

    queue: conf.Queue
    link: QueueLink
    recorder: Recorder
    stopping: Event
    consuming: Event
    #: The greenlets that follow up a recorded end (hooks, failure callbacks,
    #: ``task_finished``), so that a consumer takes its next message meanwhile; the
    #: service waits for them when it stops.
    followups: Group = field(default_factory=Group)


class Consumer:
    """Consumes from one queue on its own channel.

    The constructor keeps upstream django-carrot's signature, so a project's
    ``consumer_class`` subclass that calls ``add_failure_callback`` keeps working.
    """

    def __init__(
        self,
        host: conf.Broker,
        queue: str,
        logger: logging.Logger,
        name: str,
        durable: bool = True,
        queue_arguments: dict[str, Any] | None = None,
        exchange_arguments: dict[str, Any] | None = None,
    ) -> None:
        self.host = host
        self.queue = queue
        self.logger = logger
        self.name = name
        self.durable = durable
        self.queue_arguments = queue_arguments or {}
        self.exchange_arguments = exchange_arguments or {}
        self.failure_callbacks: list[FailureCallback] = []
        self.runtime: Runtime | None = None
        self.current_task: str | None = None  # the task running now, if any
        self._failures = 0  # consecutive failures to consume, for the reconnect backoff
        # Ends handed to the recorder whose messages it has not acknowledged yet.
        self._unsettled: set[AsyncResult] = set()

    def add_failure_callback(self, callback: FailureCallback) -> None:
        """Call ``callback(message_log, exception)`` whenever a task of this consumer fails."""
        self.failure_callbacks.append(callback)

    # -- the consuming loop ------------------------------------------------------------

    def run(self) -> None:
        """Consume until the service stops, reconnecting when the channel breaks."""
        runtime = self.runtime_or_fail()
        while not runtime.stopping.is_set():
            channel = runtime.link.open_channel(runtime.stopping)
            if channel is None:
                return
            try:
                self._consume(channel)
            except Exception as error:
                if runtime.stopping.is_set():
                    return
                delay = backoff_delay(self._failures)
                self._failures += 1
                if isinstance(error, AMQPError):
                    self.logger.warning('%s: channel lost (%s); reconnecting in %.1f s',
                                        self.name, error, delay)
                else:  # a fault in carrot itself: this consumer must not die of it
                    self.logger.exception('%s: consuming failed; starting again in %.1f s',
                                          self.name, delay)
                runtime.stopping.wait(delay)
            finally:
                close_quietly(channel)

    def _consume(self, channel: SignallingChannel) -> None:
        runtime = self.runtime_or_fail()
        runtime.link.ensure_declared(channel)
        channel.basic.qos(prefetch_count=runtime.queue.prefetch)
        runtime.link.arrive_and_wait()
        tag = channel.basic.consume(queue=self.queue, no_ack=False)
        runtime.consuming.set()
        self._failures = 0

        def wake(_stopping: Event) -> None:
            channel.wake()

        runtime.stopping.rawlink(wake)
        try:
            while not runtime.stopping.is_set():
                received = channel.wait_for_message(IDLE_CHECK_SECONDS)
                if received is None and not channel.consumer_tags:
                    # RabbitMQ cancelled us (the queue was deleted): declare it, start over.
                    runtime.link.forget_declared()
                    raise AMQPChannelError(f'RabbitMQ cancelled the consumer of {self.queue}')
                if received is not None:
                    self._process(Delivery(received, self))
        finally:
            runtime.stopping.unlink(wake)
        # Stopping: take no more, hand back what was prefetched but not started, and keep
        # the channel open until the recorder has acknowledged what ran on it.
        channel.basic.cancel(tag)
        while (prefetched := channel.wait_for_message(0)) is not None:
            Delivery(prefetched, self).requeue('the service is stopping', level=logging.DEBUG)
        gevent.wait(list(self._unsettled))

    def _process(self, delivery: Delivery) -> None:
        try:
            self.handle(delivery)
        except AMQPError:
            raise  # the channel: reconnect; RabbitMQ redelivers what was not settled
        except Exception as error:
            delivery.recover(error)
        recorded = delivery.recorded
        if recorded is not None and not recorded.ready():
            self._unsettled.add(recorded)
            recorded.rawlink(self._unsettled.discard)

    def runtime_or_fail(self) -> Runtime:
        if self.runtime is None:
            raise RuntimeError('The consumer was not given a runtime by the carrot service.')
        return self.runtime

    # -- one message -------------------------------------------------------------------

    def handle(self, delivery: Delivery) -> None:
        """Run one delivered message; its recorded end settles it (the hook to extend)."""
        delivery.process()

    def run_task(self, function: registry.Task, task_message: message.TaskMessage,
                 time_limit: float) -> executor.Outcome:
        """Run the task a delivery carries, naming it for the blocked-hub warning."""
        self.current_task = task_message.task
        try:
            return executor.execute(function, task_message, time_limit)
        finally:
            self.current_task = None

    def call_failure_callbacks(self, message_id: str, error: Any) -> None:
        if not self.failure_callbacks:
            return
        try:
            log = MessageLog.objects.using(lifecycle.database()).get(uuid=message_id)
        except Exception as lookup_error:  # a database error, or a replica lagging behind
            self.logger.error('%s: failure callbacks skipped: %s', self.name, lookup_error)
            return
        finally:
            close_old_connections()
        for callback in self.failure_callbacks:
            try:
                callback(log, error)
            except Exception:
                self.logger.exception('%s: failure callback %r raised', self.name, callback)
            finally:
                close_old_connections()
