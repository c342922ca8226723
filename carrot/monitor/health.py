"""What needs a person's eye: workers that stopped reporting, orphaned and stuck tasks, late
schedules.

* **Orphaned**: an IN_PROGRESS row whose worker's heartbeat is stale or gone
  (``carrot.heartbeats``): the task runs nowhere.
* **Stuck**: a PUBLISHED row, its confirm recorded, older than its queue's usual wait (three
  times the 95th percentile of its last completed tasks' wait, at least STUCK_AFTER_MIN),
  while RabbitMQ holds no message ready in that queue: its message was lost (a queue deleted
  or purged, say).
* **Late**: an active schedule whose next run is more than LATE_AFTER past: no scheduler is
  running, or it cannot publish.

Each list is capped at LIMIT rows, newest first. Orphaned and stuck rows can be requeued
(``actions.requeue`` checks again, row by row, that each still is).
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from django.utils import timezone

from carrot import conf, heartbeats, lifecycle
from carrot.broker import QueueCounts, get_publisher
from carrot.exceptions import CarrotConfigException
from carrot.models import MessageLog, ScheduledTask, WorkerHeartbeat

logger = logging.getLogger('carrot.monitor')

LIMIT = 200
#: The shortest age at which a queued task counts as stuck.
STUCK_AFTER_MIN = datetime.timedelta(minutes=5)
#: A stuck task is older than this many times its queue's 95th-percentile wait.
STUCK_FACTOR = 3
#: The completed tasks a queue's usual wait is read from.
WAIT_SAMPLE = 200
#: How far past its next run a schedule counts as late.
LATE_AFTER = datetime.timedelta(minutes=1)


@dataclass(frozen=True, kw_only=True)
class Report:
    """Everything the health page shows."""

    workers: list[WorkerHeartbeat]
    """Every heartbeat row, alive or stale."""
    stale_before: datetime.datetime
    """Heartbeats older than this are of workers that stopped reporting."""
    orphaned: list[MessageLog]
    stuck: list[MessageLog]
    late: list[ScheduledTask]
    ready: dict[str, int | None]
    """Messages ready in each queue with stuck candidates (None: the broker did not say)."""


def report(now: datetime.datetime | None = None) -> Report:
    now = now or timezone.now()
    alias = lifecycle.database()
    candidates = stuck_candidates(now)
    ready = ready_counts({row.queue for row in candidates if row.queue})
    return Report(
        workers=list(WorkerHeartbeat.objects.using(alias).all()),
        stale_before=heartbeats.stale_before(now),
        orphaned=list(heartbeats.orphaned(now).order_by('-id')[:LIMIT]),
        stuck=[row for row in candidates if ready.get(row.queue or '') == 0],
        late=list(ScheduledTask.objects.using(alias).filter(
            active=True, next_run_at__lt=now - LATE_AFTER).order_by('next_run_at')[:LIMIT]),
        ready=ready,
    )


def usual_wait(queue: str) -> datetime.timedelta | None:
    """The 95th percentile of the wait from publish to start of ``queue``'s last completed
    tasks; None when it has none."""
    rows = MessageLog.objects.using(lifecycle.database()).filter(
        queue=queue, status=MessageLog.COMPLETED, start_time__isnull=False,
        publish_time__isnull=False).order_by('-id').values_list(
        'publish_time', 'start_time')[:WAIT_SAMPLE]
    waits = sorted(max(started - published, datetime.timedelta(0))
                   for published, started in rows if published and started)
    if not waits:
        return None
    return waits[min(len(waits) - 1, int(len(waits) * 0.95))]


def stuck_after(queue: str) -> datetime.timedelta:
    """How old a queued task of ``queue`` must be to count as stuck."""
    wait = usual_wait(queue)
    return max(STUCK_AFTER_MIN, wait * STUCK_FACTOR) if wait is not None else STUCK_AFTER_MIN


def is_stuck_age(row: MessageLog, now: datetime.datetime,
                 thresholds: dict[str, datetime.timedelta]) -> bool:
    """``row`` is PUBLISHED, confirmed, and older than its queue's stuck threshold."""
    if row.status != MessageLog.PUBLISHED or row.awaiting_confirm or row.publish_time is None:
        return False
    queue = row.queue or ''
    if queue not in thresholds:
        thresholds[queue] = stuck_after(queue)
    return row.publish_time < now - thresholds[queue]


def stuck_candidates(now: datetime.datetime) -> list[MessageLog]:
    """PUBLISHED rows older than their queue's stuck threshold (the broker not asked yet)."""
    oldest = MessageLog.objects.using(lifecycle.database()).filter(
        status=MessageLog.PUBLISHED, awaiting_confirm=False,
        publish_time__lt=now - STUCK_AFTER_MIN).order_by('-id')[:LIMIT]
    thresholds: dict[str, datetime.timedelta] = {}
    return [row for row in oldest if is_stuck_age(row, now, thresholds)]


def ready_counts(queues: Iterable[str], fresh: bool = False) -> dict[str, int | None]:
    """Messages ready in each queue (None where it cannot be asked; 0 where the queue does
    not exist): ``queue_counts`` without the consumers."""
    return {name: counts.ready if counts is not None else None
            for name, counts in queue_counts(queues, fresh).items()}


def queue_counts(queues: Iterable[str], fresh: bool = False) -> dict[str, QueueCounts | None]:
    """Messages ready in each queue and its consumers, by passive declares on this process's
    publishing connection (None where the queue is not in CARROT's settings or its broker
    cannot be asked). Counts asked for less than READY_CACHE_SECONDS ago are not asked again,
    unless ``fresh``: each declare is a round trip of ~10 ms, and every viewer's page
    refreshes every five seconds."""
    now = time.monotonic()
    wanted = sorted(set(queues))
    cached = {name: _ready_cache[name] for name in wanted if not fresh
              and name in _ready_cache and now - _ready_cache[name][0] < READY_CACHE_SECONDS}
    counts: dict[str, QueueCounts | None] = {name: found for name, (_, found) in cached.items()}
    asked = [name for name in wanted if name not in cached]
    _ask(asked, counts)
    _ready_cache.update({name: (now, counts[name]) for name in asked})
    return {name: counts[name] for name in wanted}


#: Queue name → (when asked, by time.monotonic(), what the passive declare said).
_ready_cache: dict[str, tuple[float, QueueCounts | None]] = {}
READY_CACHE_SECONDS = 4.0


def _ask(queues: list[str], counts: dict[str, QueueCounts | None]) -> None:
    by_broker: dict[conf.Broker, list[str]] = {}
    settings = conf.get_settings()
    for name in queues:
        try:
            by_broker.setdefault(settings.queue(name).broker, []).append(name)
        except CarrotConfigException:
            counts[name] = None
    for broker, names in by_broker.items():
        try:
            counts.update(get_publisher().queue_counts(broker, names))
        except Exception as error:  # the broker down: the page says it could not ask
            logger.warning('The monitor could not ask %s for its queues: %s', broker.display,
                           error)
            counts.update(dict.fromkeys(names))
