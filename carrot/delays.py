"""Delayed tasks: rows that wait in the database, status DELAYED, until their ``run_after``.

A task published with a countdown or an eta, and a failed attempt that retries, wait here,
never as a message a worker holds unacknowledged (RabbitMQ's ``consumer_timeout`` would
close its channel after 30 minutes), so a delay of a week costs what one of a second does
and outlives restarts of the worker and of the broker. Each carrot service releases the rows
that are due (``release_due``) about once a second: made PUBLISHED and committed first, then
sent, their confirms recorded as the outbox records them; a service that dies between the two
leaves them awaiting their confirm, for the resender.
"""

from __future__ import annotations

import logging
from datetime import datetime

from carrot import conf, lifecycle, outbox

logger = logging.getLogger('carrot.delays')

#: The most rows one round releases; a round that releases this many is followed at once.
RELEASE_BATCH = 500


def release_due(now: datetime | None = None) -> int:
    """Send the delayed tasks whose time has come to their queues; how many were released."""
    queues = {queue.name: queue for queue in conf.get_settings().queues}
    rows = lifecycle.release_due(list(queues), RELEASE_BATCH, now)
    if not rows:
        return 0
    confirmed = outbox.send_rows(lifecycle.database(), rows, queues, resent=False)
    if confirmed < len(rows):
        logger.warning('%d delayed task(s) were released but RabbitMQ did not confirm their '
                       'messages; the resender sends them again', len(rows) - confirmed)
    return len(rows)
