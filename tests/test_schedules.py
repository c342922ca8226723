"""Scheduled tasks in this process: creating them, their run times, claiming and publishing.

The scheduler's rounds are called with the time they stand for, so hours pass in seconds;
the database and RabbitMQ are the real ones.
"""

from __future__ import annotations

import json
import logging
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.test.utils import override_settings
from django.utils import timezone

from carrot import schedules, scheduling
from carrot.exceptions import (
    ArgumentsNotSerializable,
    CarrotConfigException,
    TaskImportError,
    TaskNotRegistered,
)
from carrot.models import MessageLog, ScheduledTask
from carrot.utilities import create_scheduled_task, run_now
from carrot.worker.scheduler import POLL_SECONDS, Scheduler
from tests.conftest import Broker
from tests.project import tasks


def test_create_scheduled_task_keeps_upstream_form_and_takes_positional_arguments(
        queue: str) -> None:
    before = timezone.now()
    row = create_scheduled_task(tasks.echo, {'minutes': 5}, None, queue, 1, 'two', key='v')
    assert row.task_name == 'tests.project.tasks.echo'  # a callable names itself
    assert (row.task, row.queue, row.interval_type, row.interval_count) == \
        ('tests.project.tasks.echo', queue, 'minutes', 5)
    assert row.call_arguments() == ([1, 'two'], {'key': 'v'})
    assert json.loads(row.task_args or '') == [1, 'two']
    # The first run is one interval after creation (as upstream).
    assert row.next_run_at is not None and row.last_run_at is None
    assert before + timedelta(minutes=5) <= row.next_run_at <= timezone.now() + \
        timedelta(minutes=5)
    named = create_scheduled_task('tests.project.tasks.add', interval={'seconds': 1},
                                  task_name='adder', queue=queue, priority=3)
    assert (named.task_name, named.priority) == ('adder', 3)


@pytest.mark.parametrize(('call', 'error', 'words'), [
    (lambda q: create_scheduled_task(tasks.noop, {'weeks': 1}, 'n', q), ValueError,
     "'weeks' is not one of seconds, minutes, hours, days"),
    (lambda q: create_scheduled_task(tasks.noop, {'seconds': 0}, 'n', q), ValueError,
     'at least 1'),
    (lambda q: create_scheduled_task(tasks.noop, {'seconds': 1, 'minutes': 1}, 'n', q),
     ValueError, 'one item'),
    (lambda q: create_scheduled_task(tasks.noop, 5, 'n', q), ValueError, 'one item'),
    (lambda q: create_scheduled_task(tasks.noop, None, 'n', q), ValueError,
     'needs a schedule'),
    (lambda q: create_scheduled_task(tasks.noop, {'seconds': 1}, 'n', q, crontab='* * * * *'),
     ValueError, 'not both'),
    (lambda q: create_scheduled_task(tasks.noop, task_name='n', queue=q, crontab='61 * * * *'),
     ValueError, "'61 * * * *' is not a valid cron expression (Bad minute)"),
    (lambda q: create_scheduled_task(tasks.echo, {'seconds': 1}, 'n', q, object()),
     ArgumentsNotSerializable, 'positional argument 0 (object)'),
    (lambda q: create_scheduled_task(tasks.echo, {'seconds': 1}, 'n', q, when=datetime.now()),
     ArgumentsNotSerializable, "keyword argument 'when' (datetime)"),
    (lambda q: create_scheduled_task(tasks.noop, {'seconds': 1}, 'n', 'nowhere'),
     CarrotConfigException, "Unknown queue 'nowhere'"),
    (lambda q: create_scheduled_task('os.getcwd', {'seconds': 1}, 'n', q),
     TaskNotRegistered, 'is not a registered task'),
    (lambda q: create_scheduled_task('tests.project.tasks.missing', {'seconds': 1}, 'n', q),
     TaskImportError, 'missing'),
    (lambda q: create_scheduled_task(tasks.noop, {'seconds': 1}, 'n', q, priority=300),
     ValueError, 'priority must be a whole number from 0 to'),
])
def test_create_scheduled_task_refuses_bad_input_and_writes_nothing(
        queue: str, call: Any, error: type[Exception], words: str) -> None:
    with pytest.raises(error) as raised:
        call(queue)
    assert words in str(raised.value)
    assert not ScheduledTask.objects.exists()


def test_a_duplicate_name_is_refused_with_what_to_do(queue: str) -> None:
    create_scheduled_task(tasks.noop, {'seconds': 1}, queue=queue)
    with pytest.raises(ValueError, match="named 'tests.project.tasks.noop' already exists: "
                                         "pass another task_name"):
        create_scheduled_task(tasks.noop, {'minutes': 1}, queue=queue)
    assert ScheduledTask.objects.count() == 1


@override_settings(TIME_ZONE='Europe/Paris')
def test_cron_schedules_are_read_in_the_time_zone_setting() -> None:
    noon_in_paris = schedules.parse_cron('0 12 * * *')
    winter = datetime(2026, 1, 15, 9, 0, tzinfo=UTC)
    summer = datetime(2026, 7, 15, 9, 0, tzinfo=UTC)
    assert noon_in_paris.first_run(winter) == datetime(2026, 1, 15, 11, 0, tzinfo=UTC)
    assert noon_in_paris.first_run(summer) == datetime(2026, 7, 15, 10, 0, tzinfo=UTC)
    # Strictly after: the run due now is not due again.
    assert noon_in_paris.next_run(datetime(2026, 1, 15, 11, 0, tzinfo=UTC),
                                  datetime(2026, 1, 15, 11, 0, tzinfo=UTC)) == \
        datetime(2026, 1, 16, 11, 0, tzinfo=UTC)
    # 02:30 does not exist on the night clocks go forward: that day it runs at 03:00.
    assert schedules.parse_cron('30 2 * * *').first_run(
        datetime(2026, 3, 28, 12, 0, tzinfo=UTC)) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)


@override_settings(USE_TZ=False, TIME_ZONE='America/New_York')
def test_without_use_tz_run_times_are_naive_local_times() -> None:
    at = schedules.parse_cron('15 8 * * *').first_run(datetime(2026, 1, 15, 7, 0))
    assert at == datetime(2026, 1, 15, 8, 15)


def test_an_interval_steps_on_its_grid_and_a_long_gap_is_one_run() -> None:
    every_minute = schedules.Interval('minutes', 1)
    due = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    # Late by 20 s: the next run is still on the minute.
    assert every_minute.next_run(due, due + timedelta(seconds=20)) == due + timedelta(minutes=1)
    # Down for an hour and a half: one run now, the next on the grid.
    assert every_minute.next_run(due, due + timedelta(minutes=90, seconds=5)) == \
        due + timedelta(minutes=91)


def test_the_admin_form_check_says_which_field_is_wrong(queue: str) -> None:
    row = ScheduledTask(task='tests.project.tasks.missing', task_name='x', queue=queue,
                        interval_type='seconds', interval_count=1, crontab='99 * * * *',
                        task_args='[1, ', content='[]')
    with pytest.raises(ValidationError) as raised:
        row.clean()
    fields = raised.value.message_dict
    assert set(fields) == {'task', 'crontab', 'task_args'}
    assert 'not a valid cron expression' in fields['crontab'][0]
    assert 'JSON list' in fields['task_args'][0]


def test_run_now_publishes_with_the_rows_settings_and_leaves_the_schedule(
        queue: str, broker: Broker) -> None:
    row = create_scheduled_task(tasks.echo, {'hours': 1}, 'hourly', queue, 7, priority=4, k=1)
    planned = row.next_run_at
    log = run_now('hourly')
    assert (log.task, log.queue, log.priority, log.status) == \
        ('tests.project.tasks.echo', queue, 4, MessageLog.PUBLISHED)
    assert (log.positionals, log.keywords) == ([7], {'k': 1})
    [sent] = broker.get_all(queue)
    assert sent.properties['message_id'] == log.uuid
    assert sent.properties['priority'] == 4
    row.refresh_from_db()
    assert (row.next_run_at, row.last_run_at) == (planned, None)
    assert row.publish().task == 'tests.project.tasks.echo'  # upstream's name for it


def test_a_round_publishes_what_is_due_once_and_moves_it_on(queue: str) -> None:
    row = create_scheduled_task(tasks.add, {'seconds': 30}, 'every30', queue, 1, 2)
    due = row.next_run_at
    assert due is not None
    assert scheduling.run_due(due - timedelta(seconds=1)).published == 0
    assert scheduling.run_due(due).published == 1
    assert scheduling.run_due(due + timedelta(seconds=1)).published == 0
    row.refresh_from_db()
    assert (row.last_run_at, row.next_run_at) == (due, due + timedelta(seconds=30))
    [log] = MessageLog.objects.all()
    assert (log.task, log.positionals, log.queue) == ('tests.project.tasks.add', [1, 2], queue)


def test_missed_runs_fire_once_not_once_per_missed_interval(queue: str) -> None:
    row = create_scheduled_task(tasks.noop, {'seconds': 30}, 'missed', queue)
    due = timezone.now() - timedelta(minutes=10)
    ScheduledTask.objects.filter(pk=row.pk).update(next_run_at=due)
    now = timezone.now()
    assert scheduling.run_due(now).published == 1
    assert scheduling.run_due(now).published == 0
    row.refresh_from_db()
    assert row.next_run_at is not None and now < row.next_run_at <= now + timedelta(seconds=30)
    assert (row.next_run_at - due) % timedelta(seconds=30) == timedelta(0)  # on its grid


def test_rows_written_without_a_next_run_get_one_instead_of_running_at_once(
        queue: str) -> None:
    ScheduledTask.objects.bulk_create([ScheduledTask(
        task='tests.project.tasks.noop', task_name='bulk', queue=queue,
        interval_type='minutes', interval_count=2)])
    now = timezone.now()
    assert scheduling.run_due(now).published == 0
    row = ScheduledTask.objects.get()
    assert row.next_run_at == now + timedelta(minutes=2)


def test_saving_a_new_schedule_or_reactivating_plans_the_next_run(queue: str) -> None:
    row = create_scheduled_task(tasks.noop, {'hours': 1}, 'edited', queue)
    ran = timezone.now() - timedelta(seconds=30)
    ScheduledTask.objects.filter(pk=row.pk).update(last_run_at=ran)
    row = ScheduledTask.objects.get(pk=row.pk)
    row.interval_type, row.interval_count = 'seconds', 10
    row.save()
    assert row.next_run_at == ran + timedelta(seconds=10)  # due now: runs at the next round
    row.crontab = '0 3 * * *'
    row.save()
    assert row.next_run_at is not None and row.next_run_at.hour == 3
    row.active = False
    row.save()
    ScheduledTask.objects.filter(pk=row.pk).update(
        next_run_at=timezone.now() - timedelta(days=3))
    row = ScheduledTask.objects.get(pk=row.pk)
    row.active = True
    row.save()  # back after three days: the next 03:00, not the runs it missed
    assert row.next_run_at is not None and row.next_run_at > timezone.now()
    assert scheduling.run_due(timezone.now()).published == 0


def test_a_row_whose_task_no_longer_imports_is_logged_and_the_others_run(
        queue: str, caplog: pytest.LogCaptureFixture) -> None:
    good = create_scheduled_task(tasks.noop, {'seconds': 5}, 'good', queue)
    bad = ScheduledTask.objects.create(task='tests.project.tasks.gone', task_name='gone',
                                       queue=queue, interval_type='seconds', interval_count=5)
    garbled = ScheduledTask.objects.create(task='tests.project.tasks.add', task_name='garbled',
                                           queue=queue, task_args='[1,', interval_count=5)
    now = max(r.next_run_at for r in (good, bad, garbled) if r.next_run_at)
    with caplog.at_level(logging.ERROR, logger='carrot.scheduler'):
        done = scheduling.run_due(now)
    assert (done.published, done.failed) == (1, 2)
    assert [log.task for log in MessageLog.objects.all()] == ['tests.project.tasks.noop']
    errors = '\n'.join(r.getMessage() for r in caplog.records)
    assert "Scheduled task 'gone'" in errors and 'tests.project.tasks.gone' in errors
    assert "Scheduled task 'garbled'" in errors and 'JSON list' in errors
    bad.refresh_from_db()
    assert bad.next_run_at is not None and bad.next_run_at > now  # not retried every second


def test_an_hour_of_one_second_runs_publishes_3600_times_without_drift(queue: str) -> None:
    """The scheduler's own rounds, woken up late by up to 0.3 s each time, over an hour."""
    row = create_scheduled_task(tasks.noop, {'seconds': 1}, 'every-second', queue)
    start = row.next_run_at
    assert start is not None
    scheduler = Scheduler(stopping=None)  # type: ignore[arg-type]  (rounds only)
    late = random.Random(7)
    now = start
    while now < start + timedelta(hours=1):
        pause = scheduler.tick(now)
        assert 0 <= pause <= POLL_SECONDS
        now += timedelta(seconds=pause + late.uniform(0.0, 0.3))
    published = MessageLog.objects.filter(task='tests.project.tasks.noop').count()
    assert 3599 <= published <= 3601


def test_the_admin_runs_selected_schedules_now_with_a_csrf_protected_post(
        queue: str, broker: Broker) -> None:
    from django.contrib.auth.models import User
    from django.test import Client

    row = create_scheduled_task(tasks.echo, {'hours': 1}, 'from-admin', queue, 'x')
    User.objects.filter(username='staff').delete()
    User.objects.create_superuser('staff', 'staff@example.com', 'pw')
    client = Client(enforce_csrf_checks=True)
    client.login(username='staff', password='pw')
    url = '/admin/carrot/scheduledtask/'
    form = {'action': 'run_now', '_selected_action': [str(row.pk)]}
    assert client.post(url, form).status_code == 403  # no CSRF token
    assert not MessageLog.objects.exists()
    page = client.get(url)
    assert page.status_code == 200
    token = page.cookies['csrftoken'].value
    answer = client.post(url, {**form, 'csrfmiddlewaretoken': token}, follow=True)
    [log] = MessageLog.objects.all()
    assert (log.task, log.positionals) == ('tests.project.tasks.echo', ['x'])
    assert f'Published from-admin as message {log.uuid}' in answer.content.decode()
    assert len(broker.get_all(queue)) == 1
    User.objects.filter(username='staff').delete()


def test_a_schedule_edited_with_update_fields_still_plans_its_next_run(queue: str) -> None:
    row = create_scheduled_task(tasks.noop, {'hours': 1}, 'narrow-save', queue)
    row.interval_type = 'seconds'
    row.save(update_fields=['interval_type'])
    stored = ScheduledTask.objects.get(pk=row.pk)
    assert stored.next_run_at == row.next_run_at
    assert stored.next_run_at is not None
    assert stored.next_run_at <= timezone.now() + timedelta(seconds=1)


def test_a_row_with_an_invalid_schedule_is_paused_with_an_error(
        queue: str, caplog: pytest.LogCaptureFixture) -> None:
    row = create_scheduled_task(tasks.noop, {'seconds': 5}, 'broken-cron', queue)
    ScheduledTask.objects.filter(pk=row.pk).update(crontab='not cron', next_run_at=None)
    with caplog.at_level(logging.ERROR, logger='carrot.scheduler'):
        assert scheduling.run_due(timezone.now()).failed == 1
    assert not ScheduledTask.objects.get(pk=row.pk).active
    assert "'broken-cron'" in caplog.text and 'make the row active again' in caplog.text


def test_a_round_killed_while_sending_hands_back_the_runs_it_did_not_send(
        queue: str, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's stop kills the scheduler greenlet while the broker is slow: the runs
    not confirmed go back to their schedules, which publish them at the next round."""
    import gevent

    from carrot import amqp, confirms

    rows = [create_scheduled_task(tasks.noop, {'seconds': 5}, f'slow-{n}', queue)
            for n in range(3)]
    now = max(row.next_run_at for row in rows if row.next_run_at)
    scheduling.publish(rows[0])  # the queue declared: each write below is one publish
    broker.get_all(queue)
    MessageLog.objects.all().delete()
    write, on_confirm = amqp.Connection.write_bytes, confirms.Confirms.on_confirm
    writes: list[int] = []

    def slow_after_the_first(connection: amqp.Connection, data: bytes) -> None:
        writes.append(len(data))
        if len(writes) == 2:
            gevent.sleep(0.5)  # the first one's confirm arrives meanwhile
            write(connection, data)
            gevent.sleep(30)  # a broker too slow to confirm: the stop comes first
        write(connection, data)

    def no_confirm_after_the_first(listener: confirms.Confirms, nacked: bool, delivery_tag: int,
                                   multiple: bool) -> None:
        if delivery_tag == listener.first_tag:
            on_confirm(listener, nacked, delivery_tag, multiple)

    monkeypatch.setattr(amqp, 'PIPELINE_WRITE', 1)
    monkeypatch.setattr(amqp.Connection, 'write_bytes', slow_after_the_first)
    monkeypatch.setattr(confirms.Confirms, 'on_confirm', no_confirm_after_the_first)
    round_ = gevent.spawn(scheduling.run_due, now)
    deadline = time.monotonic() + 10
    while len(writes) < 2 or not round_:
        assert time.monotonic() < deadline
        gevent.sleep(0.05)
    gevent.sleep(1.0)
    round_.kill(block=True, timeout=10)
    assert round_.dead and isinstance(round_.value, gevent.GreenletExit)  # killed
    # The first was confirmed; the second reached RabbitMQ unconfirmed; the third never left.
    sent = broker.get_all(queue)
    assert len(sent) == 2
    sent_row = MessageLog.objects.get(uuid=sent[0].properties['message_id'])
    assert sent_row.status == MessageLog.PUBLISHED
    [uncertain] = MessageLog.objects.filter(status=MessageLog.FAILED)
    assert uncertain.uuid == sent[1].properties['message_id']
    assert 'may or may not have it' in (uncertain.exception or '')
    assert (uncertain.exception or '').endswith('Its schedule publishes this run again.')
    assert MessageLog.objects.count() == 2  # the one never sent has no row
    schedules_ = list(ScheduledTask.objects.all())
    assert sum(row.next_run_at > now for row in schedules_) == 1
    assert sum(row.next_run_at <= now for row in schedules_) == 2  # handed back
    monkeypatch.undo()
    done = scheduling.run_due(now)
    assert (done.published, done.failed) == (2, 0)
    assert len(broker.get_all(queue)) == 2  # the uncertain one runs again: at least once
