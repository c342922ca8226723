"""A task's options: their names, what each may be, and the one place that resolves them.

Each name may be set in four places; the first that sets it wins:

1. the call: ``publish_message(task, ..., max_retries=3, time_limit=30, expires=60)``;
2. the task: ``@task_options(max_retries=3)`` on its function;
3. its queue's entry in ``CARROT['queues']``;
4. ``CARROT['task_defaults']``; and then carrot's own defaults (TaskOptions' fields).

The call takes only values that travel as JSON (numbers); exception classes and functions
(``retry_for``, ``dont_retry_for``, ``retry_when``, ``on_retries_exhausted``) are given as
objects to the decorator or as dotted paths in the settings: a message must not name code
for the worker to import.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from carrot._values import MAX_SECONDS, is_seconds, is_whole_number
from carrot.exceptions import CarrotConfigException, Retry, TimeLimitExceeded

if TYPE_CHECKING:
    from carrot.conf import CarrotSettings

Function = TypeVar('Function', bound=Callable[..., Any])
RetryWhen = Callable[[BaseException, int], bool]
#: How a layer gives the options that name code: as objects (the decorator), as dotted paths
#: (the settings), or not at all (a call, a message).
CodeAs = Literal['objects', 'paths', 'none']
OnRetriesExhausted = Callable[[str, BaseException], None]

#: RabbitMQ's default ``consumer_timeout``: a delivery unacknowledged this long closes its
#: channel. ``CARROT['consumer_timeout']`` says when the broker's is set otherwise.
CONSUMER_TIMEOUT = 1800.0
#: Options a call may set: plain numbers, carried in the message.
CALL_OPTIONS = frozenset({'max_retries', 'retry_backoff', 'retry_backoff_max', 'time_limit',
                          'expires'})
#: Options that name code: objects in the decorator, dotted paths in the settings.
CODE_OPTIONS = frozenset({'retry_for', 'dont_retry_for', 'retry_when', 'on_retries_exhausted'})
OPTION_NAMES = CALL_OPTIONS | CODE_OPTIONS
#: The attribute ``task_options`` sets on a task function.
ATTRIBUTE = 'carrot_options'


@dataclass(frozen=True, kw_only=True)
class TaskOptions:
    """The options a task runs with, resolved from the call, the task, its queue and the
    defaults."""

    max_retries: int = 0
    """How many times a failed task is run again (0: never, as upstream carrot)."""
    retry_backoff: float = 2.0
    """Seconds before the first retry; each further retry waits twice as long, up to
    ``retry_backoff_max``, with jitter (from half the delay to all of it)."""
    retry_backoff_max: float = 600.0
    """The longest wait before a retry, in seconds."""
    retry_for: tuple[type[BaseException], ...] = (Exception, TimeLimitExceeded)
    """The errors retried (every Exception, and a time limit's stop, by default)."""
    dont_retry_for: tuple[type[BaseException], ...] = ()
    """Errors never retried, even when ``retry_for`` covers them."""
    retry_when: RetryWhen | None = None
    """``retry_when(error, attempt)``: False refuses a retry the exceptions allow."""
    on_retries_exhausted: OnRetriesExhausted | None = None
    """``on_retries_exhausted(message_id, error)``, called once the last retry has failed."""
    time_limit: float = 1500.0
    """Seconds a task may run before it is stopped and FAILED (or retried); below RabbitMQ's
    ``consumer_timeout`` (30 minutes), which would otherwise close the channel."""
    expires: float | None = None
    """Seconds after the call past which the task is not run any more (None: never)."""

    def retries(self, error: BaseException, attempt: int) -> bool:
        """Whether attempt number ``attempt`` (from 1), which raised ``error``, is retried."""
        return attempt <= self.max_retries and self.retryable(error, attempt)

    def retryable(self, error: BaseException, attempt: int) -> bool:
        """Whether ``error`` is one to retry, retries left or not."""
        if isinstance(error, Retry):
            return True  # the task asked for it
        if not isinstance(error, self.retry_for) or isinstance(error, self.dont_retry_for):
            return False
        return self.retry_when is None or bool(self.retry_when(error, attempt))

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before the retry that follows failed attempt ``attempt``."""
        delay = min(self.retry_backoff_max, self.retry_backoff * 2.0 ** min(attempt - 1, 64))
        return random.uniform(delay / 2, delay)


def task_options(**given: Any) -> Callable[[Function], Function]:
    """Set options of one task: ``@task_options(max_retries=3, time_limit=60)``.

    The function itself is returned, so it stays a plain function that carrot's registry
    accepts; unknown names and bad values raise CarrotConfigException at import.
    """
    # The time limit is checked against CARROT['consumer_timeout'] when it is resolved.
    validate(given, '@task_options', code_as='objects', consumer_timeout=math.inf)

    def decorate(function: Function) -> Function:
        setattr(function, ATTRIBUTE, dict(given))
        return function

    return decorate


def validate(given: Mapping[str, Any], where: str, *, code_as: CodeAs,
             consumer_timeout: float = CONSUMER_TIMEOUT) -> dict[str, Any]:
    """``given`` checked: CarrotConfigException names the first bad option and what it may be.

    ``code_as`` says how the code options are given: ``'objects'`` (the decorator),
    ``'paths'`` (the settings) or ``'none'`` (a call, which cannot give them).
    """
    allowed = CALL_OPTIONS if code_as == 'none' else OPTION_NAMES
    unknown = set(given) - allowed
    if unknown:
        hint = (' (retry_for, dont_retry_for, retry_when and on_retries_exhausted name code: '
                'set them on the task or in the settings)' if unknown & CODE_OPTIONS else '')
        raise CarrotConfigException(
            f'{where}: unknown option(s) {", ".join(sorted(map(str, unknown)))}; the options '
            f'are {", ".join(sorted(allowed))}{hint}.')
    for name, value in given.items():
        _check(name, value, f'{where}: {name}', code_as, consumer_timeout)
    return dict(given)


def _check(name: str, value: Any, key: str, code_as: CodeAs, consumer_timeout: float) -> None:
    if name == 'max_retries':
        if not is_whole_number(value, 0):
            raise CarrotConfigException(f'{key} must be a whole number of 0 or more, not '
                                        f'{value!r}.')
    elif name in ('retry_backoff', 'retry_backoff_max'):
        if not is_seconds(value):
            raise CarrotConfigException(f'{key} must be a positive number of seconds, at most '
                                        f'{MAX_SECONDS} (ten years), not {value!r}.')
    elif name == 'time_limit':
        if not is_seconds(value) or not value < consumer_timeout:
            raise CarrotConfigException(
                f'{key} must be a number of seconds above 0 and below RabbitMQ\'s '
                f'consumer_timeout ({consumer_timeout:g} s, CARROT[\'consumer_timeout\']), '
                f'which closes the channel of a message unacknowledged that long; not '
                f'{value!r}.')
    elif name == 'expires':
        if value is not None and not is_seconds(value):
            raise CarrotConfigException(f'{key} must be a positive number of seconds, at most '
                                        f'{MAX_SECONDS} (ten years), or None; not {value!r}.')
    elif name in ('retry_for', 'dont_retry_for'):
        for item in _as_list(value):
            if code_as == 'paths' and not _is_dotted_path(item):
                raise CarrotConfigException(f'{key} must list dotted paths of exception '
                                            f'classes, not {item!r}.')
            if code_as == 'objects' and not (isinstance(item, str) and _is_dotted_path(item)
                                             or _is_exception_class(item)):
                raise CarrotConfigException(f'{key} must list exception classes, not '
                                            f'{item!r}.')
    elif name in ('retry_when', 'on_retries_exhausted'):
        if value is None:
            return
        if code_as == 'paths' and not _is_dotted_path(value):
            raise CarrotConfigException(f'{key} must be the dotted path of a function, not '
                                        f'{value!r}.')
        if code_as == 'objects' and not (callable(value) or _is_dotted_path(value)):
            raise CarrotConfigException(f'{key} must be a function, not {value!r}.')


def _as_list(value: Any) -> list[Any]:
    """Exceptions given as a list, a tuple or one alone, as a list."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _is_dotted_path(value: Any) -> bool:
    return isinstance(value, str) and '.' in value.strip('.') and ' ' not in value


def _is_exception_class(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseException)


# -- resolving ----------------------------------------------------------------------------

# Resolved options by (task function, queue), for the settings in _resolved_for.
_resolved: dict[tuple[Callable[..., Any] | None, str], TaskOptions] = {}
_resolved_for: list[CarrotSettings] = []


def resolve(function: Callable[..., Any] | None, queue: str,
            call: Mapping[str, Any] | None = None) -> TaskOptions:
    """The options of ``function`` run from ``queue`` with the call's own ``call`` options.

    Resolved once per task function and queue (the call's options, rarely given, are laid
    over that); a dotted path that does not import raises CarrotConfigException.
    """
    from carrot.conf import get_settings

    settings = get_settings()
    if not _resolved_for or _resolved_for[0] is not settings:
        _resolved.clear()
        _resolved_for[:] = [settings]
    key = (function, queue)
    base = _resolved.get(key)
    if base is None:
        layers = [settings.task_defaults, settings.queue(queue).task_options,
                  getattr(function, ATTRIBUTE, None) or {}]
        merged: dict[str, Any] = {}
        for layer in layers:
            merged.update(layer)
        base = _build(merged, settings.consumer_timeout)
        _resolved[key] = base
    if not call:
        return base
    merged = {f.name: getattr(base, f.name) for f in fields(TaskOptions)}
    merged.update(call)
    return _build(merged, settings.consumer_timeout)


def resolve_given(given: Mapping[str, Any]) -> TaskOptions:
    """The options ``given`` (one layer, as the settings hold it) on carrot's defaults; raises
    CarrotConfigException when a dotted path it names does not import."""
    return _build(given, math.inf)


def _build(merged: Mapping[str, Any], consumer_timeout: float) -> TaskOptions:
    values = dict(merged)
    limit = values.get('time_limit', TaskOptions.time_limit)
    if limit >= consumer_timeout:
        raise CarrotConfigException(
            f"The task option time_limit is {limit:g} s, not below RabbitMQ's consumer_timeout "
            f"({consumer_timeout:g} s, CARROT['consumer_timeout']): a task running that long "
            f'would have its channel closed. Lower the time limit.')
    for name in ('retry_for', 'dont_retry_for'):
        if name in values:
            values[name] = tuple(_imported(item, name) for item in _as_list(values[name]))
    for name in ('retry_when', 'on_retries_exhausted'):
        if isinstance(values.get(name), str):
            values[name] = _imported(values[name], name)
    for name in ('retry_backoff', 'retry_backoff_max', 'time_limit'):
        if name in values:
            values[name] = float(values[name])
    return TaskOptions(**values)


def _imported(value: Any, name: str) -> Any:
    if not isinstance(value, str):
        return value
    from django.utils.module_loading import import_string

    try:
        found = import_string(value)
    except ImportError as error:
        raise CarrotConfigException(f'The task option {name} names {value!r}, which does not '
                                    f'import: {error}') from error
    if name in ('retry_for', 'dont_retry_for') and not _is_exception_class(found):
        raise CarrotConfigException(f'The task option {name} names {value!r}, which is not '
                                    f'an exception class.')
    if name in ('retry_when', 'on_retries_exhausted') and not callable(found):
        raise CarrotConfigException(f'The task option {name} names {value!r}, which is not '
                                    f'a function.')
    return found
