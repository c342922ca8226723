# The monitor: its audit log (MonitorAction), and the indexes its task lists page through.

import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('carrot', '0006_scheduling'),
    ]

    operations = [
        migrations.CreateModel(
            name='MonitorAction',
            fields=[
                ('id', models.AutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('username', models.CharField(blank=True, default='', max_length=150)),
                ('action', models.CharField(choices=[('requeue', 'Requeue'), ('delete', 'Delete'), ('run_now', 'Run now'), ('pause', 'Pause'), ('resume', 'Resume')], max_length=20)),
                ('target', models.TextField()),
                ('count', models.PositiveIntegerField(default=0)),
                ('detail', models.TextField(blank=True, default='')),
                ('at', models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={
                'verbose_name': 'monitor action',
                'ordering': ('-id',),
            },
        ),
        migrations.RemoveIndex(
            model_name='messagelog',
            name='carrot_log_task',
        ),
        migrations.AddIndex(
            model_name='messagelog',
            index=models.Index(fields=['status', 'id'], name='carrot_log_status_id'),
        ),
        migrations.AddIndex(
            model_name='messagelog',
            index=models.Index(fields=['queue', 'status', 'id'], name='carrot_log_queue_status_id'),
        ),
        migrations.AddIndex(
            model_name='messagelog',
            index=models.Index(fields=['task', 'status', 'id'], name='carrot_log_task_status_id'),
        ),
    ]
