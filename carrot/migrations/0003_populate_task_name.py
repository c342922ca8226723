# Gives every scheduled task a unique name (upstream's third migration, same name and effect).

from typing import Any

from django.db import migrations


def name_scheduled_tasks(apps: Any, schema_editor: Any) -> None:
    ScheduledTask = apps.get_model('carrot', 'ScheduledTask')
    alias = schema_editor.connection.alias
    taken: set[str] = set()
    for scheduled in ScheduledTask.objects.using(alias).order_by('pk'):
        name = scheduled.task_name or scheduled.task
        candidate, suffix = name, 1
        while candidate in taken:
            candidate, suffix = f'{name}-{suffix}', suffix + 1
        taken.add(candidate)
        if candidate != scheduled.task_name:
            scheduled.task_name = candidate
            scheduled.save(update_fields=['task_name'])


class Migration(migrations.Migration):
    dependencies = [('carrot', '0002_add_task_name')]

    operations = [migrations.RunPython(name_scheduled_tasks, migrations.RunPython.noop)]
