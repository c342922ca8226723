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
