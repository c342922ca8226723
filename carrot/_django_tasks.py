"""Django's task framework, from wherever this project has it: ``django.tasks`` (Django 6.0
and later) or the ``django-tasks`` backport (Django 5.2, with ``'django_tasks'`` in
``INSTALLED_APPS``). The rest of carrot imports the framework from here, and only here.

Importing this module without either raises ImportError that says what to install.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

#: Where the framework comes from: ``'django.tasks'`` or ``'django_tasks'``.
SOURCE = ('django.tasks' if importlib.util.find_spec('django.tasks') is not None
          else 'django_tasks')

# Typed against django-stubs' django.tasks, which the backport mirrors.
if TYPE_CHECKING or SOURCE == 'django.tasks':
    from django.tasks import Task, TaskContext, TaskResult, TaskResultStatus, task_backends
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import (
        DEFAULT_TASK_PRIORITY,
        DEFAULT_TASK_QUEUE_NAME,
        TASK_MAX_PRIORITY,
        TASK_MIN_PRIORITY,
        TaskError,
    )
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.utils.json import normalize_json
else:
    try:
        from django_tasks import TaskContext, TaskResult, TaskResultStatus, task_backends
    except ImportError as error:
        raise ImportError(
            'carrot.task_backend needs Django\'s task framework: upgrade to Django 6.0 or '
            'later, or on Django 5.2 install the backport ("pip install django-tasks") and '
            'add "django_tasks" to INSTALLED_APPS.') from error
    from django_tasks.backends.base import BaseTaskBackend
    from django_tasks.base import (
        DEFAULT_TASK_PRIORITY,
        DEFAULT_TASK_QUEUE_NAME,
        TASK_MAX_PRIORITY,
        TASK_MIN_PRIORITY,
        Task,
        TaskError,
    )
    from django_tasks.exceptions import InvalidTaskError as InvalidTask
    from django_tasks.exceptions import TaskResultDoesNotExist
    from django_tasks.signals import task_enqueued, task_finished, task_started
    from django_tasks.utils import normalize_json

__all__ = ['DEFAULT_TASK_PRIORITY', 'DEFAULT_TASK_QUEUE_NAME', 'SOURCE', 'TASK_MAX_PRIORITY',
           'TASK_MIN_PRIORITY', 'BaseTaskBackend', 'InvalidTask', 'Task', 'TaskContext',
           'TaskError', 'TaskResult', 'TaskResultDoesNotExist', 'TaskResultStatus',
           'normalize_json', 'task_backends', 'task_enqueued', 'task_finished', 'task_started']
