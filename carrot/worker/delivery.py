"""One delivered message, from its bytes to the one way it is settled.

A Delivery holds what RabbitMQ delivered, the task message it decodes to, its start and how it
was settled. ``process()`` takes it through decode → start → run → finish; every path ends in
exactly one of ``ack()`` (once its end is recorded), ``requeue(why)`` or
``dead_letter(reason)``. A second settle raises AlreadySettled and sends nothing: RabbitMQ
would close the channel, and every message on it, for an unknown delivery tag.
"""

from __future__ import annotations

import enum
import functools
import itertools
import logging
from typing import TYPE_CHECKING, Any, cast

import gevent
from amqpstorm.exception import AMQPError
from amqpstorm.message import Message as Received
from django.db import DataError, IntegrityError, close_old_connections
from django.db import Error as DatabaseFault
from gevent.event import AsyncResult

from carrot import heartbeats, lifecycle, message, registry, rollups
from carrot import options as task_options
from carrot.amqp import SignallingChannel
from carrot.broker import get_publisher
from carrot.exceptions import (
    BadMessage,
    CarrotConfigException,
    CarrotError,
    MessageNotEncodable,
    TaskImportError,
    TaskNotRegistered,
)
from carrot.framework_tasks import FrameworkTask
from carrot.models import MessageLog
from carrot.worker.ends import end_of, expired_outcome
from carrot.worker.executor import Outcome
from carrot.worker.recorder import RecordingFailed, close_connection, retry_delay

if TYPE_CHECKING:
    from carrot.worker.consumer import Consumer, Runtime

# After a requeue because the database failed: do not spin on a database that is down.
REQUEUE_PAUSE_SECONDS = 1.0
# How long a fault in carrot waits for a start being written before writing FAILED over it;
# past this the message is handed back instead, as its row's last word is unknown.
START_WAIT_SECONDS = 60.0
# How long a re-sent copy waits before its start: longer than a first copy's start is held
# back (the recorder's START_HOLD_SECONDS) and written.
RESENT_WAIT_SECONDS = 1.0


class Settlement(enum.Enum):
    """How a delivery was settled."""

    ACKED = 'acknowledged'
    REQUEUED = 'requeued'
    DEAD_LETTERED = 'dead-lettered'


class AlreadySettled(RuntimeError):
    """A delivery was settled a second time: a bug in carrot, and nothing was sent for it."""


class Delivery:
    """One message a consumer received, its decoded task message, its start and its end."""

    def __init__(self, received: Received, consumer: Consumer) -> None:
        #: What the channel received: body, properties, delivery tag.
        self.received = received
        self.consumer = consumer
        #: The decoded task message, once ``process()`` has decoded it.
        self.task_message: message.TaskMessage | None = None
        #: The start being recorded, until the end is handed to the recorder.
        self.started: AsyncResult | None = None
        #: The end handed to the recorder; it settles the delivery once that is committed.
        self.recorded: AsyncResult | None = None
        #: How it was settled; None until then.
        self.settlement: Settlement | None = None
        #: The task it runs, once ``process()`` has resolved it.
        self.function: registry.Task | None = None
        heartbeats.held[consumer.queue] += 1  # until it is settled

    @property
    def properties(self) -> dict[str, Any]:
        return self.received.properties

    @property
    def message_id(self) -> str | None:
        return message.message_id_of(self.properties)

    @property
    def body(self) -> bytes:
        return message.body_of(self.received)

    # -- the three ways to settle it ---------------------------------------------------

    def ack(self) -> None:
        """Acknowledge it: its end is recorded, or it was completed before."""
        self._settle(Settlement.ACKED)
        self._send_ack()

    def requeue(self, why: str, level: int = logging.ERROR) -> None:
        """Hand it back to its queue, to run again here or in another worker."""
        self._settle(Settlement.REQUEUED)
        self.consumer.logger.log(level, '%s: message %s handed back to the queue: %s',
                                 self.consumer.name, self.message_id, why)
        self.received.nack(requeue=True)

    def dead_letter(self, reason: str) -> None:
        """Send it to its queue's dead-letter queue, ``reason`` in a header, and ack it.

        When the dead-letter queue cannot take it, what publishing raised is raised and the
        delivery stays unsettled.
        """
        self._check_unsettled(Settlement.DEAD_LETTERED)
        queue = self._runtime().queue
        try:
            self._publish_dead_letter(message.dead_letter_properties(self.properties, reason))
        except MessageNotEncodable as unencodable:
            # Another client's properties that cannot be sent again (a header that is not
            # UTF-8, say): dead-letter it with the few that say what it was.
            self._publish_dead_letter(
                message.minimal_dead_letter_properties(self.properties, reason, unencodable))
        self.consumer.logger.error('%s: message %s dead-lettered to %s: %s', self.consumer.name,
                                   self.message_id or '(no message_id)',
                                   queue.dead_letter_queue, reason)
        self._settle(Settlement.DEAD_LETTERED)
        self._send_ack()

    def _send_ack(self) -> None:
        tag = self.received.delivery_tag
        if tag is None:  # not a delivery at all: amqpstorm raises the error that says so
            self.received.ack()
            return
        # Consumers consume on the channels their QueueLink opens: carrot's own, whose ack
        # frame is encoded by carrot.frames (cheaper than pamqp).
        cast(SignallingChannel, self.received.channel).ack(tag)

    def _settle(self, how: Settlement) -> None:
        self._check_unsettled(how)
        self.settlement = how
        heartbeats.held[self.consumer.queue] -= 1

    def _check_unsettled(self, how: Settlement) -> None:
        if self.settlement is not None:
            raise AlreadySettled(f'message {self.message_id} was {self.settlement.value} '
                                 f'already; it cannot be {how.value} too')

    def _publish_dead_letter(self, properties: dict[str, Any]) -> None:
        queue = self._runtime().queue
        get_publisher().send(queue.broker, self.body, properties,
                             routing_key=queue.dead_letter_queue, declare_queue=queue)

    # -- decode → start → run → finish -------------------------------------------------

    def process(self) -> None:
        """Run the task this delivery carries; its recorded end settles it later."""
        runtime = self._runtime()
        try:
            task_message = message.decode(self.body, self.properties)
            function = registry.resolve(task_message.task)
            options = task_options.resolve(function, self.consumer.queue, task_message.options)
        except (BadMessage, TaskNotRegistered, TaskImportError, CarrotConfigException) as error:
            self.refuse(error)
            return
        self.task_message, self.function = task_message, function
        start = self._start_of(task_message)
        if start.resent:
            # Its first copy may be running somewhere with its start held back: give that
            # start time to be written, so that this copy sees it and does not run too.
            runtime.stopping.wait(RESENT_WAIT_SECONDS)
        if not self._tracked(task_message):
            self._run_untracked(function, task_message, start, options)
            return
        # Wait for the start to be recorded: a redelivered message may have completed
        # before its ack was lost, a re-sent copy may have another copy started, and while
        # the database is failing a task must not run without its IN_PROGRESS row.
        wait = (bool((self.received.method or {}).get('redelivered')) or task_message.resent
                or not runtime.recorder.healthy)
        try:
            self.started = runtime.recorder.record_start(start, urgent=wait)
        except RecordingFailed as error:
            self._requeue_and_pause(f'its start could not be recorded ({error})')
            return
        if wait and not self._may_run_after_start():
            return
        expired = expired_outcome(task_message)
        if expired is not None:
            self._finish(start, expired, None)  # its start and its end, written together
            return
        outcome = self.consumer.run_task(function, task_message, options.time_limit)
        self._finish(start, outcome, options)

    def _tracked(self, task_message: message.TaskMessage) -> bool:
        chosen = task_message.tracked
        return self._runtime().queue.tracked if chosen is None else chosen

    def _run_untracked(self, function: registry.Task, task_message: message.TaskMessage,
                       start: lifecycle.Start, options: task_options.TaskOptions) -> None:
        """No row before it runs, nor after it succeeds; a failure (an expiry too) gets its
        row, start and end written together, and is acked once that is committed."""
        expired = expired_outcome(task_message)
        outcome = expired or self.consumer.run_task(function, task_message, options.time_limit)
        if outcome.exception is None:
            self._count(start, outcome)
            self.ack()
            return
        self.started = AsyncResult()
        self.started.set_exception(RecordingFailed('an untracked task has no start row'))
        self._finish(start, outcome, None if expired else options)

    def _start_of(self, task_message: message.TaskMessage) -> lifecycle.Start:
        method = self.received.method or {}
        return lifecycle.Start(
            message_id=task_message.message_id, task=task_message.task,
            args=task_message.args, kwargs=task_message.kwargs, queue=self.consumer.queue,
            exchange=message.text(method.get('exchange')),
            routing_key=message.text(method.get('routing_key')),
            priority=task_message.priority,
            # A redelivered re-sent copy started the row itself before its worker was lost.
            resent=task_message.resent and not method.get('redelivered'),
            attempt=task_message.attempt, redelivered=bool(method.get('redelivered')),
            options=task_message.options or None, expires_at=task_message.expires_at,
        )

    def _may_run_after_start(self) -> bool:
        """Wait for the start being written; False when it settled the delivery instead."""
        runtime = self._runtime()
        started = cast(AsyncResult, self.started)
        # The recorder retries it until the database takes it; only a stop ends the wait.
        gevent.wait([started, runtime.stopping], count=1)
        if not started.ready():
            runtime.recorder.discard_start(started)
            self.requeue('the service is stopping and its start is not recorded yet')
            return False
        try:
            row = started.get()
        except RecordingFailed as error:
            self._requeue_and_pause(f'its start could not be recorded ({error})')
            return False
        if row.started_elsewhere:
            self.consumer.logger.info(
                '%s: task %s (%s) was sent again, but another copy of it started; '
                'acknowledging this copy without running it', self.consumer.name,
                self.task_message and self.task_message.task, self.message_id)
            self.ack()
            return False
        if row.superseded:
            self.consumer.logger.info(
                '%s: task %s (%s) was delivered again, or sent again, but the end of this '
                'attempt is recorded already; acknowledging this copy without running it',
                self.consumer.name, self.task_message and self.task_message.task,
                self.message_id)
            self.ack()
            return False
        if row.already_completed:
            self.consumer.logger.info(
                '%s: task %s (%s) was completed before; acknowledging the redelivery without '
                'running it again', self.consumer.name, self.task_message and
                self.task_message.task, self.message_id)
            self.ack()
            return False
        return True

    def _finish(self, start: lifecycle.Start, outcome: Outcome,
                options: task_options.TaskOptions | None) -> None:
        """Hand the end to the recorder, which settles the delivery once it is committed.

        ``options`` None: the task did not run (it expired), and is not retried.
        """
        self._count(start, outcome)
        started = cast(AsyncResult, self.started)
        attempt = self.task_message.attempt if self.task_message else 1
        end = end_of(start.message_id, outcome, options, attempt)
        settle = (self._settle_recorded if end.dead_letter is None
                  else functools.partial(self._dead_letter_recorded, end.dead_letter))
        try:
            self.recorded = self._runtime().recorder.record_finish(
                started, end.finish, settle=settle, start=start)
        except RecordingFailed as error:
            self._requeue_and_pause(f'its end could not be recorded ({error})')
            return
        self.started = None
        if end.finish.status == MessageLog.DELAYED:
            return  # to be run again
        hook = options.on_retries_exhausted if end.exhausted and options is not None else None
        callbacks = outcome.exception is not None and bool(self.consumer.failure_callbacks)
        framework_task = self.function if isinstance(self.function, FrameworkTask) else None
        if hook is not None or callbacks or framework_task is not None:
            self._runtime().followups.spawn(self._follow_up, self.recorded, start.message_id,
                                            outcome, hook, framework_task)

    def _count(self, start: lifecycle.Start, outcome: Outcome) -> None:
        """Count this attempt's end in the queue's rollups (``carrot.rollups``): every end,
        tracked or not, passes here. The wait runs from the message's publish time to the
        task's run (not to the start's recording); an expired task has no run time."""
        published = message.published_at_of(self.properties)
        began = outcome.ran_from if outcome.ran_from is not None else outcome.ended_at.timestamp()
        wait = began - published.timestamp() if published is not None else None
        rollups.tally.add(start.queue, outcome.ended_at.timestamp(), wait, outcome.ran_for,
                          outcome.exception is None)

    def _follow_up(self, recorded: AsyncResult, message_id: str, outcome: Outcome,
                   hook: task_options.OnRetriesExhausted | None,
                   framework_task: FrameworkTask | None) -> None:
        """Once the end is committed: the exhausted-retries hook, the failure callbacks,
        then ``task_finished``. In a greenlet of its own, so that the consumer takes its
        next message meanwhile; none of them can change how the delivery is settled."""
        try:
            recorded.get()
        except RecordingFailed:
            return  # handed back, to run again
        failure = outcome.exception
        if failure is not None:
            if hook is not None:
                self._call_exhausted_hook(hook, message_id, failure)
            self.consumer.call_failure_callbacks(message_id, failure)
        if framework_task is not None:
            try:
                framework_task.send_finished(message_id, outcome)
            except Exception:
                self.consumer.logger.exception('%s: task_finished of message %s not sent',
                                               self.consumer.name, message_id)

    def _call_exhausted_hook(self, hook: task_options.OnRetriesExhausted, message_id: str,
                             error: BaseException) -> None:
        try:
            hook(message_id, error)
        except Exception:
            self.consumer.logger.exception('%s: on_retries_exhausted of message %s raised',
                                           self.consumer.name, message_id)
        finally:
            close_old_connections()

    def _settle_recorded(self, recorded: bool) -> None:
        """Called by the recorder: ack a recorded end, hand back one that was not."""
        try:
            if recorded:
                self.ack()
            else:
                self.requeue('its end could not be recorded')
        except AMQPError as error:
            # The channel is gone; RabbitMQ redelivers the message, and a completed one is
            # then acknowledged without running again.
            self.consumer.logger.warning('%s: could not settle message %s: %s',
                                         self.consumer.name, self.message_id, error)

    def _dead_letter_recorded(self, reason: str, recorded: bool) -> None:
        """Called by the recorder for a task whose retries ran out or whose time limit
        stopped it: its FAILED row is written; the message goes to the dead-letter queue."""
        if not recorded:
            self._settle_recorded(False)
            return
        try:
            self.dead_letter(reason)
        except Exception as error:
            # Its row says FAILED and why; running it again would not help.
            self.consumer.logger.error('%s: message %s could not be dead-lettered (%s); '
                                       'acknowledging it, its row says FAILED',
                                       self.consumer.name, self.message_id, error)
            if self.settlement is None:
                self._settle_recorded(True)

    def _requeue_and_pause(self, why: str) -> None:
        self.requeue(why)
        gevent.sleep(REQUEUE_PAUSE_SECONDS)

    # -- what cannot run -----------------------------------------------------------------

    def refuse(self, error: CarrotError) -> None:
        """Dead-letter a message that cannot run, with a FAILED row where it has an id.

        The row is written first, so no message sits in the dead-letter queue without the
        row that says why; a redelivery (the dead-lettering failed) writes FAILED again.
        """
        reason = str(error)
        task = message.text((self.properties.get('headers') or {}).get(message.TYPE_HEADER))
        try:
            log = self._record_refused(task or '(unknown)', reason)
        except _Stopping:
            self.requeue(f'it cannot run ({reason}), and the service is stopping before its '
                         f'FAILED row could be written')
            return
        try:
            self.dead_letter(reason)
        except Exception as publish_error:
            if self.settlement is not None:
                raise  # dead-lettered; its ack failed with the channel, which RabbitMQ redelivers
            self._requeue_and_pause(f'it cannot run ({reason}) and the dead-letter queue '
                                    f'could not take it ({publish_error})')
            return
        if log is not None:
            self.consumer.call_failure_callbacks(log.uuid, error)

    def _record_refused(self, task: str, reason: str) -> MessageLog | None:
        """The FAILED row of a refused message, retried while the database is unreachable.

        None when there is no row to write, or the database refuses this one (the message is
        dead-lettered anyway, its reason in a header). Raises _Stopping when the service
        stops before the database is back.
        """
        stopping = self._runtime().stopping
        logger, name, message_id = self.consumer.logger, self.consumer.name, self.message_id
        for attempt in itertools.count():
            try:
                return lifecycle.record_refused(message_id=message_id, task=task,
                                                reason=reason, queue=self.consumer.queue)
            except (DataError, IntegrityError, TypeError, ValueError) as db_error:
                logger.error('%s: the FAILED row of message %s could not be written: %s',
                             name, message_id, db_error)
                return None
            except DatabaseFault as db_error:
                close_connection(lifecycle.database())
                delay = retry_delay(attempt)
                logger.warning('%s: the FAILED row of message %s could not be written (%s); '
                               'retrying in %.1f s', name, message_id, db_error, delay)
                if stopping.wait(delay):
                    raise _Stopping from db_error
            finally:
                close_old_connections()
        raise AssertionError('unreachable')

    def recover(self, error: Exception) -> None:
        """A fault in carrot itself while processing: log it, never lose the message."""
        self.consumer.logger.exception('%s: handling message %s failed', self.consumer.name,
                                       self.message_id)
        if self.settlement is not None or self.recorded is not None:
            return  # settled, or to be settled by the recorder
        if self.started is not None and not self._runtime().recorder.discard_start(self.started):
            # Its row is about to say FAILED; a start written later must not undo that, so
            # one that is being written now is let finish first.
            try:
                self.started.get(timeout=START_WAIT_SECONDS)
            except RecordingFailed:
                pass
            except gevent.Timeout:
                self._requeue_and_pause('carrot failed handling it, and its start is still '
                                        'being written')
                return
        self.refuse(CarrotError(
            f'carrot could not handle this message: {type(error).__name__}: {error}'))

    def _runtime(self) -> Runtime:
        return self.consumer.runtime_or_fail()


class _Stopping(Exception):
    """The service stopped while a consumer waited for the database."""
