"""The service's greenlets that work in rounds over the database: the resender, the releaser,
the pruner, the heartbeat and the rollups.

The resender sends again what a dead publisher left: a row still PUBLISHED and awaiting its
confirm ``CARROT['resend_unconfirmed_after']`` seconds after it was sent
(``carrot.outbox.resend_unconfirmed``). The releaser sends delayed tasks whose time has come
(``carrot.delays.release_due``), about once a second. The pruner, when
``CARROT['retention']['prune_hourly']`` says so, deletes old finished rows once an hour
(``carrot.retention.prune``). The heartbeat says every 10 s that this service is alive
(``carrot.heartbeats.beat``), from its start. The rollups round writes every 10 s what the
consumers counted of the tasks that ended (``carrot.rollups.flush``: a SIGKILL loses what
was counted since the last flush the database took; the service flushes once more when its
tasks have ended at a stop), and once an hour deletes
old rollup rows (``carrot.rollups.prune``). A round that filled its batch is followed at
once; a failing round is logged and tried again after a backoff.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from gevent.event import Event

from carrot import conf, delays, heartbeats, lifecycle, outbox, retention, rollups
from carrot.worker.recorder import close_connection

logger = logging.getLogger('carrot.worker')

#: The longest pause between two rounds of the resender.
RESEND_POLL_SECONDS = 10.0
#: The pause between two rounds of the releaser: how late a delayed task may start.
RELEASE_POLL_SECONDS = 1.0
#: The pause between two rounds of the pruner.
PRUNE_POLL_SECONDS = 3600.0
#: The longest pause after a failing round (database or broker down), doubling from 1 s.
MAX_BACKOFF_SECONDS = 30.0
#: A round whose pause is shorter keeps its database connection for the next one: the
#: releaser's connect each second cost more CPU than its query (about half of an idle
#: worker's). Rounds further apart close theirs, so a service holds no idle connection
#: for each of them.
KEEP_CONNECTION_BELOW_SECONDS = 5.0


class Rounds:
    """Call ``work()`` every ``pause`` seconds until the service stops.

    ``work`` returns how many rows it handled; ``batch`` of them means more are waiting.
    ``at_once``: the first round runs at the start rather than after a pause.
    """

    def __init__(self, stopping: Event, work: Callable[[], int], batch: int, pause: float,
                 what: str, at_once: bool = False) -> None:
        self.stopping = stopping
        self.at_once = at_once
        self.work = work
        self.batch = batch
        self.pause = pause
        self.what = what
        self.failures = 0

    def run(self) -> None:
        if self.at_once:
            self._round()
        while not self.stopping.wait(self.pause if not self.failures else
                                     min(MAX_BACKOFF_SECONDS, 2.0 ** (self.failures - 1))):
            self._round()

    def _round(self) -> None:
        try:
            while self.work() == self.batch and not self.stopping.is_set():
                pass  # more are waiting
            self.failures = 0
        except Exception:
            self.failures += 1
            logger.exception('%s failed; retrying', self.what)
        if self.failures or self.pause >= KEEP_CONNECTION_BELOW_SECONDS:
            close_connection(lifecycle.database())  # a failed one is replaced next round


def resender(stopping: Event) -> Rounds:
    pause = min(RESEND_POLL_SECONDS, conf.get_settings().resend_unconfirmed_after / 2)
    return Rounds(stopping, outbox.resend_unconfirmed, outbox.RESEND_BATCH, pause,
                  'Sending unconfirmed tasks again')


def releaser(stopping: Event) -> Rounds:
    return Rounds(stopping, delays.release_due, delays.RELEASE_BATCH, RELEASE_POLL_SECONDS,
                  'Releasing delayed tasks')


def pruner(stopping: Event) -> Rounds:
    def prune() -> int:
        pruned = retention.prune()
        if pruned.total:
            logger.info('Pruned %d COMPLETED and %d FAILED row(s)', pruned.completed,
                        pruned.failed)
        return 0

    return Rounds(stopping, prune, 1, PRUNE_POLL_SECONDS, 'Pruning old task rows')


def heartbeat(stopping: Event, queues: list[str], scheduler: bool) -> Rounds:
    return Rounds(stopping, lambda: heartbeats.beat(queues, scheduler), 1,
                  heartbeats.HEARTBEAT_SECONDS, 'Writing this service\'s heartbeat',
                  at_once=True)


def rollup(stopping: Event) -> Rounds:
    """Write the tally of task ends every FLUSH_SECONDS; fold the rows of finished periods
    every FOLD_SECONDS; delete old rollups every PRUNE_SECONDS."""
    last = {'fold': -math.inf, 'prune': -math.inf}  # when, by time.monotonic()

    def work() -> int:
        rollups.flush()
        if time.monotonic() - last['fold'] >= rollups.FOLD_SECONDS:
            rollups.fold()
            last['fold'] = time.monotonic()
        if time.monotonic() - last['prune'] >= rollups.PRUNE_SECONDS:
            deleted = rollups.prune()
            last['prune'] = time.monotonic()
            if deleted:
                logger.info('Deleted %d old rollup row(s)', deleted)
        return 0

    return Rounds(stopping, work, 1, rollups.FLUSH_SECONDS,
                  'Writing the queues\' counts of task ends')
