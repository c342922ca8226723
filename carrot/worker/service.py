"""The carrot service: a gevent pool of consumer greenlets, the scheduler greenlet, the resender,
the releaser of delayed tasks, the pruner, the heartbeat and the rollups
(``carrot.worker.rounds``), their lifecycle and signals.

TERM or INT: stop taking messages, let running tasks finish within the shutdown timeout,
hand back the rest, exit 0. A second signal stops at once; RabbitMQ redelivers whatever was
not acknowledged.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import gevent
from django.db import DatabaseError, connections
from gevent import events
from gevent.event import Event
from gevent.pool import Group, Pool

from carrot import conf, heartbeats, outbox, rollups
from carrot.broker import get_publisher
from carrot.consumer import load_consumer_class
from carrot.worker.consumer import Consumer, Runtime
from carrot.worker.link import QueueLink
from carrot.worker.recorder import Recorder
from carrot.worker.rounds import heartbeat, pruner, releaser, resender, rollup
from carrot.worker.scheduler import Scheduler

logger = logging.getLogger('carrot.worker')

READY_LINE = 'carrot service ready'


@dataclass
class _Worker:
    consumer: Consumer
    greenlet: gevent.Greenlet


class Service:
    def __init__(self, settings: conf.CarrotSettings, shutdown_timeout: float,
                 scheduler: bool = True,
                 on_ready: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.shutdown_timeout = shutdown_timeout
        self.with_scheduler = scheduler
        self.scheduler: gevent.Greenlet | None = None
        self.resender: gevent.Greenlet | None = None
        self.releaser: gevent.Greenlet | None = None
        self.pruner: gevent.Greenlet | None = None
        self.heartbeat: gevent.Greenlet | None = None
        self.rollups: gevent.Greenlet | None = None
        self.on_ready = on_ready  # told the ready line (carrot_daemon start waits for it)
        self.stopping = Event()
        self.stop_now = Event()
        self.recorder = Recorder()
        self.links: list[QueueLink] = []
        self.workers: list[_Worker] = []
        self.pool = Pool()
        self.followups = Group()  # what follows a recorded end up (see Runtime.followups)

    def run(self) -> int:
        """Consume until a signal says stop; the exit status."""
        gevent.signal_handler(signal.SIGTERM, self.request_stop)
        gevent.signal_handler(signal.SIGINT, self.request_stop)
        events.subscribers.append(self._on_hub_event)
        self.recorder.start()
        consuming = []
        for queue in self.settings.queues:
            if not queue.consumable:
                continue
            link = QueueLink(queue)
            self.links.append(link)
            cls = load_consumer_class(queue.consumer_class)
            for index in range(queue.concurrency):
                consumer = cls(queue.broker, queue.name, logging.getLogger('carrot'),
                               f'{queue.name}-{index + 1}', queue.durable,
                               dict(queue.queue_arguments), dict(queue.exchange_arguments))
                ready = Event()
                consumer.runtime = Runtime(queue=queue, link=link, recorder=self.recorder,
                                           stopping=self.stopping, consuming=ready,
                                           followups=self.followups)
                consuming.append(ready)
                self.workers.append(_Worker(consumer, self.pool.spawn(consumer.run)))
        if self.with_scheduler:
            self.scheduler = gevent.spawn(Scheduler(self.stopping).run)
        self.heartbeat = gevent.spawn(heartbeat(
            self.stopping, [f'{q.name}×{q.concurrency}' for q in self.settings.queues
                            if q.consumable], self.with_scheduler).run)
        self.rollups = gevent.spawn(rollup(self.stopping).run)
        self.resender = gevent.spawn(resender(self.stopping).run)
        self.releaser = gevent.spawn(releaser(self.stopping).run)
        if self.settings.retention.prune_hourly:
            self.pruner = gevent.spawn(pruner(self.stopping).run)
        gevent.spawn(self._announce_ready, consuming)
        self.stopping.wait()
        self._shut_down()
        return 0

    def _announce_ready(self, consuming: list[Event]) -> None:
        for ready in consuming:
            ready.wait()
        queues = ', '.join(f'{q.name}×{q.concurrency}' for q in self.settings.queues
                           if q.consumable)
        line = (f'{READY_LINE}: consuming {queues or "no queue"}; '
                f'scheduler {"on" if self.with_scheduler else "off"}')
        logger.info(line)
        if not logger.isEnabledFor(logging.INFO):
            print(line, flush=True)  # always on standard output, once
        if self.on_ready is not None:
            self.on_ready(line)

    def _on_hub_event(self, event: object) -> None:
        # Called in gevent's monitor thread while the hub is still blocked.
        if not isinstance(event, events.EventLoopBlocked):
            return
        task, culprit = self._blocking(event.greenlet)
        if task:
            logger.warning(
                'The gevent hub was blocked for more than %.1f s by task %s (in %s): while a '
                'task computes without waiting on I/O, every other task and the broker '
                'heartbeats stand still. Move CPU-bound work to a subprocess or a queue of its '
                'own.', event.blocking_time, task, culprit)
        else:
            logger.warning(
                'The gevent hub was blocked for more than %.1f s by %s: every task and the '
                'broker heartbeats stand still meanwhile.', event.blocking_time, culprit)

    def _blocking(self, greenlet: object) -> tuple[str | None, str]:
        """The task running in ``greenlet``, if any, and what the greenlet is."""
        for worker in self.workers:
            if worker.greenlet is greenlet:
                task = worker.consumer.current_task  # read once: the task may end meanwhile
                return task, f'consumer {worker.consumer.name}'
        if greenlet is self.scheduler:
            return None, 'the scheduler'
        if greenlet is self.resender:
            return None, 'the resender'
        if greenlet is self.releaser:
            return None, 'the releaser of delayed tasks'
        if greenlet is self.pruner:
            return None, 'the pruner of old task rows'
        if greenlet is self.heartbeat:
            return None, 'the heartbeat'
        if greenlet is self.rollups:
            return None, 'the rollups, writing the queues\' counts of task ends'
        if greenlet is self.recorder.greenlet:
            return None, 'the recorder, writing task rows to the database'
        if greenlet in self.followups:
            return None, ('the follow-up of a task\'s end (on_retries_exhausted, a failure '
                          'callback or a task_finished receiver)')
        return None, 'a greenlet'

    def _forget_heartbeat(self) -> None:
        try:
            heartbeats.forget()
        except DatabaseError as error:  # it goes stale, and the monitor says so
            logger.warning('Could not delete this service\'s heartbeat: %s', error)

    def _last_rollups(self) -> None:
        """Write the counts of the tasks that ended since the rollups round's last flush.

        The round ends by itself once its flush in progress is done (killed inside it, its
        transaction could hold the rows this flush writes, or write its counts twice); one
        still stuck in the database after the wait is left alone, its counts with it.
        """
        if self.rollups is not None:
            self.rollups.join(timeout=1.0 if self.stop_now.is_set() else 10.0)
            if not self.rollups.dead:
                logger.warning('The counts of the last task ends are not written: the '
                               'database did not answer')
                return
        try:
            rollups.flush()
        except DatabaseError as error:
            logger.warning('Could not write the last counts of task ends: %s', error)

    def request_stop(self) -> None:
        if self.stopping.is_set():
            logger.warning('Second stop signal: stopping now; unfinished tasks will be '
                           'delivered again')
            self.stop_now.set()
            return
        running = sum(1 for w in self.workers if w.consumer.current_task)
        logger.warning('Stopping: no new tasks; waiting up to %.0f s for %d running task(s)',
                       self.shutdown_timeout, running)
        self.stopping.set()

    def _shut_down(self) -> None:
        waiter = gevent.spawn(self.pool.join)
        gevent.wait([waiter, self.stop_now], timeout=self.shutdown_timeout, count=1)
        unfinished = [w for w in self.workers if not w.greenlet.dead]
        if unfinished:
            # Idle consumers may not have seen the stop yet: count only running tasks.
            running = sum(1 for w in unfinished if w.consumer.current_task)
            if running:
                logger.warning('%d task(s) did not finish in time; handing them back to '
                               'RabbitMQ', running)
            self.pool.kill(block=True, timeout=5)
        self._last_rollups()  # every end is counted now: write them before anything else
        if self.scheduler is not None:
            # It stops between rounds; a round in progress finishes sending its messages or,
            # killed, hands back to their schedules the runs it did not send.
            self.scheduler.join(timeout=1.0 if self.stop_now.is_set() else 30.0)
            self.scheduler.kill(block=True, timeout=5)
        # Write the last ends and acknowledge their messages (briefly, after a second signal).
        self.recorder.stop(timeout=2.0 if self.stop_now.is_set() else 30.0)
        # Hooks, failure callbacks and task_finished of the ends just written.
        self.followups.join(timeout=1.0 if self.stop_now.is_set() else 10.0)
        self.followups.kill(block=True, timeout=5)
        for link in self.links:
            link.close()  # what is still unacknowledged goes back to its queue
        for rounds in (self.resender, self.releaser, self.pruner, self.heartbeat, self.rollups):
            if rounds is not None:
                rounds.kill(block=True, timeout=5)
        self._forget_heartbeat()
        # Tasks the tasks published: their confirms recorded before the connection closes.
        if not outbox.drain(1.0 if self.stop_now.is_set() else 10.0):
            logger.warning('Some tasks published by this service are not confirmed yet; '
                           'a carrot service sends them again once they are %.0f s old',
                           self.settings.resend_unconfirmed_after)
        get_publisher().close()
        connections.close_all()
        logger.info('carrot service stopped')
