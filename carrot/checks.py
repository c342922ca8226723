"""Django system checks: every misconfiguration found at start, naming the setting."""

from __future__ import annotations

import importlib
from typing import Any

from django.core import checks
from django.db import connections, router
from django.utils.module_loading import import_string

from carrot import conf, options, registry
from carrot.consumer import check_consumer_class
from carrot.exceptions import CarrotConfigException
from carrot.models import MessageLog
from carrot.reporting import SafeExceptionReporterFilter, holds_url_password


@checks.register('carrot')
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    try:
        settings = conf.parse(_raw_settings())
    except CarrotConfigException as error:
        return [checks.Error(str(error), hint='See the settings page of the carrot docs.',
                             id='carrot.E001')]
    found: list[checks.CheckMessage] = []
    if not settings.task_modules:
        found.append(checks.Warning(
            "settings.CARROT['task_modules'] is empty, so no task may run.",
            hint="List the modules that hold your tasks, e.g. ['myapp.tasks'].",
            id='carrot.W001',
        ))
    for module in settings.task_modules:
        try:
            importlib.import_module(module)
        except Exception as error:
            found.append(checks.Error(
                f"settings.CARROT['task_modules'] lists {module!r}, which does not import: "
                f'{type(error).__name__}: {error}',
                id='carrot.E002',
            ))
    if any(holds_url_password(url) for url in _broker_urls(_raw_settings())) \
            and not _reporter_filter_hides_urls():
        found.append(checks.Warning(
            "A broker URL in settings.CARROT holds a password, and Django's error reports "
            "(the debug page, the mails AdminEmailHandler sends) would show it: their filter "
            "does not hide CARROT['default_broker'] or a queue's 'host'.",
            hint="Set DEFAULT_EXCEPTION_REPORTER_FILTER = "
                 "'carrot.reporting.SafeExceptionReporterFilter' (or a subclass of it).",
            id='carrot.W002',
        ))
    for queue in settings.queues:
        try:
            check_consumer_class(queue.consumer_class)
        except CarrotConfigException as error:
            found.append(checks.Error(
                f"CARROT['queues'] ({queue.name!r}): {error}",
                id='carrot.E003',
            ))
    found.extend(_check_synchronous_commit(settings))
    found.extend(_check_monitor_authentication(settings.monitor_authentication))
    found.extend(_check_task_option_paths(settings))
    found.extend(_discover_app_tasks(settings))
    return found


def _check_synchronous_commit(settings: conf.CarrotSettings) -> list[checks.CheckMessage]:
    """``synchronous_commit`` False does something on PostgreSQL only (carrot.W005)."""
    if settings.synchronous_commit:
        return []
    alias = router.db_for_write(MessageLog)
    vendor = connections[alias].vendor
    if vendor == 'postgresql':
        return []
    return [checks.Warning(
        f"CARROT['synchronous_commit'] is False, but MessageLog rows are written to the "
        f"{vendor} database {alias!r}: only PostgreSQL commits them without waiting for "
        f'the disk, so this changes nothing there.',
        hint="Remove CARROT['synchronous_commit'], or write MessageLog rows to PostgreSQL.",
        id='carrot.W005',
    )]


def _discover_app_tasks(settings: conf.CarrotSettings) -> list[checks.CheckMessage]:
    """Import the installed apps' ``tasks`` modules, whose ``@task`` tasks may run (as
    Celery's autodiscovery does); a warning for each that does not import."""
    if registry.framework_task_class() is None:
        return []
    found: list[checks.CheckMessage] = []
    for module in sorted(registry.app_task_modules() - set(settings.task_modules)):
        try:
            importlib.import_module(module)
        except Exception as error:
            found.append(checks.Warning(
                f'{module}, the tasks module of an installed app, does not import: '
                f'{type(error).__name__}: {error}; its @task tasks will be refused.',
                hint='Fix the module, or ignore this if it holds no tasks for carrot.',
                id='carrot.W004',
            ))
    return found


def _check_task_option_paths(settings: conf.CarrotSettings) -> list[checks.CheckMessage]:
    """The code the task options of the settings name must import (carrot.E011)."""
    layers = [("CARROT['task_defaults']", settings.task_defaults),
              *((f"CARROT['queues'] ({queue.name!r})", queue.task_options)
                for queue in settings.queues)]
    found: list[checks.CheckMessage] = []
    for where, given in layers:
        try:
            options.resolve_given(given)
        except CarrotConfigException as error:
            found.append(checks.Error(f'{where}: {error}', id='carrot.E011'))
    return found


def _check_monitor_authentication(paths: tuple[str, ...]) -> list[checks.CheckMessage]:
    """Each of CARROT['monitor_authentication'] must import as a view decorator."""
    found: list[checks.CheckMessage] = []
    for path in paths:
        try:
            decorator = import_string(path)
        except ImportError as error:
            found.append(checks.Error(
                f"settings.CARROT['monitor_authentication'] lists {path!r}, which does not "
                f'import: {error}',
                hint='List dotted paths of view decorators, such as '
                     "'django.contrib.auth.decorators.login_required'.",
                id='carrot.E010',
            ))
            continue
        if not callable(decorator):
            found.append(checks.Error(
                f"settings.CARROT['monitor_authentication'] lists {path!r}, which is a "
                f'{type(decorator).__name__}, not a view decorator.',
                id='carrot.E010',
            ))
    return found


def _broker_urls(raw: Any) -> list[str]:
    """Every broker URL in the (valid) raw CARROT setting."""
    if not isinstance(raw, dict):
        return []
    brokers = [raw.get('default_broker'),
               *(queue.get('host') for queue in raw.get('queues') or ())]
    urls = [b.get('url') if isinstance(b, dict) else b for b in brokers]
    return [url for url in urls if isinstance(url, str)]


def _reporter_filter_hides_urls() -> bool:
    from django.conf import settings

    try:
        used = import_string(settings.DEFAULT_EXCEPTION_REPORTER_FILTER)
    except ImportError:
        return False
    return isinstance(used, type) and issubclass(used, SafeExceptionReporterFilter)


def _raw_settings() -> Any:
    from django.conf import settings

    return getattr(settings, 'CARROT', None)
