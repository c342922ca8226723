"""Text as the database takes it: no NUL, no lone surrogate, no longer than its column."""

from __future__ import annotations

import functools

from carrot.models import MessageLog


def clean(text: str) -> str:
    """Text a database takes: no NUL (PostgreSQL refuses it) and no lone surrogate.

    A lone surrogate is what Python makes of bytes it could not decode (a file name, say);
    no driver can encode it, so it is written as its escape, ``\\udcff``.
    """
    if '\x00' in text:
        text = text.replace('\x00', '')
    if text.isascii():  # the usual case, and a constant-time check
        return text
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        text = text.encode('utf-8', 'backslashreplace').decode('utf-8')
    return text


def clean_optional(text: str | None) -> str | None:
    return None if text is None else clean(text)


def fit(text: str, column: str) -> str:
    """``text`` cleaned and cut to what MessageLog's ``column`` holds (a foreign producer's
    names may be longer)."""
    return clean(text)[:column_length(column)]


@functools.cache
def column_length(column: str) -> int:
    """The ``max_length`` of MessageLog's ``column``, read from the model once."""
    length = getattr(MessageLog._meta.get_field(column), 'max_length', None)
    if not isinstance(length, int):
        raise TypeError(f'MessageLog.{column} has no max_length')
    return length
