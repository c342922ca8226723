"""What the monitor's lists read: filters, keyset pages and capped counts.

No list uses OFFSET or counts a whole table. Each page is ``WHERE … AND id < <last id of the
page before> ORDER BY id DESC LIMIT n``, which an index on (status, id), (queue, status,
id) or (task, status, id) serves at any depth; counts stop at COUNT_CAP. A search in the
arguments' text (which no index serves) looks through at most SCAN_WINDOW rows per page,
and says where it stopped so the next page goes on from there.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from django.db import models
from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from carrot.models import MessageLog

#: The monitor's names for the statuses, as they appear in its URLs and API.
STATUSES: dict[str, str] = {
    'queued': MessageLog.PUBLISHED,
    'delayed': MessageLog.DELAYED,
    'running': MessageLog.IN_PROGRESS,
    'failed': MessageLog.FAILED,
    'completed': MessageLog.COMPLETED,
}
STATUS_NAMES: dict[str, str] = {value: key for key, value in STATUSES.items()}
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
COUNT_CAP = 1000
SCAN_WINDOW = 10_000
#: The columns a list does not show, left unread (they can be large).
LIST_DEFERRED = ('log', 'traceback', 'output', 'errors')

Row = TypeVar('Row', bound=models.Model)


class FilterError(ValueError):
    """A filter value that cannot be used; the message names the parameter."""


@dataclass(frozen=True)
class TaskFilter:
    """One list of tasks: a status, and the filters the viewer chose."""

    status: str = 'queued'
    queue: str = ''
    #: The start of the task's dotted path.
    task: str = ''
    #: Published at or after / before.
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None
    #: Text that the positional or keyword arguments contain.
    args: str = ''
    #: A message id (the AMQP message_id, which is MessageLog.uuid).
    message_id: str = ''

    @classmethod
    def from_params(cls, status: str, params: Mapping[str, Any]) -> TaskFilter:
        if status not in STATUSES:
            raise FilterError(f'status must be one of {", ".join(STATUSES)}, not {status!r}.')

        def text(name: str) -> str:
            value = params.get(name) or ''
            return str(value).strip()[:200]

        return cls(status=status, queue=text('queue'), task=text('task'),
                   since=_time(text('since'), 'since'), until=_time(text('until'), 'until'),
                   args=text('args'), message_id=text('id'))

    def queryset(self) -> QuerySet[MessageLog]:
        """The rows of this list (the argument search apart), newest first."""
        rows = MessageLog.objects.filter(status=STATUSES[self.status])
        if self.queue:
            rows = rows.filter(queue=self.queue)
        if self.task:
            rows = rows.filter(task__startswith=self.task)
        if self.since is not None:
            rows = rows.filter(publish_time__gte=self.since)
        if self.until is not None:
            rows = rows.filter(publish_time__lt=self.until)
        if self.message_id:
            rows = rows.filter(uuid=self.message_id)
        return rows.order_by('-id')

    def matches_args(self, rows: QuerySet[MessageLog]) -> QuerySet[MessageLog]:
        if not self.args:
            return rows
        return rows.filter(Q(task_args__icontains=self.args) | Q(content__icontains=self.args))

    def params(self) -> dict[str, str]:
        """The filter as query parameters (the status apart, which is in the path)."""
        found = {'queue': self.queue, 'task': self.task, 'args': self.args,
                 'id': self.message_id,
                 'since': self.since.isoformat() if self.since else '',
                 'until': self.until.isoformat() if self.until else ''}
        return {key: value for key, value in found.items() if value}

    def describe(self) -> str:
        """In words, for the audit log and the confirmation page."""
        parts = [f'{key}={value}' for key, value in self.params().items()]
        where = f' matching {", ".join(parts)}' if parts else ''
        return f'{self.status} tasks{where}'

    @property
    def filtered(self) -> bool:
        return bool(self.params())


def _time(value: str, name: str) -> datetime.datetime | None:
    """An ISO time; without an offset it is read in the viewer's time zone."""
    if not value:
        return None
    try:
        parsed = parse_datetime(value)
    except ValueError:
        parsed = None
    if parsed is None:
        raise FilterError(f'{name} must be a time such as 2026-12-01T09:30, not {value!r}.')
    if timezone.is_naive(parsed):
        parsed = timezone.make_aware(parsed, timezone.get_current_timezone())
    return parsed


@dataclass(frozen=True)
class Page(Generic[Row]):
    rows: list[Row]
    #: Pass as ``after`` for the next page; None on the last page.
    next_after: int | None
    #: Set when a search stopped at SCAN_WINDOW rows before filling the page.
    note: str = ''
    first: bool = True


def cursor(value: Any) -> int | None:
    """The ``after`` parameter: the id the page starts below."""
    if value in (None, ''):
        return None
    try:
        after = int(value)
    except (TypeError, ValueError):
        raise FilterError(f'after must be a row id, not {value!r}.') from None
    if after < 1:
        raise FilterError(f'after must be a row id, not {value!r}.')
    return after


def page_size(value: Any) -> int:
    if value in (None, ''):
        return PAGE_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise FilterError(f'limit must be a whole number, not {value!r}.') from None
    return max(1, min(size, MAX_PAGE_SIZE))


def keyset(rows: QuerySet[Row], after: int | None, size: int = PAGE_SIZE) -> Page[Row]:
    """One page of ``rows`` (ordered by descending id) below id ``after``."""
    if after is not None:
        rows = rows.filter(pk__lt=after)
    found = list(rows.order_by('-pk')[:size + 1])
    more = len(found) > size
    found = found[:size]
    return Page(found, found[-1].pk if more and found else None, first=after is None)


def task_page(chosen: TaskFilter, after: int | None, size: int = PAGE_SIZE) -> Page[MessageLog]:
    rows = chosen.queryset().defer(*LIST_DEFERRED)
    if not chosen.args:
        return keyset(rows, after, size)
    # A text search: look through the next SCAN_WINDOW rows of the list at most.
    window = rows if after is None else rows.filter(pk__lt=after)
    boundary = list(window.values_list('pk', flat=True)[SCAN_WINDOW - 1:SCAN_WINDOW])
    if boundary:
        window = window.filter(pk__gte=boundary[0])
    found = list(chosen.matches_args(window)[:size + 1])
    if len(found) > size:
        return Page(found[:size], found[size - 1].pk, first=after is None)
    if boundary and rows.filter(pk__lt=boundary[0]).exists():
        note = (f'Searched {SCAN_WINDOW:,} rows for the argument text; the next page '
                f'searches further.')
        return Page(found, boundary[0], note=note, first=after is None)
    return Page(found, None, first=after is None)


@dataclass(frozen=True)
class Count:
    """A row count that stops at COUNT_CAP."""

    value: int
    capped: bool

    def __str__(self) -> str:
        return f'{self.value:,}+' if self.capped else f'{self.value:,}'

    def as_json(self) -> dict[str, Any]:
        return {'value': self.value, 'capped': self.capped}


def capped_count(rows: QuerySet[Any], cap: int | None = None) -> Count:
    """COUNT over at most ``cap`` (COUNT_CAP) + 1 rows: cheap at any table size."""
    cap = COUNT_CAP if cap is None else cap
    value = rows.order_by()[:cap + 1].count()
    return Count(min(value, cap), value > cap)


def status_counts(chosen: TaskFilter) -> dict[str, Count]:
    """The capped count of each status list under the same queue, task and time filters."""
    counts = {}
    for name in STATUSES:
        other = TaskFilter(status=name, queue=chosen.queue, task=chosen.task,
                           since=chosen.since, until=chosen.until,
                           message_id=chosen.message_id)
        counts[name] = capped_count(other.queryset())
    return counts


def find_task(text: str) -> MessageLog | None:
    """The row of a message id, or of a row id."""
    text = text.strip()
    if not text:
        return None
    found = MessageLog.objects.filter(uuid=text).first()
    if found is None and text.isdigit():
        found = MessageLog.objects.filter(pk=int(text)).first()
    return found


def queue_names() -> list[str]:
    """The queues of the settings, for the queue filter (never their brokers)."""
    from carrot.conf import get_settings

    return [queue.name for queue in get_settings().queues]


# The worker's log lines: "2026-12-01 09:30:00,123 INFO carrot.task: text".
_LOG_LINE = re.compile(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ (?P<level>[A-Z]+) ')
LEVELS = ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')


@dataclass
class LogLine:
    """One log record; a record's continuation lines (a traceback) are part of its text."""

    level: str
    text: str
    number: int = 0
    extra: list[str] = field(default_factory=list)

    @property
    def full(self) -> str:
        return '\n'.join([self.text, *self.extra])


def log_lines(log: str | None, level: str = '', search: str = '') -> list[LogLine]:
    """The records of ``log`` at ``level`` or above that contain ``search``."""
    records: list[LogLine] = []
    for number, line in enumerate((log or '').splitlines(), start=1):
        match = _LOG_LINE.match(line)
        if match is None and records:
            records[-1].extra.append(line)
            continue
        records.append(LogLine(match.group('level') if match else '', line, number))
    level = level.upper()
    if level in LEVELS:
        floor = LEVELS.index(level)
        records = [r for r in records if r.level in LEVELS and LEVELS.index(r.level) >= floor]
    if search:
        lowered = search.lower()
        records = [r for r in records if lowered in r.full.lower()]
    return records
