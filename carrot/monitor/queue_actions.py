"""The monitor's actions on RabbitMQ's queues: purge a queue, and send back or purge the
messages of its dead-letter queue (``carrot.queues``, ``carrot.deadletters``).

Each returns an ``actions.Result`` for the audit log, as the actions on rows do, also when
the broker or the database failed part of the way (``Result.error``): what was done before
is recorded. One call takes at most PURGE_MAX ready messages, or MAX_LETTERS dead letters
among the first SCAN_LETTERS it reads.
"""

from __future__ import annotations

from collections.abc import Callable

from amqpstorm.exception import AMQPError
from django.db import DatabaseError

from carrot import deadletters, queues
from carrot.exceptions import CarrotConfigException, CarrotError
from carrot.models import MonitorAction
from carrot.monitor.actions import MAX_REASONS, Result

#: The most ready messages one purge takes; the rest wait for the next one.
PURGE_MAX = 10_000
#: The most dead letters one action takes.
MAX_LETTERS = 1000
#: The most dead letters a page lists, and the most a page or an action reads.
SHOWN_LETTERS = 100
SCAN_LETTERS = 10_000


def purge_queue(name: str, username: str) -> Result:
    """Take the ready messages off queue ``name``; their rows become FAILED, saying so."""
    reason = f'Purged from queue {name} through the monitor by {username or "?"}.'
    purged = queues.purge(name, reason, PURGE_MAX)
    result = Result(MonitorAction.PURGE, count=purged.messages, capped=purged.more,
                    cap=PURGE_MAX, unit='messages', error=purged.error)
    result.notes.append(f'{purged.rows} of their rows marked failed')
    if purged.unmarked:
        shown = ', '.join(purged.unmarked_ids[:MAX_REASONS])
        result.notes.append(f'{purged.unmarked} had no PUBLISHED row (untracked, or a copy '
                            f'of a task running or ended): {shown}')
    if purged.without_id:
        result.notes.append(f'{purged.without_id} had no message id, so no row')
    return result


def selection(name: str, task: str | None, limit: int | None) -> deadletters.Selection:
    return deadletters.Selection(queue=name, task=task or None, limit=limit,
                                 read_limit=SCAN_LETTERS)


def requeue_dead(name: str, task: str | None) -> Result:
    """Send the dead letters of queue ``name`` (of ``task`` only, when given) back."""
    return _act(MonitorAction.REQUEUE_DEAD, deadletters.requeue, name, task)


def purge_dead(name: str, task: str | None) -> Result:
    """Remove the dead letters of queue ``name`` (of ``task`` only); their rows stay FAILED."""
    return _act(MonitorAction.PURGE_DEAD, deadletters.purge, name, task)


def _act(action: str,
         perform: Callable[[deadletters.Selection, deadletters.Found], deadletters.Found],
         name: str, task: str | None) -> Result:
    found = deadletters.Found(letters=[], read=0)
    error = ''
    try:
        perform(selection(name, task, MAX_LETTERS), found)
    except CarrotConfigException:
        raise  # an unknown queue: nothing was done
    except (CarrotError, AMQPError, DatabaseError) as failure:
        error = str(failure) or type(failure).__name__
    result = Result(action, count=len(found.letters), cap=MAX_LETTERS, unit='dead letters',
                    capped=found.read < found.waiting and not error, error=error)
    if found.skipped:
        result.skipped = found.skipped
        result.reasons.append(f'{found.skipped} left in the dead-letter queue: their rows '
                              f'were requeued or completed meanwhile')
    return result
