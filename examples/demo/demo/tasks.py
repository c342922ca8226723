"""The demo's tasks: plain functions in a module listed in CARROT['task_modules']."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger('carrot.demo')


def add(a: int, b: int) -> int:
    """Returns a value: it is stored, as JSON, in MessageLog.output."""
    return a + b


def greet(name: str, greeting: str = 'Hello') -> str:
    """Logs on a child of the 'carrot' logger: the lines land in MessageLog.log."""
    logger.info('greeting %s', name)
    time.sleep(0.2)  # gevent-patched: other tasks run meanwhile
    logger.info('greeted %s', name)
    return f'{greeting}, {name}!'


def divide(a: float, b: float) -> float:
    """Fails when b is 0: the row says FAILED, with the exception and traceback."""
    return a / b


def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
