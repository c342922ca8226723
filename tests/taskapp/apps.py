from __future__ import annotations

from django.apps import AppConfig


class TaskAppConfig(AppConfig):
    name = 'tests.taskapp'
    label = 'taskapp'

    def ready(self) -> None:
        from tests.taskapp import receivers  # noqa: F401  (connects the signal receivers)
