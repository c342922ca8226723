"""A MessageLog row as Django's task framework reads it: a ``TaskResult``.

=============================  ===================================================
MessageLog                     TaskResult
=============================  ===================================================
PUBLISHED, DELAYED             READY (DELAYED: waiting for its ``run_after`` or retry)
IN_PROGRESS                    RUNNING
COMPLETED                      SUCCESSFUL, ``return_value`` from ``output``
FAILED                         FAILED
``errors`` entries, then the   ``errors``: one TaskError per failed attempt since the
final ``exception``            last requeue, the class path from the exception text
``worker`` of each attempt     ``worker_ids``, one per attempt (``host:pid``)
``publish_time``               ``enqueued_at``
first attempt's start          ``started_at``; ``start_time``: ``last_attempted_at``
``completion_time`` or         ``finished_at``
``failure_time``
=============================  ===================================================
"""

from __future__ import annotations

import builtins
import datetime
import json
import re
import sys
from typing import Any

from carrot import _django_tasks as framework
from carrot import registry
from carrot.exceptions import TaskImportError, TaskNotRegistered
from carrot.framework_tasks import FrameworkTask
from carrot.models import MessageLog, Status

STATUSES = {
    Status.PUBLISHED: framework.TaskResultStatus.READY,
    Status.DELAYED: framework.TaskResultStatus.READY,
    Status.IN_PROGRESS: framework.TaskResultStatus.RUNNING,
    Status.COMPLETED: framework.TaskResultStatus.SUCCESSFUL,
    Status.FAILED: framework.TaskResultStatus.FAILED,
}
#: What a row's exception text starts with when it names a class (``module.Class: ...``).
_CLASS_NAME = re.compile(r'[A-Za-z_][\w.]*')
#: The class path of a failure whose text names no exception class (a refusal's reason).
REFUSED_CLASS_PATH = 'carrot.exceptions.CarrotError'


def result_of(row: MessageLog, alias: str) -> framework.TaskResult[Any, Any]:
    """The result ``row`` records; TaskResultDoesNotExist when its task is not a ``@task``
    task this project can load."""
    task = _task_of(row)
    status = STATUSES[Status(row.status)]
    attempts = attempts_since_requeue(row.errors)
    errors = [_error(entry.get('exception'), entry.get('traceback')) for entry in attempts]
    workers = [str(entry.get('worker') or 'unknown') for entry in attempts]
    final_listed = bool(attempts) and attempts[-1].get('exception') == row.exception \
        and attempts[-1].get('traceback') == row.traceback
    if status == framework.TaskResultStatus.FAILED and not final_listed:
        errors.append(_error(row.exception, row.traceback))
    current = (status in (framework.TaskResultStatus.RUNNING,
                          framework.TaskResultStatus.SUCCESSFUL)
               or status == framework.TaskResultStatus.FAILED and not final_listed)
    if current and row.attempts > 0:
        workers.append(row.worker or 'unknown')
    first_start = _time(attempts[0].get('started_at')) if attempts else None
    finished_at = {framework.TaskResultStatus.SUCCESSFUL: row.completion_time,
                   framework.TaskResultStatus.FAILED: row.failure_time}.get(status)
    result: framework.TaskResult[Any, Any] = framework.TaskResult(
        task=task.task, id=row.uuid, status=status, enqueued_at=row.publish_time,
        started_at=first_start or row.start_time, finished_at=finished_at,
        last_attempted_at=row.start_time, args=row.positionals, kwargs=row.keywords,
        backend=alias, errors=errors, worker_ids=workers)
    if status == framework.TaskResultStatus.SUCCESSFUL:
        object.__setattr__(result, '_return_value', _value(row.output))
    return result


def attempts_since_requeue(errors: object) -> list[dict[str, Any]]:
    """The failed attempts in a row's ``errors`` after its last requeue, oldest first."""
    if not isinstance(errors, list):
        return []
    found: list[dict[str, Any]] = []
    for entry in errors:
        if isinstance(entry, dict) and 'requeued_at' in entry:
            found = []
        elif isinstance(entry, dict) and 'attempt' in entry:
            found.append(entry)
    return found


def exception_class_path(text: str | None) -> str:
    """The dotted path of the exception class a row's exception text names.

    carrot writes ``module.Class: message`` (a builtin by its name alone). A text that names
    no class gives REFUSED_CLASS_PATH: a message carrot refused, whose reason may start with
    the task's own path (``myapp.tasks.send: myapp.tasks has no function called send``).
    A class is told from a task by its name (CapWords, as PEP 8 names classes) and, where
    its module is loaded here, by being an exception class.
    """
    head = (text or '').partition(':')[0].strip()
    if not _CLASS_NAME.fullmatch(head):
        return REFUSED_CLASS_PATH
    module_name, _, name = head.rpartition('.')
    if not name[:1].isupper():
        return REFUSED_CLASS_PATH
    if not module_name:
        module_name = 'builtins' if isinstance(getattr(builtins, name, None), type) \
            else 'carrot.exceptions'  # rows written before 0010 named carrot's bare
    module = sys.modules.get(module_name)
    if module is not None:
        found = getattr(module, name, None)
        if not (isinstance(found, type) and issubclass(found, BaseException)):
            return REFUSED_CLASS_PATH
    return f'{module_name}.{name}'


def _error(exception: object, traceback: object) -> framework.TaskError:
    return framework.TaskError(
        exception_class_path=exception_class_path(exception if isinstance(exception, str)
                                                  else None),
        traceback=traceback if isinstance(traceback, str) else '')


def _task_of(row: MessageLog) -> FrameworkTask:
    try:
        task = registry.resolve(row.task)
    except (TaskNotRegistered, TaskImportError) as error:
        raise framework.TaskResultDoesNotExist(
            f'The task of result {row.uuid!r} cannot be loaded: {error}') from error
    if not isinstance(task, FrameworkTask):
        raise framework.TaskResultDoesNotExist(
            f'Result {row.uuid!r} is of {row.task}, a plain carrot task rather than one of '
            f'Django\'s task framework (@task): read its MessageLog row instead.')
    return task


def _time(text: object) -> datetime.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        return None


def _value(output: str | None) -> Any:
    """A task's stored return value: JSON (as a framework task returns it), else its text."""
    if output is None:
        return None
    try:
        return json.loads(output)
    except ValueError:
        return output
