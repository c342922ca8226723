from __future__ import annotations

from django.apps import AppConfig


class CarrotConfig(AppConfig):
    name = 'carrot'
    verbose_name = 'Carrot'
    default_auto_field = 'django.db.models.AutoField'

    def ready(self) -> None:
        from carrot import checks, conf  # noqa: F401  (registers the system checks)

        conf.connect_signals()
