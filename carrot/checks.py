"""Django system checks: every misconfiguration found at start, naming the setting."""

from __future__ import annotations

import importlib
from typing import Any

from django.core import checks

from carrot import conf
from carrot.exceptions import CarrotConfigException


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
    from carrot.consumer import load_consumer_class

    for queue in settings.queues:
        try:
            load_consumer_class(queue.consumer_class)
        except CarrotConfigException as error:
            found.append(checks.Error(
                f"CARROT['queues'] ({queue.name!r}): {error}",
                id='carrot.E003',
            ))
    return found


def _raw_settings() -> Any:
    from django.conf import settings

    return getattr(settings, 'CARROT', None)
