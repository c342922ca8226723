"""Template filters of the carrot monitor: times in the viewer's zone, durations, JSON; the
overview's sparklines."""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Sequence
from typing import Any

from django import template
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import escape, format_html
from django.utils.safestring import SafeString, mark_safe
from django.utils.timesince import timesince, timeuntil

from carrot import rollups

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


@register.filter
def latency(seconds: float | None) -> str:
    """A wait or run time from the rollups: "0.4 ms", "35 ms", "1.52 s"; the longest bucket's
    "> 1 h 9 min"."""
    if seconds is None:
        return '—'
    if seconds >= rollups.EDGES[-1]:
        return f'> {seconds_text(rollups.EDGES[-1])}'
    if seconds < 0.01:
        return f'{seconds * 1000:.1f} ms'
    return seconds_text(seconds)


@register.filter
def percent(rate: float | None) -> str:
    """A rate from 0 to 1 as "2.5 %"."""
    if rate is None:
        return '—'
    return f'{rate * 100:.1f} %' if rate else '0 %'


#: A sparkline's size, in CSS pixels (the CSS may stretch it).
SPARK_WIDTH, SPARK_HEIGHT = 180, 36


@register.simple_tag
def sparkline(series: Sequence[Sequence[float | None]], label: str = '', bars: bool = False,
              log: bool = False, danger: bool = False) -> SafeString:
    """A small inline SVG chart of one to three series over the same periods, drawn
    server-side: lines (``log``: on a log scale from 1 ms, for times), or ``bars`` (the
    second series, failures say, drawn over the first). A None is a gap. Its colours are the
    stylesheet's (``.spark``), so it follows dark mode; ``danger``: the first line in red."""
    count = max((len(values) for values in series), default=0)
    scaled = [[_scaled(value, log) for value in values] for values in series]
    top = max((value for values in scaled for value in values if value is not None),
              default=0.0)
    parts: list[str] = []
    width, height = float(SPARK_WIDTH), float(SPARK_HEIGHT)
    if count and top > 0:
        if bars:
            step = width / count
            for number, values in enumerate(scaled, start=1):
                parts += [f'<rect class="s{number}" x="{index * step:.2f}" '
                          f'y="{height - value / top * height:.2f}" '
                          f'width="{max(step - 0.5, 0.5):.2f}" '
                          f'height="{value / top * height:.2f}"/>'
                          for index, value in enumerate(values) if value]
        else:
            step = width / max(count - 1, 1)
            for number, values in enumerate(scaled, start=1):
                for run in _runs(values):
                    points = [(index * step, height - 1 - value / top * (height - 2))
                              for index, value in run]
                    if len(points) == 1:  # a lone value: a short dash
                        x, y = points[0]
                        points = [(max(x - 1.5, 0), y), (min(x + 1.5, width), y)]
                    parts.append(f'<polyline class="s{number}" points="'
                                 + ' '.join(f'{x:.2f},{y:.2f}' for x, y in points) + '"/>')
    text = escape(label)
    kind = ' bars' if bars else ' danger' if danger else ''
    return mark_safe(  # noqa: S308  (numbers, and the escaped label)
        f'<svg class="spark{kind}" viewBox="0 0 {SPARK_WIDTH} {SPARK_HEIGHT}" '
        f'width="{SPARK_WIDTH}" height="{SPARK_HEIGHT}" preserveAspectRatio="none" role="img" '
        f'aria-label="{text}"><title>{text}</title>'
        f'<line class="base" x1="0" y1="{height - 0.5}" x2="{width}" y2="{height - 0.5}"/>'
        + ''.join(parts) + '</svg>')


def _scaled(value: float | None, log: bool) -> float | None:
    if value is None:
        return None
    if log:
        return math.log10(max(value, rollups.EDGES[0]) / rollups.EDGES[0]) + 0.1
    return max(float(value), 0.0)


def _runs(values: list[float | None]) -> list[list[tuple[int, float]]]:
    """The stretches of ``values`` without a gap, each value with its index."""
    found: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    for index, value in enumerate(values):
        if value is None:
            if current:
                found.append(current)
            current = []
        else:
            current.append((index, value))
    if current:
        found.append(current)
    return found
