# The scheduler: cron schedules, priority, and the last and next run times that let any
# number of services share the schedules and survive restarts.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('carrot', '0005_carrot_2'),
    ]

    operations = [
        migrations.AddField(
            model_name='scheduledtask',
            name='crontab',
            field=models.CharField(blank=True, default='', help_text='A cron expression such as "*/5 * * * *" (minute hour day month weekday), read in the TIME_ZONE setting. When set, it replaces the interval.', max_length=200),
        ),
        migrations.AddField(
            model_name='scheduledtask',
            name='last_run_at',
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name='scheduledtask',
            name='next_run_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='scheduledtask',
            name='priority',
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AlterField(
            model_name='scheduledtask',
            name='content',
            field=models.TextField(blank=True, help_text='A JSON object, such as {"key": "value"}.', null=True, verbose_name='Keyword arguments'),
        ),
        migrations.AlterField(
            model_name='scheduledtask',
            name='task_args',
            field=models.TextField(blank=True, help_text='A JSON list, such as [1, "two"].', null=True, verbose_name='Positional arguments'),
        ),
        migrations.AddIndex(
            model_name='scheduledtask',
            index=models.Index(fields=['active', 'next_run_at'], name='carrot_schedule_due'),
        ),
    ]
