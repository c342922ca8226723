"""Which task paths may run: functions defined in a module of ``CARROT['task_modules']``.

A message names its task by dotted path. Importing whatever it names would let anyone who
can publish run any function on the worker, so only plain Python functions *defined* in the
listed modules are accepted: not names they merely import, not names that start with an
underscore (which covers a module's own ``__getattribute__``, ``__setattr__`` and the like),
and not builtins, bound methods, classes, callable objects or modules.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from carrot.conf import get_settings
from carrot.exceptions import TaskImportError, TaskNotRegistered

Task = Callable[..., Any]


def task_path(task: Task | str) -> str:
    """The dotted path of a task given as a function or a path."""
    if isinstance(task, str):
        return task
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
    if module not in modules:
        listed = ', '.join(modules) or 'nothing'
        raise TaskNotRegistered(
            f"{path} is not a registered task: its module {module} is not in "
            f"settings.CARROT['task_modules'] (which lists {listed}). Add {module!r} there."
        )
    if name.startswith('_'):
        raise TaskNotRegistered(
            f'{path} is not a registered task: names that start with an underscore are '
            f"private to their module and never run. Rename the function if it is a task."
        )
    return module, name


def resolve(path: str) -> Task:
    """The function a registered task path names.

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
