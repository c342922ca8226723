# Upstream django-carrot's fourth migration, kept by name so switching projects line up;
# the field becomes unique in 0005.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [('carrot', '0003_populate_task_name')]

    operations = [
        migrations.AlterField(
            model_name='scheduledtask',
            name='task_name',
            field=models.CharField(blank=True, max_length=200, null=True),
        ),
    ]
