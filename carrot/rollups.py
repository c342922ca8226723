"""Per-queue counts of task ends, by minute and by hour, kept in the database (QueueStats).

Every worker counts, in memory, each attempt that ends in it (``Tally.add``: a dict lookup and
a few increments, no database work on the task's path): whether it succeeded, its wait from
publish to start, and its run time from start to end, the times in histograms over fixed
log-scale buckets (EDGES). Every FLUSH_SECONDS, and once more at a clean stop, the service
writes what it counted (``flush()``) to its own rows: one per queue, period and resolution
(``minute``, ``hour``) and writer (the process's ``host:pid`` and a token of its own), so
no two processes ever write the same row. A SIGKILL loses what was counted since the last
flush that the database took: FLUSH_SECONDS at most while it takes them. Each flush adds
to the minute rows and to the hour rows at once, so no later pass folds one into the other
(two workers folding the same rows would count them twice); ``prune()`` deletes minute rows
older than MINUTES_KEPT and hour rows older than HOURS_KEPT.

What counts: every attempt that ended, tracked or untracked. ``failed`` counts the attempts
that raised, one that is retried included, and tasks that expired before they ran (those have
a wait but no run time); a message that could not run at all (bad, or of an unknown task) is
not a task's attempt, and is not counted. The wait is measured from the message's
``x-carrot-published-at`` (a message of another producer has none, and no wait) to the
moment the task is called, across the clocks of the publishing and the working machine: a
negative wait, or one past MAX_WAIT_SECONDS, is counted apart (``skewed``). The run time is
measured by the monotonic clock.

The monitor's overview reads ``series()``: the merged counts of every writer, never MessageLog.
"""

from __future__ import annotations

import bisect
import datetime
import itertools
import json
import math
import operator
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone

from carrot import lifecycle
from carrot._process import worker_id
from carrot.models import QueueStats

#: The upper edges of the histograms' buckets, in seconds: 1 ms, then a factor of √2 each, up
#: to about 70 minutes (45 edges). A last bucket holds what is longer.
EDGES: tuple[float, ...] = tuple(0.001 * 2 ** (step / 2) for step in range(45))
BUCKETS = len(EDGES) + 1
_LAST_MS = EDGES[-1] * 1000
#: How often a worker writes what it counted (what a SIGKILL loses, while the database
#: takes the writes).
FLUSH_SECONDS = 10.0
#: How often a worker deletes old rows, and folds the rows of finished periods.
PRUNE_SECONDS = 3600.0
FOLD_SECONDS = 60.0
#: The writer of the rows ``fold()`` merges the writers' rows of a finished period into.
FOLDED = '*'
#: How old a period is when its rows are folded (its writers flushed long since), and the
#: most rows of a resolution one fold takes.
FOLD_AFTER = {QueueStats.MINUTE: 300, QueueStats.HOUR: 7200}
FOLD_BATCH = 900
MINUTES_KEPT = datetime.timedelta(days=1)
#: A wait longer than this (or negative) says more of the clocks than of the queue: counted
#: apart, in ``skewed``. Delayed tasks are published when due, so their wait is short too.
MAX_WAIT_SECONDS = 86400.0
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
    #: Waits left out of ``wait``: negative or past MAX_WAIT (clocks apart).
    skewed: int = 0

    def add(self, other: Counts) -> None:
        self.succeeded += other.succeeded
        self.failed += other.failed
        self.skewed += other.skewed
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
            if 0.0 <= wait <= MAX_WAIT_SECONDS:
                counts.wait[bucket(wait)] += 1
            else:
                counts.skewed += 1
        if run is not None:
            counts.run[bucket(run)] += 1

    def take(self) -> dict[tuple[str, int], Counts]:
        """What was counted since the last ``take``, leaving the tally empty."""
        taken, self._counts = self._counts, {}
        return taken

    def put_back(self, taken: dict[tuple[str, int], Counts]) -> None:
        """Counts ``take`` gave that could not be written: kept for the next flush, unless
        their minute is older than MINUTES_KEPT (its rows would be pruned at once): a
        database that refuses them for ever must not make the tally grow for ever."""
        oldest = (time.time() - MINUTES_KEPT.total_seconds()) // 60
        for key, counts in taken.items():
            if key[1] < oldest:
                continue
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
    alias = lifecycle.database()
    with transaction.atomic(using=alias):
        _add_to_rows(alias, this_writer(), wanted)
    return len(wanted)


def _add_to_rows(alias: str, writer: str, wanted: dict[tuple[str, str, int], Counts],
                 lock: bool = False) -> None:
    """Add each (queue, resolution, period)'s counts to ``writer``'s row of it, made when
    missing; ``lock``: the rows locked first (the folded rows, which any process writes)."""
    rows = QueueStats.objects.using(alias).filter(
        writer=writer, queue__in={queue for queue, _, _ in wanted},
        resolution__in={resolution for _, resolution, _ in wanted},
        period__in={period for _, _, period in wanted})
    existing = {(row.queue, row.resolution, row.period): row
                for row in (rows.select_for_update() if lock else rows)}
    created = []
    for (queue, resolution, period), counts in wanted.items():
        row = existing.get((queue, resolution, period))
        if row is None:
            created.append(QueueStats(
                queue=queue, resolution=resolution, period=period, writer=writer,
                succeeded=counts.succeeded, failed=counts.failed, skewed=counts.skewed,
                wait=trimmed(counts.wait), run=trimmed(counts.run)))
            continue
        QueueStats.objects.using(alias).filter(pk=row.pk).update(
            succeeded=row.succeeded + counts.succeeded, failed=row.failed + counts.failed,
            skewed=row.skewed + counts.skewed, wait=trimmed(merge([row.wait, counts.wait])),
            run=trimmed(merge([row.run, counts.run])))
    QueueStats.objects.using(alias).bulk_create(created)


def fold(now: datetime.datetime | None = None) -> int:
    """Merge the writers' rows of finished periods into one row per queue and period (writer
    FOLDED); the rows folded, at most FOLD_BATCH per resolution.

    Every process that ran in a window adds its rows to what the overview reads; folding
    keeps that to one row per period once its writers are done with it (FOLD_AFTER). Any
    process may fold: each row is taken by a ``DELETE ... RETURNING``, which hands a row to
    one transaction only, so no count is folded twice; a late flush to a folded period
    writes a row of its own, which the next fold takes.
    """
    alias = lifecycle.database()
    connection = connections[alias]
    if not connection.features.can_return_rows_from_bulk_insert:
        return 0  # no RETURNING (MySQL, SQLite before 3.35): the rows stay apart
    at = (now or timezone.now()).timestamp()
    folded = 0
    for resolution, after in FOLD_AFTER.items():
        with transaction.atomic(using=alias):
            ids = list(QueueStats.objects.using(alias).filter(
                resolution=resolution, period__lt=at - after).exclude(writer=FOLDED)
                .values_list('pk', flat=True)[:FOLD_BATCH])
            if not ids:
                continue
            taken = _take_rows(connection, ids)
            merged: dict[tuple[str, str, int], Counts] = {}
            for queue, period, counts in taken:
                merged.setdefault((queue, resolution, period), Counts()).add(counts)
            _add_to_rows(alias, FOLDED, merged, lock=True)
            folded += len(taken)
    return folded


def _take_rows(connection: BaseDatabaseWrapper, ids: list[int]
               ) -> list[tuple[str, int, Counts]]:
    """Delete the rows ``ids`` and return what they held (only those this call deleted)."""
    table = connection.ops.quote_name(QueueStats._meta.db_table)
    marks = ', '.join(['%s'] * len(ids))
    with connection.cursor() as cursor:
        cursor.execute(f'DELETE FROM {table} WHERE id IN ({marks}) RETURNING queue, period, '
                       f'succeeded, failed, skewed, wait, run', ids)
        rows = cursor.fetchall()
    return [(queue, int(period), Counts(succeeded, failed, padded(_json(wait)),
                                        padded(_json(run)), skewed))
            for queue, period, succeeded, failed, skewed, wait, run in rows]


def _json(value: object) -> list[int]:
    found = json.loads(value) if isinstance(value, (str, bytes)) else value
    return [int(count) for count in found] if isinstance(found, list) else []


def prune(now: datetime.datetime | None = None) -> int:
    """Delete minute rows older than MINUTES_KEPT and hour rows older than HOURS_KEPT; the
    rows deleted. Any process may: rows past their time are nobody's to write."""
    at = (now or timezone.now()).timestamp()
    rows = QueueStats.objects.using(lifecycle.database())
    minutes, _ = rows.filter(resolution=QueueStats.MINUTE,
                             period__lt=at - MINUTES_KEPT.total_seconds()).delete()
    hours, _ = rows.filter(resolution=QueueStats.HOUR,
                           period__lt=at - HOURS_KEPT.total_seconds()).delete()
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
        queue__in=list(queues), resolution=resolution, period__gte=first).values_list(
        'queue', 'period', 'succeeded', 'failed', 'wait', 'run', 'skewed')
    for queue, period, succeeded, failed, wait, run, skewed in rows:
        key = (queue, period)
        counts = merged.get(key)
        if counts is None:
            merged[key] = Counts(succeeded, failed, padded(wait), padded(run), skewed)
        else:
            counts.add(Counts(succeeded, failed, wait, run, skewed))
    return {queue: [Point(as_period(start), merged.get((queue, start)) or Counts())
                    for start in range(first, last + 1, step)] for queue in queues}


def this_writer() -> str:
    """This process's name as a writer of rows: ``host:pid`` and a token drawn once per
    process (after a fork too), so two processes never share one."""
    pid = os.getpid()
    if pid not in _writers:
        _writers[pid] = f'{worker_id()}/{secrets.token_hex(4)}'
    return _writers[pid]


_writers: dict[int, str] = {}


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
