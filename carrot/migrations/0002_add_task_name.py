# Upstream django-carrot's second migration (same name and effect), kept for switching projects.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [('carrot', '0001_initial')]

    operations = [
        migrations.AddField(
            model_name='scheduledtask',
            name='task_name',
            field=models.CharField(blank=True, max_length=200, null=True),
        ),
    ]
