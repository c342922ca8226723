"""The scheduler greenlet of the carrot service: publishes ScheduledTask rows when due.

Each round claims what is due (``carrot.scheduling.run_due``), then sleeps until the
earliest next run, but never more than POLL_SECONDS: a row created or edited meanwhile
is seen within that. An idle round costs two indexed queries, however many rows there are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from django.db import connections, router
from django.utils import timezone
from gevent.event import Event

from carrot import scheduling
from carrot.models import ScheduledTask

logger = logging.getLogger('carrot.scheduler')

#: How long a new or edited schedule can go unseen.
POLL_SECONDS = 1.0
#: The longest pause after a failing round (database or broker down), doubling from 1 s.
MAX_BACKOFF_SECONDS = 30.0


def current_time() -> datetime:
    """The scheduler's clock (the tests put a controllable one in its place)."""
    return timezone.now()


class Scheduler:
    def __init__(self, stopping: Event, clock: Callable[[], datetime] | None = None) -> None:
        self.stopping = stopping
        self.clock = clock or current_time
        self.failures = 0

    def run(self) -> None:
        """Run rounds until the service stops; a failing round is logged and retried."""
        logger.info('Scheduler started')
        while not self.stopping.is_set():
            try:
                pause = self.tick(self.clock())
                if self.failures:
                    logger.warning('Scheduler working again')
                self.failures = 0
            except Exception:
                self.failures += 1
                pause = min(MAX_BACKOFF_SECONDS, 2.0 ** (self.failures - 1))
                logger.exception('Scheduler round failed; retrying in %.0f s', pause)
                _close_connection()  # the next round reconnects
            self.stopping.wait(pause)
        _close_connection()
        logger.info('Scheduler stopped')

    def tick(self, now: datetime) -> float:
        """Publish what is due at ``now``; the seconds to wait before the next round.

        The database connection stays open between rounds (one per service, not one per
        round); a failing round closes it.
        """
        done = scheduling.run_due(now)
        if done.more_due:
            return 0.0
        first = scheduling.next_due()
        if first is None:
            return POLL_SECONDS
        return max(0.0, min(POLL_SECONDS, (first - now).total_seconds()))


def _close_connection() -> None:
    """Close the scheduler's database connection; a broken one must not end the scheduler."""
    try:
        connections[router.db_for_write(ScheduledTask)].close()
    except Exception as error:
        logger.warning('Closing the scheduler\'s database connection failed: %s', error)
