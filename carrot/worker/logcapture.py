"""A task's own log: what it logged on the ``carrot`` logger while it ran.

Each running task gets a buffer in a context variable; greenlets each have their own
context, so with a hundred tasks at once every line lands in the buffer of the task that
logged it (upstream matched on thread names and mixed them up).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator

LOG_FORMAT = '%(asctime)s %(levelname)s %(name)s: %(message)s'

_buffer: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    'carrot_task_log', default=None
)


class TaskLogHandler(logging.Handler):
    """Routes each record to the buffer of the task running where it was logged."""

    def emit(self, record: logging.LogRecord) -> None:
        buffer = _buffer.get()
        if buffer is None:
            return
        try:
            buffer.append(self.format(record))
        except Exception:
            self.handleError(record)


def install(level: int) -> TaskLogHandler:
    """Attach the capturing handler to the ``carrot`` logger."""
    handler = TaskLogHandler(level)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    carrot_logger = logging.getLogger('carrot')
    carrot_logger.addHandler(handler)
    if carrot_logger.level == logging.NOTSET or carrot_logger.level > level:
        carrot_logger.setLevel(level)
    return handler


@contextlib.contextmanager
def capture() -> Iterator[list[str]]:
    """Collect the lines the current task logs into the yielded list."""
    lines: list[str] = []
    token = _buffer.set(lines)
    try:
        yield lines
    finally:
        _buffer.reset(token)
