"""A consumer: one greenlet, one channel, one message at a time.

Every delivery ends in exactly one of: an ack after its end is recorded, a requeue (the
database refused to record it, or the service is stopping), or the dead-letter queue with a
FAILED row saying why (it cannot run at all). While the database is unreachable a consumer
waits for it rather than hand its message back.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import gevent
from amqpstorm.exception import AMQPChannelError, AMQPError
from amqpstorm.message import Message as Delivery
from django.db import DataError, IntegrityError, close_old_connections
from django.db import Error as DatabaseFault
from gevent.event import AsyncResult, Event

from carrot import conf, frames, lifecycle, message, registry
from carrot.amqp import SignallingChannel
from carrot.broker import get_publisher
from carrot.exceptions import (
    BadMessage,
    CarrotError,
    MessageNotEncodable,
    TaskImportError,
    TaskNotRegistered,
)
from carrot.models import MessageLog
from carrot.worker import executor
from carrot.worker.link import QueueLink, backoff_delay
from carrot.worker.recorder import Recorder, RecordingFailed, close_connection, retry_delay

FailureCallback = Callable[[MessageLog, Any], None]

# How often an idle consumer looks up from its channel to see whether it should stop.
IDLE_CHECK_SECONDS = 1.0
REQUEUE_PAUSE_SECONDS = 1.0
# How long a fault in carrot waits for a start being written before writing FAILED over it;
# past this the message is handed back instead, as its row's last word is unknown.
START_WAIT_SECONDS = 60.0


@dataclass
class Runtime:
    """What the service gives each consumer to work with."""

    queue: conf.Queue
    link: QueueLink
    recorder: Recorder
    stopping: Event
    consuming: Event


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
        self._settled = False
        # The start of the message being handled, until its end is handed to the recorder.
        self._start: AsyncResult | None = None
        # Ends handed to the recorder whose messages it has not acknowledged yet.
        self._unsettled: set[AsyncResult] = set()

    def add_failure_callback(self, callback: FailureCallback) -> None:
        """Call ``callback(message_log, exception)`` whenever a task of this consumer fails."""
        self.failure_callbacks.append(callback)

    # -- the consuming loop ------------------------------------------------------------

    def run(self) -> None:
        """Consume until the service stops, reconnecting when the channel breaks."""
        runtime = self._runtime()
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
                _close_quietly(channel)

    def _consume(self, channel: SignallingChannel) -> None:
        runtime = self._runtime()
        runtime.link.ensure_declared(channel)
        channel.basic.qos(prefetch_count=runtime.queue.prefetch)
        runtime.link.arrive_and_wait()
        tag = channel.basic.consume(queue=self.queue, no_ack=False)
        runtime.consuming.set()
        self._failures = 0
        while not runtime.stopping.is_set():
            delivery = channel.wait_for_message(IDLE_CHECK_SECONDS)
            if delivery is None and not channel.consumer_tags:
                # RabbitMQ cancelled us (the queue was deleted): declare it and start over.
                runtime.link.forget_declared()
                raise AMQPChannelError(f'RabbitMQ cancelled the consumer of {self.queue}')
            if delivery is not None:
                self._settled = False
                self._start = None
                try:
                    self.handle(delivery)
                except AMQPError:
                    raise
                except Exception as error:
                    self._recover(delivery, error)
        # Stopping: take no more, hand back what was prefetched but not started, and keep
        # the channel open until the recorder has acknowledged what ran on it.
        channel.basic.cancel(tag)
        while (prefetched := channel.wait_for_message(0)) is not None:
            self._nack(prefetched)
        gevent.wait(list(self._unsettled))

    def _runtime(self) -> Runtime:
        if self.runtime is None:
            raise RuntimeError('The consumer was not given a runtime by the carrot service.')
        return self.runtime

    # -- one message -------------------------------------------------------------------

    def handle(self, delivery: Delivery) -> None:
        """Run one delivered message and settle it."""
        runtime = self._runtime()
        properties = delivery.properties
        try:
            task_message = message.decode(_bytes(delivery.body), properties)
            function = registry.resolve(task_message.task)
        except (BadMessage, TaskNotRegistered, TaskImportError) as error:
            self.refuse(delivery, error)
            return

        method = delivery.method or {}
        # Wait for the start to be recorded: a redelivered message may have completed
        # before its ack was lost, and while the database is failing a task must not run
        # without its IN_PROGRESS row.
        wait_for_start = bool(method.get('redelivered')) or not runtime.recorder.healthy
        start = lifecycle.Start(
            message_id=task_message.message_id, task=task_message.task,
            args=task_message.args, kwargs=task_message.kwargs, queue=self.queue,
            exchange=message.text(method.get('exchange')),
            routing_key=message.text(method.get('routing_key')),
            priority=task_message.priority,
        )
        try:
            started = runtime.recorder.record_start(start, urgent=wait_for_start)
            self._start = started
        except RecordingFailed as error:
            self._requeue(delivery, f'its start could not be recorded ({error})')
            return
        if wait_for_start:
            # The recorder retries it until the database takes it; only a stop ends the wait.
            gevent.wait([started, runtime.stopping], count=1)
            if not started.ready():
                runtime.recorder.discard_start(started)
                self._hand_back(delivery, 'the service is stopping and its start is not '
                                          'recorded yet')
                return
            try:
                already_completed = started.get().already_completed
            except RecordingFailed as error:
                self._requeue(delivery, f'its start could not be recorded ({error})')
                return
            if already_completed:
                self.logger.info('%s: task %s (%s) was completed before; acknowledging the '
                                 'redelivery without running it again', self.name,
                                 task_message.task, task_message.message_id)
                self._ack(delivery)
                return

        self.current_task = task_message.task
        try:
            outcome = executor.execute(function, task_message)
        finally:
            self.current_task = None
        # The recorder acknowledges the message once this end is committed (or hands it
        # back when it cannot be); meanwhile this consumer takes its next message.
        try:
            recorded = runtime.recorder.record_finish(started, lifecycle.Finish(
                message_id=task_message.message_id, status=outcome.status,
                output=outcome.output, log=outcome.log, exception=outcome.exception_text,
                traceback=outcome.traceback, at=outcome.ended_at,
            ), settle=lambda ok: self._settle_recorded(delivery, ok), start=start)
        except RecordingFailed as error:
            self._requeue(delivery, f'its end could not be recorded ({error})')
            return
        self._settled = True
        self._start = None
        self._unsettled.add(recorded)
        recorded.rawlink(self._unsettled.discard)
        if outcome.exception is not None and self.failure_callbacks:
            try:
                recorded.get()
            except RecordingFailed:
                return
            self._call_failure_callbacks(task_message.message_id, outcome.exception)

    def _settle_recorded(self, delivery: Delivery, recorded: bool) -> None:
        """Called by the recorder: ack a recorded message, hand back one that was not."""
        try:
            if recorded:
                _ack(delivery)
            else:
                self.logger.error('%s: message %s handed back to the queue: its end could not '
                                  'be recorded', self.name, delivery.properties.get('message_id'))
                delivery.nack(requeue=True)
        except AMQPError as error:
            # The channel is gone; RabbitMQ redelivers the message, and a completed one is
            # then acknowledged without running again.
            self.logger.warning('%s: could not settle message %s: %s', self.name,
                                delivery.properties.get('message_id'), error)

    def refuse(self, delivery: Delivery, error: CarrotError) -> None:
        """Dead-letter a message that cannot run, with a FAILED row where it has an id.

        The row is written first, so no message sits in the dead-letter queue without the
        row that says why; a redelivery (the dead-lettering failed) writes FAILED again.
        """
        runtime = self._runtime()
        reason = str(error)
        message_id = message.message_id_of(delivery.properties)
        task = message.text((delivery.properties.get('headers') or {}).get(message.TYPE_HEADER))
        try:
            log = self._record_refused(message_id, task or '(unknown)', reason)
        except _Stopping:
            self._hand_back(delivery, f'it cannot run ({reason}), and the service is stopping '
                                      f'before its FAILED row could be written')
            return
        properties = _dead_letter_properties(delivery.properties, reason)
        try:
            try:
                self._dead_letter(delivery, properties)
            except MessageNotEncodable as unencodable:
                # Another client's properties that cannot be sent again (a header that is
                # not UTF-8, say): dead-letter it with the few that say what it was.
                self._dead_letter(delivery,
                                  _minimal_properties(delivery.properties, reason, unencodable))
        except Exception as publish_error:
            self._requeue(delivery, f'it cannot run ({reason}) and the dead-letter queue '
                                    f'could not take it ({publish_error})')
            return
        self.logger.error('%s: message %s dead-lettered to %s: %s', self.name,
                          message_id or '(no message_id)', runtime.queue.dead_letter_queue, reason)
        if log is not None:
            self._call_failure_callbacks(log.uuid, error)
        self._ack(delivery)

    def _record_refused(self, message_id: str | None, task: str,
                        reason: str) -> MessageLog | None:
        """The FAILED row of a refused message, retried while the database is unreachable.

        None when there is no row to write, or the database refuses this one (the message is
        dead-lettered anyway, its reason in a header). Raises _Stopping when the service
        stops before the database is back.
        """
        stopping = self._runtime().stopping
        for attempt in itertools.count():
            try:
                return lifecycle.record_refused(message_id=message_id, task=task,
                                                reason=reason, queue=self.queue)
            except (DataError, IntegrityError, TypeError, ValueError) as db_error:
                self.logger.error('%s: the FAILED row of message %s could not be written: %s',
                                  self.name, message_id, db_error)
                return None
            except DatabaseFault as db_error:
                close_connection(lifecycle.database())
                delay = retry_delay(attempt)
                self.logger.warning('%s: the FAILED row of message %s could not be written '
                                    '(%s); retrying in %.1f s', self.name, message_id,
                                    db_error, delay)
                if stopping.wait(delay):
                    raise _Stopping from db_error
            finally:
                close_old_connections()
        raise AssertionError('unreachable')

    def _dead_letter(self, delivery: Delivery, properties: dict[str, Any]) -> None:
        runtime = self._runtime()
        get_publisher().send(runtime.queue.broker, _bytes(delivery.body), properties,
                             routing_key=runtime.queue.dead_letter_queue,
                             declare_queue=runtime.queue)

    def _recover(self, delivery: Delivery, error: Exception) -> None:
        """A fault in carrot itself while handling a message: log it, never lose the message."""
        self.logger.exception('%s: handling message %s failed', self.name,
                              delivery.properties.get('message_id'))
        if self._start is not None and not self._runtime().recorder.discard_start(self._start):
            # Its row is about to say FAILED; a start written later must not undo that, so
            # one that is being written now is let finish first.
            try:
                self._start.get(timeout=START_WAIT_SECONDS)
            except RecordingFailed:
                pass
            except gevent.Timeout:
                if not self._settled:
                    self._requeue(delivery, 'carrot failed handling it, and its start is '
                                            'still being written')
                return
        if not self._settled:
            self.refuse(delivery, CarrotError(
                f'carrot could not handle this message: {type(error).__name__}: {error}'))

    def _ack(self, delivery: Delivery) -> None:
        _ack(delivery)
        self._settled = True

    def _nack(self, delivery: Delivery) -> None:
        delivery.nack(requeue=True)
        self._settled = True

    def _requeue(self, delivery: Delivery, why: str) -> None:
        self._hand_back(delivery, why)
        gevent.sleep(REQUEUE_PAUSE_SECONDS)  # do not spin on a database that is down

    def _hand_back(self, delivery: Delivery, why: str) -> None:
        self.logger.error('%s: message %s handed back to the queue: %s', self.name,
                          delivery.properties.get('message_id'), why)
        self._nack(delivery)

    def _call_failure_callbacks(self, message_id: str, error: Any) -> None:
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


class _Stopping(Exception):
    """The service stopped while a consumer waited for the database."""


def _bytes(body: Any) -> bytes:
    return body if isinstance(body, bytes) else str(body).encode()


def _close_quietly(channel: SignallingChannel) -> None:
    try:
        if channel.is_open:
            channel.close()
    except AMQPError:
        pass


def _ack(delivery: Delivery) -> None:
    """``delivery.ack()``, with the frame encoded by carrot.frames (cheaper than pamqp)."""
    tag = delivery.delivery_tag
    if tag is None:  # not a delivery at all: amqpstorm raises the error that says so
        delivery.ack()
        return
    # Consumers consume on the channels their QueueLink opens: carrot's own.
    cast(SignallingChannel, delivery.channel).ack(tag)


def _dead_letter_properties(delivered: dict[str, Any], reason: str) -> dict[str, Any]:
    """The delivery's properties for the dead-letter queue, with the reason in a header.

    Kept as they came, but persistent, not expiring, not claiming another user id (RabbitMQ
    closes the channel of a publish whose user_id is not its own), and without the
    deprecated cluster_id, which amqpstorm refuses to send.
    """
    properties = dict(delivered)
    for dropped in ('expiration', 'user_id', 'cluster_id'):
        properties.pop(dropped, None)
    properties['delivery_mode'] = message.PERSISTENT
    headers = dict(properties.get('headers') or {})
    headers[message.DEAD_REASON_HEADER] = reason[:1000]
    properties['headers'] = headers
    return properties


def _minimal_properties(delivered: dict[str, Any], reason: str,
                        error: Exception) -> dict[str, Any]:
    """What identifies a message, as text, for one whose own properties cannot be sent."""
    headers = delivered.get('headers') or {}
    properties: dict[str, Any] = {
        'delivery_mode': message.PERSISTENT,
        'headers': {
            message.TYPE_HEADER: message.text(headers.get(message.TYPE_HEADER)),
            message.DEAD_REASON_HEADER: (
                f'{reason} (its properties could not be sent again, only these: '
                f'{type(error).__name__}: {error})')[:1000],
        },
    }
    message_id = message.message_id_of(delivered)
    if message_id is not None and len(message_id.encode()) <= frames.MAX_SHORT_STRING:
        properties['message_id'] = message_id
    return properties
