"""Per-queue counts of task ends, by minute and by hour, kept in the database (QueueStats).

Every worker counts, in memory, each attempt that ends in it (``Tally.add``: a dict lookup and
a few increments, no database work on the task's path): whether it succeeded, its wait from
publish to start, and its run time from start to end, the times in histograms over fixed
log-scale buckets (EDGES). Every FLUSH_SECONDS, and once more at a clean stop, the service
writes what it counted (``flush()``) to its own rows: one per queue, period and resolution
(``minute``, ``hour``) and writer (the process's ``host:pid``), so no two processes ever
write the same row. A SIGKILL loses at most the last FLUSH_SECONDS of counts. Each flush adds
to the minute rows and to the hour rows at once, so no later pass folds one into the other
(two workers folding the same rows would count them twice); ``prune()`` deletes minute rows
older than MINUTES_KEPT and hour rows older than HOURS_KEPT.

What counts: every attempt that ended, tracked or untracked. ``failed`` counts the attempts
that raised, one that is retried included, and tasks that expired before they ran (those have
a wait but no run time); a message that could not run at all (bad, or of an unknown task) is
not a task's attempt, and is not counted. The wait is measured from the message's
``x-carrot-published-at`` (a message of another producer has none, and no wait), across the
clocks of the publishing and the working machine.

The monitor's overview reads ``series()``: the merged counts of every writer, never MessageLog.
"""

from __future__ import annotations

import bisect
import datetime
import itertools
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from carrot import lifecycle
from carrot._process import worker_id
from carrot.models import QueueStats

#: The upper edges of the histograms' buckets, in seconds: 1 ms, then a factor of √2 each, up
#: to about 70 minutes (45 edges). A last bucket holds what is longer.
EDGES: tuple[float, ...] = tuple(0.001 * 2 ** (step / 2) for step in range(45))
BUCKETS = len(EDGES) + 1
_LAST_MS = EDGES[-1] * 1000
#: How often a worker writes what it counted; what a SIGKILL loses at most.
FLUSH_SECONDS = 10.0
#: How often a worker deletes old rows.
PRUNE_SECONDS = 3600.0
MINUTES_KEPT = datetime.timedelta(days=1)
HOURS_KEPT = datetime.timedelta(days=30)
_STEP = {QueueStats.MINUTE: 60, QueueStats.HOUR: 3600}


def bucket(seconds: float) -> int:
    """The index of the bucket ``seconds`` falls in (a negative time, clocks apart, in the
    first)."""
    ms = seconds * 1000.0
    if not ms > 1.0:  # NaN too
        return 0
    if ms > _LAST_MS:
        return BUCKETS - 1
    return min(math.ceil(2.0 * math.log2(ms)), BUCKETS - 1)


@dataclass
class Counts:
    """What ended in one queue in one period."""

    succeeded: int = 0
    failed: int = 0
    wait: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    run: list[int] = field(default_factory=lambda: [0] * BUCKETS)

    def add(self, other: Counts) -> None:
        self.succeeded += other.succeeded
        self.failed += other.failed
        self.wait = list(map(operator.add, padded(self.wait), padded(other.wait)))
        self.run = list(map(operator.add, padded(self.run), padded(other.run)))

    @property
    def total(self) -> int:
        return self.succeeded + self.failed


class Tally:
    """The counts of this process not written yet, by (queue, minute since the epoch)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], Counts] = {}

    def add(self, queue: str, ended_at: float, wait: float | None, run: float | None,
            ok: bool) -> None:
        """Count an attempt of ``queue`` that ended at ``ended_at`` (seconds since the
        epoch), ``wait`` and ``run`` in seconds (None: not known), succeeded or not."""
        key = (queue, int(ended_at // 60))
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = Counts()
        if ok:
            counts.succeeded += 1
        else:
            counts.failed += 1
        if wait is not None:
            counts.wait[bucket(wait)] += 1
        if run is not None:
            counts.run[bucket(run)] += 1

    def take(self) -> dict[tuple[str, int], Counts]:
        """What was counted since the last ``take``, leaving the tally empty."""
        taken, self._counts = self._counts, {}
        return taken

    def put_back(self, taken: dict[tuple[str, int], Counts]) -> None:
        """Counts ``take`` gave that could not be written: kept for the next flush."""
        for key, counts in taken.items():
            mine = self._counts.setdefault(key, Counts())
            mine.add(counts)


#: The counts of this process: its consumers add, the service's rollups round flushes.
tally = Tally()


def flush(source: Tally | None = None) -> int:
    """Add what ``source`` (this process's tally) counted to this writer's minute and hour
    rows, in one transaction; the rows written. Counts that could not be written (the
    database down, or the flush killed) go back to the tally for the next flush."""
    source = source if source is not None else tally
    taken = source.take()
    if not taken:
        return 0
    try:
        return _write(taken)
    except BaseException:
        source.put_back(taken)
        raise


def _write(taken: dict[tuple[str, int], Counts]) -> int:
    wanted: dict[tuple[str, str, int], Counts] = {}
    for (queue, minute), counts in taken.items():
        for resolution, start in ((QueueStats.MINUTE, minute * 60),
                                  (QueueStats.HOUR, minute // 60 * 3600)):
            wanted.setdefault((queue, resolution, start), Counts()).add(counts)
    alias, writer = lifecycle.database(), worker_id()
    with transaction.atomic(using=alias):
        rows = QueueStats.objects.using(alias).filter(
            writer=writer, queue__in={queue for queue, _, _ in wanted},
            period__in=[as_period(start) for start in {start for _, _, start in wanted}])
        existing = {(row.queue, row.resolution, int(row.period.timestamp())): row
                    for row in rows}
        created = []
        for key, counts in wanted.items():
            row = existing.get(key)
            if row is None:
                queue, resolution, start = key
                created.append(QueueStats(
                    queue=queue, resolution=resolution, period=as_period(start), writer=writer,
                    succeeded=counts.succeeded, failed=counts.failed,
                    wait=trimmed(counts.wait), run=trimmed(counts.run)))
                continue
            QueueStats.objects.using(alias).filter(pk=row.pk).update(
                succeeded=row.succeeded + counts.succeeded, failed=row.failed + counts.failed,
                wait=trimmed(merge([row.wait, counts.wait])),
                run=trimmed(merge([row.run, counts.run])))
        QueueStats.objects.using(alias).bulk_create(created)
    return len(wanted)


def prune(now: datetime.datetime | None = None) -> int:
    """Delete minute rows older than MINUTES_KEPT and hour rows older than HOURS_KEPT; the
    rows deleted. Any process may: rows past their time are nobody's to write."""
    now = now or timezone.now()
    rows = QueueStats.objects.using(lifecycle.database())
    minutes, _ = rows.filter(resolution=QueueStats.MINUTE,
                             period__lt=now - MINUTES_KEPT).delete()
    hours, _ = rows.filter(resolution=QueueStats.HOUR, period__lt=now - HOURS_KEPT).delete()
    return minutes + hours


def merge(histograms: Iterable[Sequence[int]]) -> list[int]:
    """The bucket-by-bucket sum of histograms (a stored one may be shorter: trailing zeros are
    not kept)."""
    full = [padded(histogram) for histogram in histograms]
    return [sum(column) for column in zip(*full, strict=True)] if full else [0] * BUCKETS


def padded(histogram: Sequence[int]) -> list[int]:
    """``histogram`` with all BUCKETS counts (a stored one leaves out its trailing zeros)."""
    if len(histogram) == BUCKETS:
        return list(histogram)
    return [*histogram[:BUCKETS], *[0] * (BUCKETS - len(histogram))]


def percentiles(histogram: Sequence[int], quantiles: Sequence[float]) -> list[float | None]:
    """Each quantile (0 to 1) of ``histogram``, in seconds: interpolated within the bucket it
    falls in; in the last bucket (past EDGES), its lower edge. None for an empty histogram."""
    cumulative = list(itertools.accumulate(histogram))
    if not cumulative or cumulative[-1] <= 0:
        return [None] * len(quantiles)
    total = cumulative[-1]
    found: list[float | None] = []
    for quantile in quantiles:
        # The first bucket whose count reaches the rank (past the empty ones before it).
        rank = max(min(max(quantile, 0.0), 1.0) * total, 1e-9)
        index = bisect.bisect_left(cumulative, rank)
        if index >= len(EDGES):
            found.append(EDGES[-1])
            continue
        count = histogram[index]
        low = EDGES[index - 1] if index else 0.0
        found.append(low + (EDGES[index] - low) * (rank - (cumulative[index] - count)) / count)
    return found


def percentile(histogram: Sequence[int], quantile: float) -> float | None:
    """One quantile (0 to 1) of ``histogram`` in seconds (see ``percentiles``)."""
    return percentiles(histogram, [quantile])[0]


@dataclass(frozen=True)
class Point:
    """Every writer's counts of one queue in one period."""

    at: datetime.datetime
    counts: Counts


def series(queues: Sequence[str], since: datetime.datetime, resolution: str,
           now: datetime.datetime | None = None) -> dict[str, list[Point]]:
    """For each of ``queues``, one Point per period of ``resolution`` from the one holding
    ``since`` to the one holding ``now``, every writer's rows merged (zeros where none)."""
    step = _STEP[resolution]
    first = int(since.timestamp()) // step * step
    last = int((now or timezone.now()).timestamp()) // step * step
    merged: dict[tuple[str, int], Counts] = {}
    rows = QueueStats.objects.using(lifecycle.database()).filter(
        queue__in=list(queues), resolution=resolution, period__gte=as_period(first)).values_list(
        'queue', 'period', 'succeeded', 'failed', 'wait', 'run')
    for queue, period, succeeded, failed, wait, run in rows:
        key = (queue, int(period.timestamp()))
        counts = merged.get(key)
        if counts is None:
            merged[key] = Counts(succeeded, failed, padded(wait), padded(run))
        else:
            counts.add(Counts(succeeded, failed, wait, run))
    return {queue: [Point(as_period(start), merged.get((queue, start)) or Counts())
                    for start in range(first, last + 1, step)] for queue in queues}


def as_period(start: int) -> datetime.datetime:
    """A period's start, ``start`` seconds since the epoch, as Django stores times."""
    at = datetime.datetime.fromtimestamp(start, tz=datetime.UTC)
    return at if settings.USE_TZ else timezone.make_naive(at)


def trimmed(histogram: list[int]) -> list[int]:
    """``histogram`` without its trailing zeros, as stored."""
    end = len(histogram)
    while end and not histogram[end - 1]:
        end -= 1
    return histogram[:end]
