"""A task of Django's task framework (``@task``) as carrot's worker runs it.

The registry hands the worker a FrameworkTask for a path that names a ``@task`` object. It
runs the function with a ``TaskContext`` when the task takes one, sends ``task_started``
before it and, once the end is recorded, ``task_finished`` (from inside an ``except`` block
for a failure, as Django's own receiver expects). An attempt that fails and is retried ends
nothing: ``task_finished`` is sent for the last attempt only.

This module imports without the framework installed (the executor imports it); the
framework itself is imported, from ``carrot._django_tasks``, only once a task needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError, close_old_connections
from django.utils import timezone

from carrot import options as task_options
from carrot._process import worker_id
from carrot.exceptions import CarrotError

if TYPE_CHECKING:
    from carrot import _django_tasks as framework
    from carrot.message import TaskMessage
    from carrot.task_backend import CarrotBackend
    from carrot.worker.executor import Outcome

logger = logging.getLogger('carrot.task')


class FrameworkTask:
    """The runner of one ``@task`` object, which the registry found at its own path."""

    def __init__(self, task: framework.Task[Any, Any]) -> None:
        #: The module's ``Task`` object.
        self.task = task

    def __repr__(self) -> str:
        return f'<FrameworkTask {self.task.module_path}>'

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function as ``Task.call`` does (with no context)."""
        return self.task.call(*args, **kwargs)

    @property
    def carrot_options(self) -> Mapping[str, Any]:
        """The task's options as ``carrot.options`` reads them (its ``ATTRIBUTE``): those of
        ``@task_options`` under ``@task``, then those given to ``@task(...)`` itself."""
        given = dict(getattr(self.task.func, task_options.ATTRIBUTE, None) or {})
        own = getattr(self.task, 'carrot_options', None)
        if own is not None:
            given.update(own)
        return given

    def backend(self) -> CarrotBackend:
        """The carrot backend the task's results come from: its own, when that is carrot's,
        else the first carrot backend in ``TASKS``."""
        from carrot.task_backend import carrot_backend

        return carrot_backend(self.task.backend)

    def run(self, task_message: TaskMessage) -> Any:
        """Send ``task_started``, run the function, and return its value as JSON takes it
        (a value JSON cannot hold fails the task, as on Django's own backends)."""
        from carrot import _django_tasks as framework

        backend = self.backend()
        now = timezone.now()
        running: framework.TaskResult[Any, Any] = framework.TaskResult(
            task=self.task, id=task_message.message_id,
            status=framework.TaskResultStatus.RUNNING, enqueued_at=None, started_at=now,
            finished_at=None, last_attempted_at=now, args=task_message.args,
            kwargs=task_message.kwargs, backend=backend.alias, errors=[],
            # Built without reading the row: the attempt count is right, and the earlier
            # attempts' workers are in get_result().
            worker_ids=[worker_id()] * task_message.attempt,
        )
        framework.task_started.send(sender=type(backend), task_result=running)
        args = list(task_message.args)
        if self.task.takes_context:
            args.insert(0, framework.TaskContext(task_result=running))
        value = self.task.func(*args, **task_message.kwargs)
        try:
            return framework.normalize_json(value)
        except TypeError as error:
            raise TypeError(
                f'{self.task.module_path} returned a {type(value).__name__}, which JSON cannot '
                f'hold ({error}); a task of Django\'s task framework must return JSON '
                f'(dicts, lists, strings, numbers, True, False or None).') from None

    def send_finished(self, message_id: str, outcome: Outcome) -> None:
        """Send ``task_finished`` with the result as recorded; for a failure, from inside an
        ``except`` block that holds its exception."""
        from carrot import _django_tasks as framework

        try:
            backend = self.backend()
            result = backend.get_result(message_id)
        except (CarrotError, DatabaseError, framework.TaskResultDoesNotExist) as error:
            logger.warning('task_finished not sent for %s (%s): its result could not be '
                           'read: %s', self.task.module_path, message_id, error)
            return
        finally:
            close_old_connections()
        failure = outcome.exception
        if failure is None:
            self._send(backend, result)
            return
        traceback = failure.__traceback__  # raising it again would add this frame to it
        try:
            raise failure
        except BaseException:
            self._send(backend, result)
        finally:
            failure.__traceback__ = traceback

    @staticmethod
    def _send(backend: CarrotBackend, result: framework.TaskResult[Any, Any]) -> None:
        from carrot import _django_tasks as framework

        try:
            framework.task_finished.send(sender=type(backend), task_result=result)
        except Exception:
            logger.exception('A task_finished receiver raised for %s', result.id)
