"""carrot as a backend of Django's task framework (``django.tasks``, or the ``django-tasks``
backport on Django 5.2)::

    TASKS = {'default': {'BACKEND': 'carrot.task_backend.CarrotBackend'}}

``enqueue`` publishes through ``publish_message``'s own path (the row, the confirm, the send
on commit inside a transaction) and returns a READY result whose id is the message id;
``get_result`` reads the MessageLog row (``carrot.task_results``). Creating the backend
opens no connection: Django creates it when a module with ``@task`` is imported, and the
first enqueue connects.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, fields
from typing import Any

from django.apps import apps
from django.conf import settings as django_settings
from django.core import checks
from django.db import connections, transaction
from django.utils import timezone
from django.utils.inspect import get_func_args

from carrot import _django_tasks as framework
from carrot import conf, lifecycle, publishing, registry, task_results
from carrot import options as task_options
from carrot.exceptions import CarrotConfigException, TaskImportError, TaskNotRegistered
from carrot.models import MessageLog

__all__ = ['CarrotBackend', 'CarrotTask', 'carrot_backend']

#: The backend's own ``OPTIONS``.
OPTION_NAMES = frozenset({'ENQUEUE_ON_COMMIT'})


@dataclass(frozen=True, slots=True, kw_only=True)
class CarrotTask(framework.Task):  # type: ignore[type-arg,misc]
    """A ``Task`` with carrot's task options (``carrot.options``), given to ``@task(...)``
    on Django 6.1 and the backport: ``@task(max_retries=3, time_limit=60)``. None leaves
    an option to the task's ``@task_options``, its queue and ``CARROT['task_defaults']``."""

    max_retries: int | None = None
    """How many times a failed attempt is run again."""
    retry_backoff: float | None = None
    """Seconds before the first retry (doubling, with jitter, up to ``retry_backoff_max``)."""
    retry_backoff_max: float | None = None
    """The longest wait before a retry, in seconds."""
    time_limit: float | None = None
    """Seconds an attempt may run before it is stopped."""
    expires: float | None = None
    """Seconds after the enqueue past which the task is not run any more."""

    @property
    def carrot_options(self) -> dict[str, Any]:
        """The options given, as ``@task_options`` takes them."""
        return {f.name: getattr(self, f.name) for f in fields(CarrotTask)
                if f.name in task_options.CALL_OPTIONS and getattr(self, f.name) is not None}


class CarrotBackend(framework.BaseTaskBackend):  # type: ignore[misc]
    """Runs tasks of Django's task framework on carrot's workers, recorded in MessageLog."""

    task_class = CarrotTask
    supports_defer = True
    supports_get_result = True
    supports_priority = True
    #: Tasks run in the worker's gevent greenlets, where an event loop per task would block
    #: the others: an ``async def`` task is refused when it is defined.
    supports_async_task = False

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        #: Without ``QUEUES``, every queue of ``CARROT['queues']`` may take tasks.
        self.queues = set(params['QUEUES']) if 'QUEUES' in params else set()
        #: True (the default): inside ``transaction.atomic()`` the task is sent when the
        #: transaction commits, and not at all on a rollback; False: at once, on its own.
        self.enqueue_on_commit = bool(self.options.get('ENQUEUE_ON_COMMIT', True))

    # -- validating --------------------------------------------------------------------

    def validate_task(self, task: framework.Task[Any, Any]) -> None:
        """InvalidTask, saying what to change, unless carrot can run ``task``."""
        name = getattr(task.func, '__qualname__', repr(task.func))
        if not _is_module_level_function(task.func):
            raise framework.InvalidTask(
                f'{name} is not defined at the top level of a module: carrot\'s worker finds '
                f'a task by its dotted path. Move the function to module level.')
        if inspect.iscoroutinefunction(task.func):
            raise framework.InvalidTask(
                f'{task.func.__module__}.{name} is an async function: carrot runs tasks in '
                f'gevent greenlets, where an event loop would block every other task. Write '
                f'it as a plain def (blocking calls are cooperative under gevent).')
        if task.takes_context and get_func_args(task.func)[:1] != ['context']:
            raise framework.InvalidTask(
                f'{name} takes the context (takes_context=True), so its first argument must '
                f'be called "context".')
        self._validate_queue(task.queue_name)
        self._validate_priority(task)
        if django_settings.USE_TZ and task.run_after is not None \
                and timezone.is_naive(task.run_after):
            raise framework.InvalidTask(
                f'run_after {task.run_after.isoformat()} is a naive datetime, and USE_TZ is '
                f'on: give it a time zone (django.utils.timezone.make_aware).')
        if apps.ready:  # an installed app's tasks module is known once the apps are
            try:
                registry.check_registered(task.module_path)
            except TaskNotRegistered as error:
                raise framework.InvalidTask(f'carrot\'s worker would refuse it: {error}'
                                            ) from error
        if isinstance(task, CarrotTask):
            try:
                task_options.validate(task.carrot_options, f'@task on {name}', code_as='none',
                                      consumer_timeout=conf.get_settings().consumer_timeout)
            except CarrotConfigException as error:
                raise framework.InvalidTask(str(error)) from error
        super().validate_task(task)

    def _validate_priority(self, task: framework.Task[Any, Any]) -> None:
        low, high = framework.TASK_MIN_PRIORITY, framework.TASK_MAX_PRIORITY
        priority = task.priority
        if not isinstance(priority, int) or isinstance(priority, bool) \
                or not low <= priority <= high:
            raise framework.InvalidTask(
                f'priority must be a whole number from {low} to {high}, not {priority!r}.')
        if priority != framework.DEFAULT_TASK_PRIORITY and self._max_priority(
                task.queue_name) == 0:
            raise framework.InvalidTask(
                f'priority {priority} needs a priority queue, and carrot\'s queue '
                f'{task.queue_name!r} has none: give it "queue_arguments": '
                f'{{"x-max-priority": 10}} in settings.CARROT[\'queues\'] (a queue that '
                f'exists already must be deleted first), or leave the priority at 0.')

    def _validate_queue(self, name: str) -> None:
        if self.queues and name not in self.queues:
            listed = ', '.join(sorted(self.queues))
            raise framework.InvalidTask(
                f'Queue {name!r} is not one of this backend\'s QUEUES ({listed}): add it to '
                f'TASKS[{self.alias!r}]["QUEUES"], or use one of those.')
        try:
            queue = conf.get_settings().queue(carrot_queue(name))
        except CarrotConfigException as error:
            raise framework.InvalidTask(str(error)) from error
        if not queue.tracked:
            raise framework.InvalidTask(
                f'carrot\'s queue {name!r} is untracked ("tracked": False), so a task that '
                f'succeeds there leaves no row for get_result() to read. Send tasks of '
                f'Django\'s task framework to a tracked queue.')

    def _max_priority(self, queue_name: str) -> int:
        value = conf.get_settings().queue(carrot_queue(queue_name)).queue_arguments.get(
            'x-max-priority')
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    def carrot_priority(self, task: framework.Task[Any, Any]) -> int:
        """Django's −100..100 laid evenly onto the queue's 0..x-max-priority (0 on a queue
        without priorities): −100 is 0, 100 is the queue's highest."""
        top = self._max_priority(task.queue_name)
        low, high = framework.TASK_MIN_PRIORITY, framework.TASK_MAX_PRIORITY
        return round((task.priority - low) * top / (high - low))

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        found: list[checks.CheckMessage] = []
        unknown = set(self.options) - OPTION_NAMES
        if unknown:
            found.append(checks.Error(
                f'TASKS[{self.alias!r}]["OPTIONS"] has unknown key(s) '
                f'{", ".join(sorted(map(str, unknown)))}; carrot\'s backend takes '
                f'{", ".join(sorted(OPTION_NAMES))}.', id='carrot.E010'))
        for name in sorted(self.queues):
            try:
                self._validate_queue(name)
            except framework.InvalidTask as error:
                found.append(checks.Error(f'TASKS[{self.alias!r}]["QUEUES"]: {error}',
                                          id='carrot.E011'))
        if framework.SOURCE == 'django_tasks' and not apps.is_installed('django_tasks'):
            found.append(checks.Error(
                'carrot.task_backend uses the django-tasks backport, which needs '
                '"django_tasks" in INSTALLED_APPS.', id='carrot.E012'))
        return found

    # -- enqueueing and reading results ------------------------------------------------

    def enqueue(self, task: framework.Task[Any, Any], args: Any,
                kwargs: Any) -> framework.TaskResult[Any, Any]:
        """Publish the task as ``publish_message`` does; its READY result."""
        self.validate_task(task)
        try:
            message = publishing.create_message(
                task.module_path, priority=self.carrot_priority(task), task_args=list(args),
                task_kwargs=dict(kwargs), queue=carrot_queue(task.queue_name),
                eta=task.run_after)
        except (TaskNotRegistered, TaskImportError) as error:
            raise framework.InvalidTask(f'carrot\'s worker would refuse it: {error}'
                                        ) from error
        alias = lifecycle.database()
        if self.enqueue_on_commit or not transaction.get_connection(alias).in_atomic_block:
            log = message.publish()
        else:
            log = _publish_apart(message)
        result: framework.TaskResult[Any, Any] = framework.TaskResult(
            task=task, id=message.uuid, status=framework.TaskResultStatus.READY,
            enqueued_at=log.publish_time, started_at=None, finished_at=None,
            last_attempted_at=None, args=list(args), kwargs=dict(kwargs), backend=self.alias,
            errors=[], worker_ids=[])
        framework.task_enqueued.send(sender=type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> framework.TaskResult[Any, Any]:
        """The task's result as its MessageLog row says; TaskResultDoesNotExist when there
        is no row of a ``@task`` task with this id."""
        row = MessageLog.objects.using(lifecycle.database()).filter(uuid=result_id).first()
        if row is None:
            raise framework.TaskResultDoesNotExist(
                f'No task has the result id {result_id!r} (no MessageLog row has this uuid; '
                f'carrot_prune deletes old rows).')
        return task_results.result_of(row, self.alias)


def carrot_queue(queue_name: str) -> str | None:
    """The carrot queue of a task's ``queue_name``: Django's default name is carrot's
    default queue (the one called 'default', or else the first listed)."""
    return None if queue_name == framework.DEFAULT_TASK_QUEUE_NAME else queue_name


def _is_module_level_function(func: Any) -> bool:
    qualname = getattr(func, '__qualname__', '')
    return inspect.isfunction(func) and '.' not in qualname and '<' not in qualname


def carrot_backend(alias: str) -> CarrotBackend:
    """The backend ``alias`` when it is carrot's, else the first carrot backend in TASKS;
    CarrotConfigException when there is none."""
    backend = framework.task_backends[alias] if alias in framework.task_backends.settings \
        else None
    if isinstance(backend, CarrotBackend):
        return backend
    for other in framework.task_backends.settings:
        candidate = framework.task_backends[other]
        if isinstance(candidate, CarrotBackend):
            return candidate
    raise CarrotConfigException(
        'settings.TASKS has no carrot backend: add {"BACKEND": '
        '"carrot.task_backend.CarrotBackend"} to read and report the results of @task tasks.')


def _publish_apart(message: publishing.Message) -> MessageLog:
    """Publish outside the caller's transaction (ENQUEUE_ON_COMMIT False): from a thread of
    its own, whose connection commits the row at once; what it raised is raised here."""
    outcome: list[Any] = []

    def publish() -> None:
        try:
            outcome.append(message.publish())
        except BaseException as error:
            outcome.append(error)
        finally:
            connections.close_all()

    thread = threading.Thread(target=publish, name='carrot-enqueue')
    thread.start()
    thread.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]  # type: ignore[no-any-return]
