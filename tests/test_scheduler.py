"""The scheduler inside ``manage.py carrot``: services as subprocesses, the real RabbitMQ and
database, rows changed while they run."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from django.db import connection
from django.utils import timezone

from carrot.models import MessageLog, ScheduledTask
from carrot.utilities import create_scheduled_task
from tests.conftest import Worker, carrot_settings, wait_for
from tests.project import tasks

StartWorker = Callable[..., Worker]
CLOCKED_WORKER = str(Path(__file__).parent / 'project' / 'clocked_worker.py')


def publish_times(task: str = 'tests.project.tasks.echo', **args: object) -> list[datetime]:
    """When each publication of ``task`` (with these keyword arguments, if given) was made."""
    connection.close()  # see the services' commits
    times = []
    for log in MessageLog.objects.filter(task=task).order_by('publish_time'):
        if log.publish_time is not None and all(log.keywords.get(k) == v
                                                for k, v in args.items()):
            times.append(log.publish_time)
    return times


def test_two_services_publish_each_run_once(queue: str, start_worker: StartWorker) -> None:
    create_scheduled_task(tasks.echo, {'seconds': 1}, 'every-second', queue)
    settings = carrot_settings(queue, concurrency=2)
    first, second = start_worker(settings, ready=False), start_worker(settings, ready=False)
    first.wait_ready()
    second.wait_ready()
    time.sleep(1.5)
    window_start = timezone.now()
    time.sleep(10)
    window_end = timezone.now()
    published = [t for t in publish_times() if window_start <= t < window_end]
    assert 9 <= len(published) <= 11, published
    gaps = [(b - a).total_seconds() for a, b in zip(published, published[1:], strict=False)]
    assert min(gaps) > 0.5, f'a run was published twice: {gaps}'
    assert 'Scheduler started' in first.output and 'Scheduler started' in second.output
    assert 'scheduler on' in first.output


def test_edits_deactivation_and_deletion_take_effect_within_two_seconds(
        queue: str, start_worker: StartWorker) -> None:
    # Ran a minute ago and not due for an hour.
    edited = create_scheduled_task(tasks.echo, {'hours': 1}, 'edited', queue, run='edited')
    stopped = create_scheduled_task(tasks.echo, {'seconds': 1}, 'stopped', queue, run='stopped')
    deleted = create_scheduled_task(tasks.echo, {'seconds': 1}, 'deleted', queue, run='deleted')
    ScheduledTask.objects.filter(pk=edited.pk).update(
        last_run_at=timezone.now() - timedelta(minutes=1))
    start_worker(carrot_settings(queue, concurrency=2))
    wait_for(lambda: publish_times(run='stopped') and publish_times(run='deleted'),
             what='the one-second schedules to run')

    edited = ScheduledTask.objects.get(pk=edited.pk)
    edited.interval_type, edited.interval_count = 'seconds', 1
    edited.save()
    edited_at = timezone.now()
    first = wait_for(lambda: publish_times(run='edited'), timeout=10,
                     what='the edited schedule to run')[0]
    assert (first - edited_at).total_seconds() <= 2.0

    edited.content = '{"run": "edited", "version": 2}'
    edited.save()
    stopped = ScheduledTask.objects.get(pk=stopped.pk)
    stopped.active = False
    stopped.save()
    ScheduledTask.objects.filter(pk=deleted.pk).delete()
    changed_at = timezone.now()
    second = wait_for(lambda: publish_times(run='edited', version=2), timeout=10,
                      what='the new arguments to be used')[0]
    assert (second - changed_at).total_seconds() <= 2.0
    time.sleep(3.5)
    late = changed_at + timedelta(seconds=2)
    assert [t for t in publish_times(run='stopped') if t > late] == []
    assert [t for t in publish_times(run='deleted') if t > late] == []
    assert len(publish_times(run='edited', version=2)) >= 3  # still running every second


def test_a_restart_keeps_the_countdown_and_fires_a_missed_run_once(
        queue: str, start_worker: StartWorker) -> None:
    hourly = create_scheduled_task(tasks.echo, {'hours': 1}, 'hourly', queue, run='hourly')
    missed = create_scheduled_task(tasks.echo, {'seconds': 30}, 'missed', queue, run='missed')
    due = timezone.now() + timedelta(seconds=8)
    ScheduledTask.objects.filter(pk=hourly.pk).update(next_run_at=due)
    ScheduledTask.objects.filter(pk=missed.pk).update(
        next_run_at=timezone.now() - timedelta(minutes=10))
    settings = carrot_settings(queue, concurrency=1)

    first = start_worker(settings)
    wait_for(lambda: publish_times(run='missed'), what='the missed run')
    assert first.stop() == 0
    assert ScheduledTask.objects.get(pk=hourly.pk).next_run_at == due  # not reset by a stop
    assert timezone.now() < due

    start_worker(settings)
    [ran] = wait_for(lambda: publish_times(run='hourly'), timeout=20, what='the hourly run')
    assert due <= ran <= due + timedelta(seconds=2)
    hourly.refresh_from_db()
    assert (hourly.last_run_at, hourly.next_run_at) == (due, due + timedelta(hours=1))
    # Ten minutes of missed 30-second runs: one publication across both starts, not twenty.
    assert len(publish_times(run='missed')) == 1


def test_a_cron_schedule_fires_at_its_minute_in_the_time_zone(
        queue: str, start_worker: StartWorker) -> None:
    noon = create_scheduled_task(tasks.echo, task_name='noon', queue=queue,
                                 crontab='0 12 * * *', run='noon')
    eleven = create_scheduled_task(tasks.echo, task_name='eleven', queue=queue,
                                   crontab='0 11 * * *', run='eleven')
    # Planned by the service, on its own clock: 10:59:57 UTC is 11:59:57 in Paris.
    ScheduledTask.objects.update(next_run_at=None)
    worker = start_worker(
        carrot_settings(queue, concurrency=1),
        command=[CLOCKED_WORKER],
        env={'CARROT_TEST_CLOCK': '2026-01-15T10:59:57+00:00',
             'CARROT_TEST_TIME_ZONE': 'Europe/Paris'},
    )
    wait_for(lambda: publish_times(run='noon'), timeout=20, what='the noon run')
    noon.refresh_from_db()
    eleven.refresh_from_db()
    assert noon.last_run_at == datetime(2026, 1, 15, 11, 0, tzinfo=UTC)
    assert noon.next_run_at == datetime(2026, 1, 16, 11, 0, tzinfo=UTC)
    assert eleven.last_run_at is None
    assert eleven.next_run_at == datetime(2026, 1, 16, 10, 0, tzinfo=UTC)
    assert publish_times(run='eleven') == []
    # Logged once RabbitMQ has confirmed it, a moment after its row is committed.
    wait_for(lambda: "Scheduled task 'noon' published (due at 2026-01-15T11:00:00+00:00"
             in worker.output, timeout=10, what='the log line')


def test_a_schedule_whose_task_is_gone_is_logged_and_the_others_carry_on(
        queue: str, start_worker: StartWorker) -> None:
    create_scheduled_task(tasks.echo, {'seconds': 1}, 'healthy', queue)
    ScheduledTask.objects.create(task='tests.project.tasks.renamed', task_name='renamed',
                                 queue=queue, interval_type='seconds', interval_count=1)
    worker = start_worker(carrot_settings(queue, concurrency=1))
    wait_for(lambda: len(publish_times()) >= 3, what='the healthy schedule to keep running')
    errors = [line for line in worker.lines if ' ERROR ' in line]
    assert errors and all("Scheduled task 'renamed'" in line for line in errors), worker.output
    assert 'tests.project.tasks.renamed' in errors[0]
    assert worker.process.poll() is None


def test_no_scheduler_leaves_the_schedules_to_other_services(
        queue: str, start_worker: StartWorker) -> None:
    row = create_scheduled_task(tasks.echo, {'seconds': 1}, 'elsewhere', queue)
    ScheduledTask.objects.filter(pk=row.pk).update(next_run_at=timezone.now())
    worker = start_worker(carrot_settings(queue, concurrency=1), '--no-scheduler')
    time.sleep(3)
    assert publish_times() == []
    assert 'scheduler off' in worker.output
    assert worker.stop() == 0
