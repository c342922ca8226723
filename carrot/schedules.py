"""When a scheduled task runs: interval and cron schedules, and their next run times.

No database here. Times follow Django's conventions: aware UTC datetimes with ``USE_TZ``,
naive local ones without it; cron expressions are read in ``TIME_ZONE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cronsim import CronSim, CronSimError
from django.conf import settings
from django.utils import timezone

from carrot._values import is_whole_number

UNITS = ('seconds', 'minutes', 'hours', 'days')


@dataclass(frozen=True)
class Interval:
    """Every ``count`` ``unit``; runs stay on the grid started at the first run."""

    unit: str
    count: int

    @property
    def length(self) -> timedelta:
        return timedelta(**{self.unit: self.count})

    def first_run(self, now: datetime) -> datetime:
        """One interval after ``now`` (upstream's first run)."""
        return now + self.length

    def next_run(self, previous: datetime, now: datetime) -> datetime:
        """The first time on ``previous``'s grid after ``now``.

        Stepping from the previous due time, not from when it ran, keeps runs from
        drifting; jumping past every missed step makes a long outage one run, not a flood.
        """
        step = self.length
        if previous > now:
            return previous
        missed = (now - previous) // step
        return previous + (missed + 1) * step


@dataclass(frozen=True)
class Cron:
    """A cron expression (five fields; a sixth, leading, for seconds) in ``TIME_ZONE``."""

    expression: str

    def first_run(self, now: datetime) -> datetime:
        return self.next_run(now, now)

    def next_run(self, previous: datetime, now: datetime) -> datetime:
        """The first time the expression matches after ``now``."""
        local = _to_local(now)
        # cronsim counts from the next whole second (or minute) after its start.
        following = next(CronSim(self.expression, local))
        return _from_local(following)


Schedule = Interval | Cron


def upcoming(schedule: Schedule, now: datetime, next_run: datetime | None = None,
             count: int = 5) -> list[datetime]:
    """The next ``count`` run times of ``schedule``: ``next_run`` (a row's planned next run,
    which runs at once when past) and those after it, as the scheduler steps on; from
    ``schedule.first_run(now)`` when ``next_run`` is None."""
    runs = [next_run if next_run is not None else schedule.first_run(now)]
    while len(runs) < count:
        runs.append(schedule.next_run(runs[-1], max(now, runs[-1])))
    return runs


def parse_interval(interval: Any) -> Interval:
    """An Interval from upstream's one-item dict such as ``{'minutes': 5}``."""
    if not isinstance(interval, dict) or len(interval) != 1:
        raise ValueError(
            f'interval must be a dict with one item such as {{"seconds": 5}} or '
            f'{{"hours": 2}}, not {interval!r}.'
        )
    ((unit, count),) = interval.items()
    return make_interval(unit, count)


def make_interval(unit: Any, count: Any) -> Interval:
    if unit not in UNITS:
        raise ValueError(f'interval unit {unit!r} is not one of {", ".join(UNITS)}.')
    if not is_whole_number(count, 1):
        raise ValueError(f'interval count must be a whole number of {unit} of at least 1, '
                         f'not {count!r}.')
    return Interval(unit, count)


def parse_cron(expression: Any) -> Cron:
    """A Cron, or ValueError that says what is wrong with the expression."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f'crontab must be a cron expression such as "*/5 * * * *", '
                         f'not {expression!r}.')
    text = ' '.join(expression.split())
    try:
        next(CronSim(text, datetime(2000, 1, 1, tzinfo=UTC)))
    except (CronSimError, StopIteration) as error:
        raise ValueError(
            f'crontab {expression!r} is not a valid cron expression ({error or "never matches"}):'
            f' use five fields, minute hour day-of-month month day-of-week, such as '
            f'"*/5 * * * *" or "0 3 * * MON".'
        ) from None
    return Cron(text)


def _to_local(moment: datetime) -> datetime:
    """An aware datetime in ``TIME_ZONE``, from a datetime in Django's convention."""
    zone = timezone.get_default_timezone()
    if timezone.is_naive(moment):
        return timezone.make_aware(moment, zone)
    return timezone.localtime(moment, zone)


def _from_local(moment: datetime) -> datetime:
    """Back to Django's convention: aware UTC with ``USE_TZ``, naive local without."""
    if settings.USE_TZ:
        return moment.astimezone(UTC)
    return timezone.make_naive(moment, timezone.get_default_timezone())
