"""Tasks written for Django's task framework, with no carrot-specific code but the options
that @task passes to carrot's task class where the Django line allows it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import django

from carrot._django_tasks import SOURCE
from carrot.options import task_options

if SOURCE == 'django.tasks':
    from django.tasks import TaskContext, task
else:
    from django_tasks import TaskContext, task

#: Django 6.1 and the backport pass @task's extra keyword arguments to the backend's
#: task class; 6.0 refuses them.
TASK_TAKES_OPTIONS = SOURCE == 'django_tasks' or django.VERSION >= (6, 1)


@task
def add(a: int, b: int) -> int:
    return a + b


@task
def fails(message: str) -> None:
    raise LookupError(message)


class Declined(Exception):
    """An error of the project's own."""


@task
def declines() -> None:
    raise Declined('card refused')


@task
def record(path: str, label: str) -> str:
    """Append ``label`` and the time to ``path``; return the label."""
    with open(path, 'a') as file:
        file.write(json.dumps({'label': label, 'at': time.time()}) + '\n')
    return label


def _flaky(context: TaskContext, path: str, failures: int) -> dict[str, Any]:
    with open(path, 'a') as file:
        file.write(f'{context.attempt}\n')
    if context.attempt <= failures:
        raise ConnectionError(f'attempt {context.attempt} fails')
    return {'attempt': context.attempt, 'id': context.task_result.id}


@task(takes_context=True)
@task_options(max_retries=2, retry_backoff=0.1, retry_backoff_max=0.2)
def flaky(context: TaskContext, path: str, failures: int) -> dict[str, Any]:
    """Fail the first ``failures`` attempts; write each attempt number seen to ``path``.
    Its retries set with @task_options, which works on every Django line."""
    return _flaky(context, path, failures)


if TASK_TAKES_OPTIONS:
    @task(takes_context=True, max_retries=2, retry_backoff=0.1, retry_backoff_max=0.2)
    def flaky_by_task(context: TaskContext, path: str, failures: int) -> dict[str, Any]:
        """As ``flaky``, its retries given to @task itself."""
        return _flaky(context, path, failures)


@task
def returns_a_set() -> Any:
    return {1, 2}


def plain_function() -> str:
    """Not a @task: never run from an app's tasks module."""
    return 'ran'


def lines(path: str) -> list[dict[str, Any]]:
    """The JSON lines ``record`` wrote."""
    found = Path(path)
    return [json.loads(line) for line in found.read_text().splitlines()] if found.exists() else []
