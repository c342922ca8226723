"""Which carrot services are alive: each writes its heartbeat row every few seconds.

A service beats once when it starts and every HEARTBEAT_SECONDS after (a greenlet of
``carrot.worker.rounds``), and deletes its row when it stops cleanly. A row not renewed for
STALE_AFTER_SECONDS belongs to a process that died, lost its database, or whose gevent hub
has been blocked that long by a task: the monitor shows it as stopped reporting, and the
IN_PROGRESS rows it started as orphaned (``orphaned()``). Rows silent for FORGET_AFTER are
deleted by the beats of the services still alive.
"""

from __future__ import annotations

import collections
import datetime

from django.db.models import QuerySet
from django.utils import timezone

from carrot import lifecycle
from carrot._process import worker_id
from carrot.models import MessageLog, WorkerHeartbeat

#: How often a service writes its heartbeat.
HEARTBEAT_SECONDS = 10.0
#: A heartbeat older than this is a worker that stopped reporting (three beats missed).
STALE_AFTER_SECONDS = 35.0
#: A heartbeat this old is deleted.
FORGET_AFTER = datetime.timedelta(days=7)

#: By queue name, the deliveries this process has received and not yet settled: each
#: ``carrot.worker.delivery.Delivery`` counts itself in when made and out when settled.
held: collections.Counter[str] = collections.Counter()


def beat(queues: list[str], scheduler: bool) -> int:
    """Write this process's heartbeat; forget long-silent ones. Returns 0 (a round's count)."""
    alias = lifecycle.database()
    now = timezone.now()
    holding = {queue: count for queue, count in held.items() if count > 0}
    updated = WorkerHeartbeat.objects.using(alias).filter(worker=worker_id()).update(
        seen_at=now, queues=queues, scheduler=scheduler, held=holding)
    if not updated:
        WorkerHeartbeat.objects.using(alias).create(
            worker=worker_id(), queues=queues, scheduler=scheduler, started_at=now,
            seen_at=now, held=holding)
        WorkerHeartbeat.objects.using(alias).filter(seen_at__lt=now - FORGET_AFTER).delete()
    return 0


def held_by_live_workers(now: datetime.datetime | None = None) -> dict[str, int]:
    """By queue name, the deliveries the live services held at their last beats."""
    total: collections.Counter[str] = collections.Counter()
    for holding in WorkerHeartbeat.objects.using(lifecycle.database()).filter(
            seen_at__gte=stale_before(now)).values_list('held', flat=True):
        if isinstance(holding, dict):
            total.update({str(queue): int(count) for queue, count in holding.items()
                          if isinstance(count, int)})
    return dict(total)


def forget() -> None:
    """Delete this process's heartbeat: it stops cleanly."""
    WorkerHeartbeat.objects.using(lifecycle.database()).filter(worker=worker_id()).delete()


def stale_before(now: datetime.datetime | None = None) -> datetime.datetime:
    """Heartbeats older than this are of workers that stopped reporting."""
    return (now or timezone.now()) - datetime.timedelta(seconds=STALE_AFTER_SECONDS)


def live_workers(now: datetime.datetime | None = None) -> list[str]:
    """The ``host:pid`` of every service whose heartbeat is fresh."""
    return list(WorkerHeartbeat.objects.using(lifecycle.database()).filter(
        seen_at__gte=stale_before(now)).values_list('worker', flat=True))


def orphaned(now: datetime.datetime | None = None) -> QuerySet[MessageLog]:
    """IN_PROGRESS rows whose worker is not alive: it died, or it is a row written before
    carrot kept the worker, started more than STALE_AFTER_SECONDS ago. Such a task runs
    nowhere; RabbitMQ hands its message to another worker only if one consumes its queue and
    the message was not acknowledged."""
    cutoff = stale_before(now)
    return MessageLog.objects.using(lifecycle.database()).filter(
        status=MessageLog.IN_PROGRESS).exclude(worker__in=live_workers(now)).exclude(
        worker__isnull=True, start_time__gte=cutoff).exclude(
        worker__isnull=True, start_time__isnull=True, publish_time__gte=cutoff)


def is_orphaned(row: MessageLog, live: set[str], now: datetime.datetime) -> bool:
    """What ``orphaned()`` selects, for one row: IN_PROGRESS, and its worker not in ``live``
    (a row without its worker: started before STALE_AFTER_SECONDS)."""
    if row.status != MessageLog.IN_PROGRESS:
        return False
    if row.worker:
        return row.worker not in live
    started = row.start_time or row.publish_time
    return started is None or started < stale_before(now)
