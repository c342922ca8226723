"""The monitor's overview: for each queue in CARROT's settings, what RabbitMQ holds and what
ended in it over the last hour (by minute) and the last days (by hour).

* **Ready and consumers**: RabbitMQ's answer to a passive declare of the queue, on this
  process's publishing connection, asked at most every READY_CACHE_SECONDS
  (``health.queue_counts``). A passive declare does not say how many messages are delivered
  and unacknowledged (RabbitMQ's management API would): the overview says so rather than
  guess.
* **Tasks per minute, failure rate, wait and run time** (p50, p95, p99): the rollups the
  workers write every 10 s (``carrot.rollups``, the QueueStats rows), never MessageLog, so
  the page costs the same on a table of a billion rows.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from django.utils import timezone

from carrot import conf, heartbeats, rollups
from carrot.broker import QueueCounts
from carrot.models import QueueStats
from carrot.monitor import health

#: How many days of hour rows the overview shows.
DAYS = 7
QUANTILES = (0.5, 0.95, 0.99)
#: What the page and the API say of where the queue's numbers come from.
SOURCES = {
    'ready': 'a passive declare of the queue (RabbitMQ\'s messages ready, not those delivered '
             'and unacknowledged), asked at most every '
             f'{health.READY_CACHE_SECONDS:g} s',
    'consumers': 'the same passive declare',
    'unacknowledged': 'the messages carrot\'s live workers had received and not yet '
                      'settled, as their last heartbeats (every '
                      f'{heartbeats.HEARTBEAT_SECONDS:g} s) said; a passive declare does not '
                      'tell, and the monitor does not ask RabbitMQ\'s management API, so '
                      'other consumers\' are not counted',
    'tasks': 'the rollups every worker writes every 10 s (QueueStats: one row per queue, '
             'minute or hour, and worker), never MessageLog',
}


@dataclass(frozen=True)
class Times:
    """The 50th, 95th and 99th percentiles of a histogram, in seconds (None: no task)."""

    p50: float | None
    p95: float | None
    p99: float | None

    @classmethod
    def of(cls, histogram: list[int]) -> Times:
        return cls(*rollups.percentiles(histogram, QUANTILES))

    def as_json(self) -> dict[str, float | None]:
        return {'p50': _rounded(self.p50), 'p95': _rounded(self.p95), 'p99': _rounded(self.p99)}


@dataclass(frozen=True)
class Period:
    """One minute or hour of a window: its start, its counts and its times."""

    at: datetime.datetime
    succeeded: int
    failed: int
    wait: Times
    run: Times

    @property
    def total(self) -> int:
        return self.succeeded + self.failed

    @property
    def failure_rate(self) -> float | None:
        return self.failed / self.total if self.total else None


@dataclass(frozen=True)
class Window:
    """What ended in one queue over the last hour, or the last days."""

    label: str
    resolution: str
    since: datetime.datetime
    minutes: float
    """How long the window is, in minutes (its first period's start to now)."""
    periods: list[Period]
    succeeded: int
    failed: int
    wait: Times
    run: Times
    skewed: int = 0
    """Waits left out of ``wait``: negative or over a day (clocks apart)."""

    @property
    def total(self) -> int:
        return self.succeeded + self.failed

    @property
    def per_minute(self) -> float:
        return self.total / self.minutes if self.minutes > 0 else 0.0

    @property
    def failure_rate(self) -> float | None:
        return self.failed / self.total if self.total else None

    @property
    def counts_chart(self) -> list[list[float | None]]:
        """Tasks ended, and failed, per period: the sparkline's two series."""
        return [[p.total for p in self.periods], [p.failed for p in self.periods]]

    @property
    def failure_chart(self) -> list[list[float | None]]:
        return [[p.failure_rate for p in self.periods]]

    @property
    def wait_chart(self) -> list[list[float | None]]:
        return _times_chart([p.wait for p in self.periods])

    @property
    def run_chart(self) -> list[list[float | None]]:
        return _times_chart([p.run for p in self.periods])

    def as_json(self) -> dict[str, Any]:
        return {
            'resolution': self.resolution, 'since': self.since.isoformat(),
            'succeeded': self.succeeded, 'failed': self.failed,
            'per_minute': round(self.per_minute, 3), 'failure_rate': self.failure_rate,
            'wait': self.wait.as_json(), 'run': self.run.as_json(),
            'skewed_waits': self.skewed,
            # Columns, one value per period: a third of the size of an object per period.
            'series': {
                'at': [p.at.isoformat() for p in self.periods],
                'succeeded': [p.succeeded for p in self.periods],
                'failed': [p.failed for p in self.periods],
                **{kind: {name: [_rounded(value) for value in values]
                          for name, values in zip(('p50', 'p95', 'p99'), chart, strict=True)}
                   for kind, chart in (('wait', self.wait_chart), ('run', self.run_chart))},
            },
        }


@dataclass(frozen=True)
class QueueOverview:
    name: str
    consumable: bool
    concurrency: int
    counts: QueueCounts | None
    """What the passive declare said; None when RabbitMQ could not be asked."""
    windows: list[Window]
    unacknowledged: int = 0
    """What carrot's live workers hold (``heartbeats.held_by_live_workers``)."""

    def as_json(self) -> dict[str, Any]:
        hour, days = self.windows
        return {
            'name': self.name, 'consumable': self.consumable, 'concurrency': self.concurrency,
            'ready': self.counts.ready if self.counts else None,
            'consumers': self.counts.consumers if self.counts else None,
            'exists': self.counts.exists if self.counts else None,
            'unacknowledged': self.unacknowledged,
            'last_hour': hour.as_json(), 'last_days': days.as_json(),
        }


@dataclass(frozen=True)
class Report:
    queues: list[QueueOverview]
    days: int
    at: datetime.datetime

    def as_json(self) -> dict[str, Any]:
        return {'at': self.at.isoformat(), 'days': self.days, 'sources': SOURCES,
                'queues': [queue.as_json() for queue in self.queues]}


def report(now: datetime.datetime | None = None) -> Report:
    """The overview of every queue in CARROT's settings."""
    now = now or timezone.now()
    queues = conf.get_settings().queues
    names = [queue.name for queue in queues]
    counts = health.queue_counts(names)
    held = heartbeats.held_by_live_workers(now)
    hour_since = now - datetime.timedelta(minutes=59)
    days_since = now - datetime.timedelta(days=DAYS) + datetime.timedelta(hours=1)
    by_minute = rollups.series(names, hour_since, QueueStats.MINUTE, now)
    by_hour = rollups.series(names, days_since, QueueStats.HOUR, now)
    return Report(queues=[QueueOverview(
        name=queue.name, consumable=queue.consumable, concurrency=queue.concurrency,
        counts=counts.get(queue.name), unacknowledged=held.get(queue.name, 0), windows=[
            _window('Last hour', QueueStats.MINUTE, by_minute[queue.name], now),
            _window(f'Last {DAYS} days', QueueStats.HOUR, by_hour[queue.name], now)],
    ) for queue in queues], days=DAYS, at=now)


def _window(label: str, resolution: str, points: list[rollups.Point],
            now: datetime.datetime) -> Window:
    periods = [Period(p.at, p.counts.succeeded, p.counts.failed, Times.of(p.counts.wait),
                      Times.of(p.counts.run)) for p in points]
    since = points[0].at if points else now
    return Window(
        label=label, resolution=resolution, since=since,
        minutes=max((now - since).total_seconds(), 60.0) / 60, periods=periods,
        succeeded=sum(p.counts.succeeded for p in points),
        failed=sum(p.counts.failed for p in points),
        wait=Times.of(rollups.merge(p.counts.wait for p in points)),
        run=Times.of(rollups.merge(p.counts.run for p in points)),
        skewed=sum(p.counts.skewed for p in points))


def _rounded(seconds: float | None) -> float | None:
    """Seconds to the microsecond: the buckets are far coarser."""
    return round(seconds, 6) if seconds is not None else None


def _times_chart(times: list[Times]) -> list[list[float | None]]:
    """p50, p95 and p99 per period: the sparkline's three series."""
    return [[t.p50 for t in times], [t.p95 for t in times], [t.p99 for t in times]]
