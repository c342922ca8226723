# carrot 2: attempts per message, unique message ids and schedule names, lookup indexes.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('carrot', '0004_set_unique_task_name'),
    ]

    operations = [
        migrations.AddField(
            model_name='messagelog',
            name='attempts',
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AlterField(
            model_name='messagelog',
            name='uuid',
            field=models.CharField(max_length=200, unique=True),
        ),
        migrations.AlterField(
            model_name='scheduledtask',
            name='task_name',
            field=models.CharField(max_length=200, unique=True),
        ),
        migrations.AddIndex(
            model_name='messagelog',
            index=models.Index(fields=['status', 'publish_time'], name='carrot_log_status_time'),
        ),
        migrations.AddIndex(
            model_name='messagelog',
            index=models.Index(fields=['task'], name='carrot_log_task'),
        ),
    ]
