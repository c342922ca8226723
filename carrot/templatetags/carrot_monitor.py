"""Template filters of the carrot monitor: times in the viewer's zone, durations, JSON."""

from __future__ import annotations

import datetime
import json
from typing import Any

from django import template
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.timesince import timesince, timeuntil

register = template.Library()


@register.filter
def when(value: datetime.datetime | None) -> SafeString | str:
    """A time as "3 minutes ago", the full time (in the viewer's zone) on hover."""
    if value is None:
        return '—'
    local = timezone.localtime(value) if timezone.is_aware(value) else value
    now = timezone.now()
    relative = (f'{timesince(value, now)} ago' if value <= now
                else f'in {timeuntil(value, now)}')
    return format_html('<time datetime="{}" title="{}">{}</time>', value.isoformat(),
                       date_format(local, 'Y-m-d H:i:s T'), relative)


@register.filter
def exact(value: datetime.datetime | None) -> str:
    """The full time in the viewer's zone."""
    if value is None:
        return '—'
    local = timezone.localtime(value) if timezone.is_aware(value) else value
    return date_format(local, 'Y-m-d H:i:s.u T')


def seconds_text(seconds: float) -> str:
    if seconds < 1:
        return f'{seconds * 1000:.0f} ms'
    if seconds < 60:
        return f'{seconds:.2f} s'
    minutes, rest = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours} h {minutes} min' if hours else f'{minutes} min {rest} s'


@register.filter
def duration(start: datetime.datetime | None, end: datetime.datetime | None) -> str:
    """The time from ``start`` to ``end``, such as "1.52 s"."""
    if start is None or end is None:
        return '—'
    return seconds_text(max((end - start).total_seconds(), 0.0))


@register.filter
def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


@register.filter
def short_json(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else f'{text[:77]}...'
