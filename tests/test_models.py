"""The records: upstream's fields and forms, admin registration, migrations."""

from __future__ import annotations

from django.contrib import admin
from django.db.migrations.loader import MigrationLoader

from carrot.models import MessageLog, ScheduledTask


def test_both_models_are_in_the_admin() -> None:
    assert admin.site.is_registered(MessageLog)
    assert admin.site.is_registered(ScheduledTask)


def test_upstream_migration_names_come_first_so_switching_projects_line_up() -> None:
    names = sorted(name for app, name in MigrationLoader(None).disk_migrations
                   if app == 'carrot')
    assert names[:4] == ['0001_initial', '0002_add_task_name', '0003_populate_task_name',
                         '0004_set_unique_task_name']


def test_arguments_read_back_from_json_and_from_upstream_python_literals() -> None:
    assert MessageLog(task_args='[1, "a"]', content='{"k": 2}').positionals == [1, 'a']
    assert MessageLog(task_args="(1, 'a')").positionals == [1, 'a']
    assert MessageLog(content='{"k": 2}').keywords == {'k': 2}
    assert MessageLog(task_args=None, content=None).keywords == {}


def test_upstream_field_names_are_kept() -> None:
    fields = {f.name for f in MessageLog._meta.get_fields()}
    assert {'status', 'exchange', 'queue', 'routing_key', 'uuid', 'priority', 'task',
            'task_args', 'content', 'exception', 'traceback', 'output', 'publish_time',
            'failure_time', 'completion_time', 'log'} <= fields
    scheduled = {f.name for f in ScheduledTask._meta.get_fields()}
    assert {'interval_type', 'interval_count', 'task_name', 'active', 'task_args', 'content',
            'queue', 'exchange', 'routing_key', 'task'} <= scheduled
    assert ScheduledTask._meta.get_field('task_name').unique
    assert MessageLog._meta.get_field('uuid').unique
