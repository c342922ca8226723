"""The resender greenlet of the carrot service: sends again what a dead publisher left.

A row still PUBLISHED and awaiting its confirm ``CARROT['resend_unconfirmed_after']`` seconds
after it was published belongs to a process that died before RabbitMQ's answer was recorded;
each round sends those again (``carrot.outbox.resend_unconfirmed``).
"""

from __future__ import annotations

import logging

from gevent.event import Event

from carrot import conf, lifecycle, outbox
from carrot.worker.recorder import close_connection

logger = logging.getLogger('carrot.worker')

#: The longest pause between two rounds.
POLL_SECONDS = 10.0
#: The longest pause after a failing round (database or broker down), doubling from 1 s.
MAX_BACKOFF_SECONDS = 30.0


class Resender:
    def __init__(self, stopping: Event) -> None:
        self.stopping = stopping
        self.failures = 0

    def run(self) -> None:
        """Run rounds until the service stops; a failing round is logged and retried."""
        pause = min(POLL_SECONDS, conf.get_settings().resend_unconfirmed_after / 2)
        while not self.stopping.wait(pause if not self.failures else
                                     min(MAX_BACKOFF_SECONDS, 2.0 ** (self.failures - 1))):
            try:
                sent = outbox.resend_unconfirmed()
                while sent == outbox.RESEND_BATCH and not self.stopping.is_set():
                    sent = outbox.resend_unconfirmed()  # more are waiting
                self.failures = 0
            except Exception:
                self.failures += 1
                logger.exception('Sending unconfirmed tasks again failed; retrying')
            close_connection(lifecycle.database())
