from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('carrot', '0009_delays_and_retries'),
    ]

    operations = [
        migrations.AddField(
            model_name='messagelog',
            name='start_time',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='messagelog',
            name='worker',
            field=models.CharField(blank=True, max_length=200, null=True),
        ),
    ]
