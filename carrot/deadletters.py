"""The dead-letter queues: what is in them, and sending it back or throwing it away.

Each queue ``q`` has ``q.dead``. A message that cannot run, a task whose retries ran out and
a task its time limit stopped land there, with ``x-carrot-dead-reason`` saying why and
``x-carrot-dead-at`` when (its row says FAILED and why). ``manage.py carrot_deadletters``
calls these functions.

Each call reads the dead-letter queue from its head, one message at a time: the messages it
acts on are acknowledged once that is done (sent back and confirmed, or purged); the others
stay unacknowledged until the channel closes, and RabbitMQ puts them back where they were.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

from amqpstorm.exception import AMQPChannelError
from amqpstorm.message import Message as Received
from django.utils import timezone

from carrot import conf, lifecycle, message
from carrot.broker import get_publisher, queue_channel
from carrot.models import MessageLog


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """One message in a dead-letter queue."""

    queue: str
    """The queue it was dead-lettered from (``<queue>.dead`` holds it)."""
    message_id: str | None
    """Its message id, which is its MessageLog row's ``uuid``."""
    task: str
    """The dotted task path it names ('' when it names none)."""
    reason: str
    """Why it was dead-lettered."""
    dead_at: datetime.datetime | None
    """When; None for a message dead-lettered before carrot recorded it."""


@dataclass(frozen=True, kw_only=True)
class Selection:
    """Which dead letters of one queue a call acts on."""

    queue: str
    """The queue, as named in ``CARROT['queues']``."""
    task: str | None = None
    """Only those of this dotted task path."""
    older_than: datetime.timedelta | None = None
    """Only those dead-lettered longer ago than this (not those that do not say when)."""
    limit: int | None = None
    """At most this many."""
    read_limit: int | None = None
    """Read at most this many (the rest are not looked at)."""

    def matches(self, letter: DeadLetter, now: datetime.datetime) -> bool:
        if self.task is not None and letter.task != self.task:
            return False
        if self.older_than is not None:
            return letter.dead_at is not None and now - letter.dead_at > self.older_than
        return True


@dataclass
class Found:
    """What a call found: the dead letters it acted on (or listed), how many it read, how
    many it left because their rows had moved on, and how many the queue held."""

    letters: list[DeadLetter]
    read: int
    skipped: int = 0
    waiting: int = 0


def inspect(selection: Selection) -> Found:
    """The dead letters that match, left where they are."""
    return _walk(selection, None)


def requeue(selection: Selection, into: Found | None = None) -> Found:
    """Send the matching dead letters back to their queue, their attempts counted afresh;
    each is removed once RabbitMQ has confirmed its copy.

    Its FAILED row is made PUBLISHED first (and FAILED again, saying why, when the copy
    cannot be sent). A letter whose row has moved on (requeued from the monitor, or
    completed) is left where it is: sending it back would run the task twice.
    """
    queue = conf.get_settings().queue(selection.queue)
    alias = lifecycle.database()

    def send_back(received: Received, letter: DeadLetter) -> bool:
        row = (MessageLog.objects.using(alias).filter(uuid=letter.message_id).first()
               if letter.message_id is not None else None)
        if row is not None and not lifecycle.mark_requeued(alias, [row.uuid]):
            return False
        try:
            get_publisher().send(queue.broker, message.body_of(received),
                                 message.requeued_properties(received.properties),
                                 routing_key=queue.name, declare_queue=queue)
        except Exception as error:
            if row is not None:
                row.refresh_from_db()
                lifecycle.mark_not_sent([row], f'Not sent back from the dead-letter queue: '
                                               f'{error}')
            raise
        return True

    return _walk(selection, send_back, into)


def purge(selection: Selection, into: Found | None = None) -> Found:
    """Remove the matching dead letters (their rows stay, FAILED, saying why)."""
    return _walk(selection, lambda received, letter: True, into)


#: Acts on one dead letter; False leaves it where it is.
Act = Callable[[Received, DeadLetter], bool]


def _walk(selection: Selection, act: Act | None, into: Found | None = None) -> Found:
    """Read the dead-letter queue from its head, acting on the letters that match.

    What it finds is filled in as it goes (into ``into`` when given: a caller that passed it
    knows what was done before an error)."""
    found = into if into is not None else Found(letters=[], read=0)
    queue = conf.get_settings().queue(selection.queue)
    now = timezone.now()
    # Only acting declares: a look leaves RabbitMQ as it is (no queue there, no letters).
    with queue_channel(queue, 'dead letters', declare_queue=act is not None) as channel:
        try:
            waiting = found.waiting = int(channel.queue.declare(
                queue.dead_letter_queue, durable=True, passive=act is None)['message_count'])
        except AMQPChannelError as error:
            if act is None and 'NOT_FOUND' in str(error):
                return found
            raise
        while found.read < waiting:
            if selection.limit is not None and len(found.letters) >= selection.limit:
                break
            if selection.read_limit is not None and found.read >= selection.read_limit:
                break
            received = channel.basic.get(queue.dead_letter_queue, no_ack=False)
            if not isinstance(received, Received):
                break  # emptied meanwhile
            found.read += 1
            letter = _letter(received, queue.name)
            if not selection.matches(letter, now):
                continue  # left unacknowledged: back in its place when the channel closes
            if act is not None:
                if not act(received, letter):
                    found.skipped += 1
                    continue
                received.ack()
            found.letters.append(letter)
    return found


def _letter(received: Received, queue: str) -> DeadLetter:
    properties = received.properties
    headers = properties.get('headers') or {}
    return DeadLetter(
        queue=queue, message_id=message.message_id_of(properties),
        task=message.text(headers.get(message.TYPE_HEADER)),
        reason=message.text(headers.get(message.DEAD_REASON_HEADER)) or '(no reason given)',
        dead_at=message.dead_at_of(properties))


