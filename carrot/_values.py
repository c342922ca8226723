"""Checks of plain values that several settings and arguments share."""

from __future__ import annotations

import datetime
import re
from typing import TypeGuard

_AGE = re.compile(r'(?P<count>\d+(?:\.\d+)?)\s*(?P<unit>[smhdw])')
_UNITS = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400, 'w': 604800}


def is_whole_number(value: object, low: int, high: int | None = None) -> TypeGuard[int]:
    """Whether ``value`` is an int (not a bool) from ``low`` to ``high`` (no upper bound
    when None)."""
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))


#: The longest delay, expiry or backoff carrot takes: ten years (a datetime this far ahead
#: is still far from its maximum).
MAX_SECONDS = 10 * 366 * 86400


def is_seconds(value: object, *, positive: bool = True) -> TypeGuard[int | float]:
    """Whether ``value`` is a number of seconds (not a bool) above 0 (or from 0 when not
    ``positive``) and at most MAX_SECONDS."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (value > 0 if positive else value >= 0) and value <= MAX_SECONDS)


def parse_age(text: object) -> datetime.timedelta | None:
    """``'90s'``, ``'30m'``, ``'12h'``, ``'7d'`` or ``'2w'`` as a timedelta; None when
    ``text`` is not such an age."""
    if not isinstance(text, str):
        return None
    matched = _AGE.fullmatch(text.strip().lower())
    if matched is None:
        return None
    return datetime.timedelta(seconds=float(matched['count']) * _UNITS[matched['unit']])


AGE_HELP = 'a number and a unit, such as 90s, 30m, 12h, 7d or 2w'
