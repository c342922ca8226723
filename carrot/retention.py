"""Retention: COMPLETED and FAILED rows older than their age are deleted, a batch at a time.

Each batch is one short DELETE by primary key in its own transaction, so no table lock is
taken and no row is locked for long: workers writing new rows meanwhile do not wait.
``manage.py carrot_prune`` runs it, and so does every carrot service once an hour when
``CARROT['retention']['prune_hourly']`` is True.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Any

from django.db import connections, transaction
from django.db.models import QuerySet
from django.utils import timezone

from carrot import conf, lifecycle
from carrot.models import MessageLog, Status

#: Rows deleted by one statement.
BATCH = 1000
#: SQLite: the pause after each batch. A writer waiting for SQLite's lock sleeps up to
#: 100 ms between tries; without a pause as long, the next batch always wins the lock and a
#: publisher waited 3 s (measured with benchmarks/prune.py).
SQLITE_PAUSE_SECONDS = 0.1


@dataclass
class Pruned:
    """How many rows were (or, in a dry run, would be) deleted, and the longest batch."""

    completed: int = 0
    failed: int = 0
    #: The longest DELETE of one batch, in seconds (0 in a dry run).
    longest_batch: float = 0.0

    @property
    def total(self) -> int:
        return self.completed + self.failed


def prune(*, completed: datetime.timedelta | None = None,
          failed: datetime.timedelta | None = None, dry_run: bool = False,
          batch: int = BATCH, now: datetime.datetime | None = None) -> Pruned:
    """Delete COMPLETED rows that completed longer than ``completed`` ago and FAILED rows that
    failed longer than ``failed`` ago (the ages of ``CARROT['retention']`` when None).
    ``dry_run``: count them, delete nothing."""
    retention = conf.get_settings().retention
    now = now or timezone.now()
    alias = lifecycle.database()
    pruned = Pruned()
    for status, field, age in ((Status.COMPLETED, 'completion_time', completed or
                                retention.completed),
                               (Status.FAILED, 'failure_time', failed or retention.failed)):
        cutoff = now - age
        ended_before = {f'{field}__lt': cutoff}
        rows = MessageLog.objects.using(alias).filter(status=status, **ended_before)
        # A row ends after it was published: walking (status, publish_time) up to the cutoff
        # finds the old rows first and stops at the young ones; each batch goes on from the
        # last publish time the one before saw, so a row published long ago that ended
        # lately (a delayed or retried task) is walked once. Rows without a publish time
        # (upstream's, perhaps) are walked by their primary key.
        walks = [(rows.filter(publish_time__lt=cutoff), 'publish_time', 'gte'),
                 (rows.filter(publish_time__isnull=True), 'pk', 'gt')]
        if dry_run:
            count = sum(walk.count() for walk, _, _ in walks)
        else:
            count = sum(_delete(alias, rows, walk, key, after, batch, pruned)
                        for walk, key, after in walks)
        if status == Status.COMPLETED:
            pruned.completed = count
        else:
            pruned.failed = count
    return pruned


def _delete(alias: str, rows: QuerySet[MessageLog], walk: QuerySet[MessageLog], key: str,
            after: str, batch: int, pruned: Pruned) -> int:
    """Delete what ``walk`` finds in the order of ``key``, ``batch`` rows a transaction; how
    many were deleted. Each DELETE checks ``rows``' conditions again: a row requeued
    meanwhile is not deleted."""
    count = 0
    last: Any = None
    while True:
        started = time.monotonic()
        page = walk if last is None else walk.filter(**{f'{key}__{after}': last})
        with transaction.atomic(using=alias):
            found = list(page.order_by(key).values_list('pk', key)[:batch])
            if found:
                last = found[-1][1]
                count += rows.filter(pk__in=[pk for pk, _ in found]).delete()[0]
        pruned.longest_batch = max(pruned.longest_batch, time.monotonic() - started)
        if len(found) < batch:
            return count
        if connections[alias].vendor == 'sqlite':
            time.sleep(SQLITE_PAUSE_SECONDS)
