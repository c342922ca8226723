"""Emptying a queue: its ready messages taken off RabbitMQ, their rows saying so.

RabbitMQ's own ``queue.purge`` drops messages without saying which, and would leave their
MessageLog rows PUBLISHED for ever (and the monitor calling them stuck). So a purge here
takes the ready messages in batches: it marks the PUBLISHED rows of a batch FAILED
("purged") and commits, acknowledges the batch, and waits for RabbitMQ to have processed
the acknowledgement (a round trip on the same channel). When that fails, the batch's rows
are put back to PUBLISHED, and its messages, not acknowledged, stay in the queue. Messages a
consumer holds are not ready, so they are neither taken nor marked.

One call takes at most ``limit`` messages and runs for at most TIME_BUDGET_SECONDS (it runs
inside a web request); the caller is told when more were ready.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from amqpstorm.channel import Channel
from amqpstorm.exception import AMQPError
from amqpstorm.message import Message as Received
from django.db import DatabaseError, transaction

from carrot import conf, lifecycle, message
from carrot.broker import get_publisher, queue_channel
from carrot.exceptions import CarrotError

#: Messages acknowledged (and rows marked) together.
BATCH = 500
#: How many message ids of messages whose row was not marked a purge reports.
UNMARKED_SHOWN = 20
#: How long one purge goes on taking messages before it stops and says more are ready.
TIME_BUDGET_SECONDS = 10.0


@dataclass
class Purged:
    """What a purge took, and what it could not do."""

    queue: str
    messages: int = 0
    """Messages taken off the queue."""
    rows: int = 0
    """Their rows marked FAILED (those PUBLISHED)."""
    unmarked: int = 0
    """Messages taken whose row was not PUBLISHED (none: an untracked task; IN_PROGRESS or
    ended: a redelivered or re-sent copy)."""
    unmarked_ids: list[str] = field(default_factory=list)
    """The message ids of the first UNMARKED_SHOWN of those."""
    without_id: int = 0
    """Messages taken that carried no message id, so no row."""
    more: bool = False
    """More were ready than this call took."""
    error: str = ''
    """Why it stopped early: the broker or the database failed (the batch it was taking
    stays in the queue, its rows PUBLISHED)."""


def ready_count(name: str) -> int:
    """How many messages of queue ``name`` (as in ``CARROT['queues']``) are ready, by a
    passive declare on the publishing connection (0 when RabbitMQ has no such queue)."""
    queue = conf.get_settings().queue(name)
    return get_publisher().queue_counts(queue.broker, [queue.name])[queue.name].ready


def purge(name: str, reason: str, limit: int) -> Purged:
    """Take up to ``limit`` ready messages off queue ``name``; their PUBLISHED rows become
    FAILED with ``reason``. Refused inside a transaction: each batch's rows must be committed
    before its messages are acknowledged."""
    queue = conf.get_settings().queue(name)
    alias = lifecycle.database()
    if transaction.get_connection(alias).in_atomic_block:
        raise CarrotError('A purge cannot run inside a transaction (ATOMIC_REQUESTS?): its '
                          'rows must be committed before RabbitMQ forgets their messages.')
    found = Purged(queue.name)
    deadline = time.monotonic() + TIME_BUDGET_SECONDS
    try:
        with queue_channel(queue, 'purge') as channel:
            wanted = min(_ready(channel, queue.name), limit)
            while found.messages < wanted and time.monotonic() < deadline:
                taken = _take(channel, queue.name, min(BATCH, wanted - found.messages))
                if not taken:
                    break  # emptied meanwhile (by consumers)
                _settle(channel, queue.name, alias, taken, reason, found)
            found.more = _ready(channel, queue.name) > 0
    except (CarrotError, AMQPError, DatabaseError) as error:
        found.error = str(error) or type(error).__name__
        found.more = True
    return found


def _ready(channel: Channel, name: str) -> int:
    return int(channel.queue.declare(name, passive=True)['message_count'])


def _take(channel: Channel, name: str, count: int) -> list[Received]:
    taken: list[Received] = []
    while len(taken) < count:
        received = channel.basic.get(name, no_ack=False)
        if not isinstance(received, Received):
            break
        taken.append(received)
    return taken


def _settle(channel: Channel, name: str, alias: str, taken: list[Received], reason: str,
            found: Purged) -> None:
    """Mark the rows of ``taken`` and commit, then acknowledge them all with one frame and
    wait until RabbitMQ has processed it; on failure put the rows back and re-raise."""
    ids = [message_id for received in taken
           if (message_id := message.message_id_of(received.properties)) is not None]
    with transaction.atomic(using=alias):
        marked = lifecycle.mark_purged(alias, ids, reason)
    try:
        channel.basic.ack(delivery_tag=int(taken[-1].delivery_tag or 0), multiple=True)
        _ready(channel, name)  # frames on a channel are processed in order: the ack is done
    except BaseException:
        lifecycle.unmark_purged(alias, marked, reason)
        raise
    found.messages += len(taken)
    found.rows += len(marked)
    found.without_id += len(taken) - len(ids)
    moved = set(marked)
    unmarked = [message_id for message_id in ids if message_id not in moved]
    found.unmarked += len(unmarked)
    found.unmarked_ids += unmarked[:UNMARKED_SHOWN - len(found.unmarked_ids)]
