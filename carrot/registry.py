"""Which task paths may run: functions defined in a module of ``CARROT['task_modules']``,
and tasks of Django's task framework (``@task``) there or in an installed app's ``tasks``.

A message names its task by dotted path. Importing whatever it names would let anyone who
can publish run any function on the worker, so only plain Python functions *defined* in the
listed modules are accepted: not names they merely import, not names that start with an
underscore (which covers a module's own ``__getattribute__``, ``__setattr__`` and the like),
and not builtins, bound methods, classes, callable objects or modules. An installed app's
``tasks`` module (found as Celery's autodiscovery finds them) adds only its ``@task``
objects, never its plain functions.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from carrot.conf import get_settings
from carrot.exceptions import TaskImportError, TaskNotRegistered

if TYPE_CHECKING:
    from carrot.framework_tasks import FrameworkTask

Task = Callable[..., Any]


def task_path(task: Task | str) -> str:
    """The dotted path of a task given as a function, a ``@task`` object or a path."""
    if isinstance(task, str):
        return task
    framework = framework_task_class()
    if framework is not None and isinstance(task, framework):
        return str(task.module_path)
    module = getattr(task, '__module__', None)
    name = getattr(task, '__qualname__', None) or getattr(task, '__name__', None)
    if not callable(task) or not module or not name:
        raise TypeError(f'A task must be a function or a dotted path string, not {task!r}.')
    if '<locals>' in name or '.' in name:
        raise TaskNotRegistered(
            f'{module}.{name} is not a module-level function; carrot can only run functions '
            f"defined at the top level of a module listed in CARROT['task_modules']."
        )
    return f'{module}.{name}'


def check_registered(path: str) -> tuple[str, str]:
    """The (module, function name) of ``path``; raises TaskNotRegistered when not allowed."""
    module, _, name = path.rpartition('.')
    modules = get_settings().task_modules
    if not module or not name:
        raise TaskNotRegistered(f'{path!r} is not a dotted path such as "myapp.tasks.send_mail".')
    if module not in modules and (framework_task_class() is None
                                  or module not in app_task_modules()):
        listed = ', '.join(modules) or 'nothing'
        raise TaskNotRegistered(
            f"{path} is not a registered task: its module {module} is not in "
            f"settings.CARROT['task_modules'] (which lists {listed}), nor an installed app's "
            f"tasks module. Add {module!r} there."
        )
    if name.startswith('_'):
        raise TaskNotRegistered(
            f'{path} is not a registered task: names that start with an underscore are '
            f"private to their module and never run. Rename the function if it is a task."
        )
    return module, name


def resolve(path: str) -> Task:
    """The function a registered task path names (a FrameworkTask for a ``@task`` object).

    Raises TaskNotRegistered for a path outside the listed modules and TaskImportError when
    the module does not import or has no such function.
    """
    modules = get_settings().task_modules
    found = _resolved.get((modules, path))
    if found is not None:
        return found
    function = _resolve(path)
    _resolved[(modules, path)] = function
    return function


# Resolved paths, per list of task modules (so a settings change starts afresh). Only
# successes are kept: a module that failed to import may be fixed by a reload.
_resolved: dict[tuple[tuple[str, ...], str], Task] = {}


def _resolve(path: str) -> Task:
    module_name, name = check_registered(path)
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as error:  # a module may even call sys.exit()
        raise TaskImportError(
            f'{path}: importing {module_name} failed: {type(error).__name__}: {error}'
        ) from error
    function = getattr(module, name, None)
    if function is None:
        raise TaskImportError(f'{path}: {module_name} has no function called {name}.')
    framework = framework_task_class()
    if framework is not None and isinstance(function, framework):
        return _framework_task(path, module_name, function)
    if module_name not in get_settings().task_modules:
        raise TaskNotRegistered(
            f'{path} is not a registered task: {module_name} is an installed app\'s tasks '
            f'module, from which only tasks of Django\'s task framework (@task) run. Decorate '
            f"it with @task, or add {module_name!r} to settings.CARROT['task_modules'].")
    # Only a plain function qualifies: a builtin, a bound method, a method-wrapper, a class,
    # a module or a callable object could do anything its owner can.
    if not inspect.isfunction(function):
        raise TaskNotRegistered(
            f'{path} is not a registered task: it is a {_kind(function)}, and only plain '
            f'functions defined in {module_name} may run.'
        )
    if function.__module__ != module_name:
        raise TaskNotRegistered(
            f'{path} is imported into {module_name} from {function.__module__}, not defined '
            f'there; only functions defined in a listed task module may run.'
        )
    return function


def _framework_task(path: str, module_name: str, task: Any) -> FrameworkTask:
    """The runner of a ``@task`` object found at ``path``, once it is known to be its own."""
    from carrot.framework_tasks import FrameworkTask

    func = task.func
    if (not inspect.isfunction(func) or func.__module__ != module_name
            or task.name != path.rpartition('.')[2]):
        raise TaskNotRegistered(
            f'{path} is a task of Django\'s task framework defined as '
            f'{getattr(func, "__module__", "?")}.{task.name}, not under this name; only a '
            f'task defined in a listed module, under its own name, may run.')
    return FrameworkTask(task)


def registered_tasks() -> list[tuple[str, str]]:
    """Every task path that may run, sorted, each with '' or why its module does not import.

    For choosing a task (the monitor's schedule form): the functions and ``@task`` objects
    that :func:`resolve` accepts, found by importing each task module. A module that does
    not import is listed by its name with the error, so the form can say why it is missing.
    """
    found: list[tuple[str, str]] = []
    modules = [*get_settings().task_modules]
    if framework_task_class() is not None:
        modules += sorted(app_task_modules() - set(modules))
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except (Exception, SystemExit) as error:
            found.append((module_name, f'does not import: {type(error).__name__}: {error}'))
            continue
        for name in sorted(vars(module)):
            path = f'{module_name}.{name}'
            try:
                resolve(path)  # its rules alone say what may run: not imports, not privates
            except (TaskNotRegistered, TaskImportError):
                continue
            found.append((path, ''))
    return sorted(found)


@functools.cache  # a failed import is not remembered by Python: it would be retried a call
def framework_task_class() -> type[Any] | None:
    """Django's ``Task`` class (6.0 or the backport); None when neither is installed."""
    try:
        from carrot import _django_tasks
    except ImportError:
        return None
    return _django_tasks.Task


def app_task_modules() -> frozenset[str]:
    """The ``tasks`` modules of the installed apps that have one (``myapp.tasks``)."""
    from django.apps import apps

    return _app_task_modules(tuple(config.name for config in apps.get_app_configs()))


@functools.cache
def _app_task_modules(app_names: tuple[str, ...]) -> frozenset[str]:
    found = set()
    for name in app_names:
        try:
            if importlib.util.find_spec(f'{name}.tasks') is not None:
                found.add(f'{name}.tasks')
        except (ImportError, ValueError):  # a namespace or broken package: not one of ours
            continue
    return frozenset(found)


def _kind(value: object) -> str:
    """What ``value`` is, for an error message: its kind, never its value."""
    if inspect.ismodule(value):
        return 'module'
    if inspect.isclass(value):
        return 'class'
    if inspect.ismethod(value):
        return 'bound method'
    if inspect.isbuiltin(value):
        return 'builtin function'
    return f'{type(value).__name__} object'
