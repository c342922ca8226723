"""Running one task: call it with its log captured, its connections closed and its time limited,
and say how it ended."""

from __future__ import annotations

import datetime
import logging
import time
import traceback
from dataclasses import dataclass, field

import gevent
from django.db import close_old_connections, connections
from django.utils import timezone
from gevent import GreenletExit

from carrot import lifecycle, registry
from carrot.exceptions import TimeLimitExceeded
from carrot.framework_tasks import FrameworkTask
from carrot.message import TaskMessage
from carrot.worker import logcapture

logger = logging.getLogger('carrot.task')


@dataclass(frozen=True)
class Outcome:
    """How a task ended: returned (``exception`` None) or raised."""

    output: str | None
    log: str
    exception: BaseException | None = None
    traceback: str | None = None
    #: When the task ended (its row is written a little later, in a batch).
    ended_at: datetime.datetime = field(default_factory=timezone.now)
    #: When it began to run (seconds since the epoch) and for how long it ran (by the
    #: monotonic clock); None for a task that did not run (it expired).
    ran_from: float | None = None
    ran_for: float | None = None

    @property
    def exception_text(self) -> str | None:
        """``module.Class: message``, as a traceback's last line names it (a builtin
        exception by its name alone)."""
        if self.exception is None:
            return None
        return f'{class_path(type(self.exception))}: {self.exception}'


def class_path(cls: type[BaseException]) -> str:
    """The dotted path of an exception class; a builtin one's name alone."""
    module = cls.__module__
    return cls.__qualname__ if module == 'builtins' else f'{module}.{cls.__qualname__}'


def execute(function: registry.Task, task_message: TaskMessage, time_limit: float) -> Outcome:
    """Run the task and report its outcome; only BaseExceptions such as a kill escape.

    Past ``time_limit`` seconds TimeLimitExceeded is raised inside the task (at its next
    wait: a task that never yields to the gevent hub cannot be stopped).
    """
    ran_from, began = time.time(), time.monotonic()
    with logcapture.capture() as lines:
        # The database connections of this greenlet are opened by the task if it needs them
        # and closed (as Django's request cycle would) around it.
        close_old_connections()
        try:
            logger.info('Starting task %s (%s)', task_message.task, task_message.message_id)
            stop = TimeLimitExceeded(f'the task ran past its time limit of {time_limit:g} s')
            with gevent.Timeout(time_limit, stop):
                if isinstance(function, FrameworkTask):
                    result = function.run(task_message)  # with its context and signals
                else:
                    result = function(*task_message.args, **task_message.kwargs)
        except GreenletExit:
            raise  # the service is stopping at once: the message goes back unacknowledged
        except BaseException as error:
            if isinstance(error, TimeLimitExceeded):
                # Stopped perhaps in the middle of a query: its connections cannot be trusted.
                connections.close_all()
            # SystemExit or a stray gevent.Timeout from a task must not take the worker down.
            logger.error('Task %s failed: %s: %s', task_message.task,
                         type(error).__name__, error)
            return Outcome(output=None, log='\n'.join(lines), exception=error,
                           traceback=traceback.format_exc(), ran_from=ran_from,
                           ran_for=time.monotonic() - began)
        finally:
            close_old_connections()
        logger.info('Task %s completed', task_message.task)
        return Outcome(output=lifecycle.output_text(result), log='\n'.join(lines),
                       ran_from=ran_from, ran_for=time.monotonic() - began)
