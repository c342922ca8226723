"""Checks of plain values that several settings and arguments share."""

from __future__ import annotations

from typing import TypeGuard


def is_whole_number(value: object, low: int, high: int | None = None) -> TypeGuard[int]:
    """Whether ``value`` is an int (not a bool) from ``low`` to ``high`` (no upper bound
    when None)."""
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))
