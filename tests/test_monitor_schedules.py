"""Creating and editing scheduled tasks in the monitor: its form and its JSON API."""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

from django.contrib.auth.models import User
from django.utils import timezone

from carrot import registry, schedules
from carrot.models import MonitorAction, ScheduledTask
from carrot.monitor import actions
from carrot.monitor.forms import ScheduleForm
from tests.monitoring import (
    PREFIX,
    client_for,
    make_schedule,
    users_fixture,  # noqa: F401  (the users fixture)
)


def _form(**changes: Any) -> dict[str, Any]:
    return {'task_name': 'weekly report', 'task': 'tests.project.tasks.echo',
            'crontab': '0 3 * * MON', 'interval_type': 'seconds', 'interval_count': '1',
            'queue': '', 'priority': '0', 'task_args': '[1, "two"]',
            'content': '{"key": "value"}', 'active': 'on', **changes}


def _errors(text: str) -> dict[str, str]:
    """Each field's error, by the id the template gives it."""
    return {name: re.sub(r'&[#\w]+;', '', re.sub(r'<[^>]+>', ' ', errors)).strip()
            for name, errors in re.findall(r'<div class="error" id="(\w+)-error">(.*?)</div>',
                                           text)}


def _mondays_at_three(count: int) -> list[datetime.datetime]:
    """The next Mondays at 03:00 (the tests' TIME_ZONE is UTC), counted by hand."""
    now = timezone.now()
    first = now.replace(hour=3, minute=0, second=0, microsecond=0) + datetime.timedelta(
        days=-now.weekday() % 7)
    if first <= now:
        first += datetime.timedelta(days=7)
    return [first + datetime.timedelta(days=7 * week) for week in range(count)]


def test_the_task_is_chosen_from_the_registered_ones(users: dict[str, User]) -> None:
    text = client_for(users, 'staff').get(PREFIX + 'schedules/new/').content.decode()
    select = re.search(r'<select name="task".*?</select>', text, re.S)
    assert select is not None
    offered = re.findall(r'<option value="([\w.]+)"', select.group())
    assert 'tests.project.tasks.echo' in offered and 'tests.project.tasks.add' in offered
    # Imported into the task module, not defined there: never a task, so never offered.
    assert 'tests.project.tasks.getcwd' not in offered
    assert offered == [path for path, broken in registry.registered_tasks() if not broken]
    answer = client_for(users, 'staff').post(PREFIX + 'schedules/new/',
                                             _form(task='os.system'))
    assert answer.status_code == 400
    assert 'Select a valid choice' in _errors(answer.content.decode())['task']
    assert not ScheduledTask.objects.exists()


def test_a_new_schedule_is_saved_audited_and_shows_its_next_runs(users: dict[str, User]
                                                                 ) -> None:
    answer = client_for(users, 'actor').post(PREFIX + 'schedules/new/', _form(), follow=True)
    assert answer.status_code == 200
    row = ScheduledTask.objects.get()
    assert (row.task_name, row.task, row.crontab, row.queue) == (
        'weekly report', 'tests.project.tasks.echo', '0 3 * * MON', None)
    assert row.call_arguments() == ([1, 'two'], {'key': 'value'})
    mondays = _mondays_at_three(5)
    assert row.next_run_at == mondays[0]
    text = answer.content.decode()
    assert 'Created 1: weekly report.' in text
    assert text.count('<time datetime=') >= 5
    for moment in mondays:
        assert f'<time datetime="{moment.isoformat()}"' in text
    [entry] = MonitorAction.objects.all()
    assert (entry.username, entry.action, entry.target) == (
        'actor', 'create', 'scheduled task weekly report')
    assert 'cron 0 3 * * MON' in entry.detail


def test_errors_are_shown_beside_their_fields_and_nothing_is_saved(users: dict[str, User]
                                                                    ) -> None:
    answer = client_for(users, 'staff').post(PREFIX + 'schedules/new/', _form(
        crontab='61 * * * *', task_args='[1, 2', content='["not", "an", "object"]',
        queue='elsewhere'))
    assert answer.status_code == 400
    errors = _errors(answer.content.decode())
    assert set(errors) == {'crontab', 'task_args', 'content', 'queue'}
    assert 'is not a valid cron expression' in errors['crontab']
    assert errors['task_args'].startswith('This is not JSON (Expecting')
    assert 'write a list, such as [1, two]' in errors['task_args']
    assert errors['content'] == 'This is JSON but not an object, such as {key: value}.'
    assert 'Select a valid choice' in errors['queue']
    # What was typed stays in the form, to be corrected.
    assert '[1, 2</textarea>' in answer.content.decode()
    assert not ScheduledTask.objects.exists() and not MonitorAction.objects.exists()


def test_a_preview_shows_the_next_five_runs_and_saves_nothing(users: dict[str, User]) -> None:
    answer = client_for(users, 'staff').post(PREFIX + 'schedules/new/',
                                             {**_form(), 'preview': '1'})
    assert answer.status_code == 200
    text = answer.content.decode()
    shown = re.findall(r'<li>[^<]*<small><time datetime="([^"]+)"', text)
    assert shown == [moment.isoformat() for moment in _mondays_at_three(5)]
    assert not ScheduledTask.objects.exists() and not MonitorAction.objects.exists()


def test_editing_keeps_the_planned_run_unless_the_schedule_changes(users: dict[str, User]
                                                                   ) -> None:
    row = make_schedule()
    planned = row.next_run_at
    client = client_for(users, 'staff')
    page = client.get(PREFIX + f'schedules/{row.pk}/edit/').content.decode()
    assert '&quot;from-schedule&quot;' in page  # the arguments, ready to edit
    form = _form(task_name='nightly', crontab='', interval_type='hours', interval_count='1',
                 task_args='["changed"]', content='')
    assert client.post(PREFIX + f'schedules/{row.pk}/edit/', form).status_code == 302
    row.refresh_from_db()
    assert row.call_arguments() == (['changed'], {})
    assert row.next_run_at == planned
    assert client.post(PREFIX + f'schedules/{row.pk}/edit/',
                       {**form, 'interval_count': '3'}).status_code == 302
    row.refresh_from_db()
    assert row.next_run_at > planned + datetime.timedelta(hours=1)
    details = list(MonitorAction.objects.order_by('pk').values_list('action', 'detail'))
    assert details == [('edit', 'changed task_args: ["from-schedule"] → ["changed"]'),
                       ('edit', 'changed interval_count: 1 → 3')]
    detail = client.get(PREFIX + f'schedules/{row.pk}/').content.decode()
    assert f'<time datetime="{row.next_run_at.isoformat()}"' in detail
    assert f'href="{PREFIX}schedules/{row.pk}/edit/"' in detail


def test_a_paused_schedule_is_edited_and_stays_paused(users: dict[str, User]) -> None:
    row = make_schedule(active=False)
    form = _form(task_name='nightly')
    del form['active']
    client_for(users, 'staff').post(PREFIX + f'schedules/{row.pk}/edit/', form)
    row.refresh_from_db()
    assert row.crontab == '0 3 * * MON' and not row.active


def _api(users: dict[str, User], path: str, body: Any, who: str = 'staff') -> Any:
    return client_for(users, who).post(PREFIX + path, json.dumps(body),
                                       content_type='application/json')


def test_the_api_creates_a_schedule_and_says_its_next_runs(users: dict[str, User]) -> None:
    answer = _api(users, 'api/schedules/', {
        'task_name': 'every five', 'task': 'tests.project.tasks.add', 'crontab': '*/5 * * * *',
        'args': [1, 2], 'kwargs': {}})
    assert answer.status_code == 201, answer.content
    found = answer.json()
    row = ScheduledTask.objects.get()
    assert found['schedule']['id'] == row.pk and found['schedule']['args'] == [1, 2]
    expected = schedules.upcoming(row.schedule, timezone.now())
    assert found['next_runs'] == [moment.isoformat() for moment in expected]
    assert found['next_runs'][0] == row.next_run_at.isoformat()
    assert (found['action'], found['count']) == ('create', 1)
    assert MonitorAction.objects.get().action == 'create'


def test_the_api_changes_only_the_fields_given(users: dict[str, User]) -> None:
    row = make_schedule()
    answer = _api(users, f'api/schedules/{row.pk}/', {'kwargs': {'n': 3}, 'priority': 2})
    assert answer.status_code == 200, answer.content
    row.refresh_from_db()
    assert row.call_arguments() == (['from-schedule'], {'n': 3})
    assert (row.priority, row.interval_display, row.active) == (2, 'Every 1 hour', True)
    assert _api(users, f'api/schedules/{row.pk}/', {'active': False}).status_code == 200
    row.refresh_from_db()
    assert not row.active


def test_the_api_says_what_is_wrong_field_by_field(users: dict[str, User]) -> None:
    row = make_schedule()
    answer = _api(users, f'api/schedules/{row.pk}/', {'crontab': 'never', 'queue': 'elsewhere'})
    assert answer.status_code == 400
    errors = answer.json()['errors']
    assert set(errors) == {'crontab', 'queue'}
    assert 'is not a valid cron expression' in errors['crontab'][0]
    refusals = {
        'Unknown fields schedule': {'task_name': 'x', 'schedule': 'daily'},
        'active must be true or false, not "no"': {'active': 'no'},
        'args must be a JSON list, not {"a": 1}': {'args': {'a': 1}},
        'task_name must be a string, not ["a", "b"]': {'task_name': ['a', 'b']},
        'interval_count must be a whole number of at least 1, not true': {
            'interval_count': True},
        "A crontab of '' runs on the interval": {'crontab': ''},
        'A crontab replaces the interval': {'crontab': '0 3 * * *', 'interval_type': 'days'},
    }
    for text, body in refusals.items():
        answer = _api(users, f'api/schedules/{row.pk}/', body)
        assert answer.status_code == 400 and text in answer.json()['error'], answer.content
    created = _api(users, 'api/schedules/', {'task_name': 'x', 'task': 'tests.project.tasks.add'})
    assert 'Give a schedule' in created.json()['error']
    form_encoded = client_for(users, 'staff').post(PREFIX + 'api/schedules/', {'task_name': 'x'})
    assert form_encoded.status_code == 400 and 'as a JSON object' in form_encoded.json()['error']
    assert _api(users, 'api/schedules/', {'task_name': 'x'}, who='viewer').status_code == 403
    row.refresh_from_db()
    assert (row.crontab, row.active, row.task_name) == ('', True, 'nightly')
    assert ScheduledTask.objects.count() == 1 and not MonitorAction.objects.exists()


def test_an_edit_never_undoes_what_the_scheduler_did_meanwhile(users: dict[str, User]) -> None:
    row = make_schedule()
    form = ScheduleForm(_form(task_name='nightly', crontab='', interval_type='hours',
                              task_args='["edited"]'), instance=row)
    assert form.is_valid(), form.errors
    # The scheduler runs the task between the form's load and its save.
    ran_at = row.next_run_at
    ScheduledTask.objects.filter(pk=row.pk).update(
        last_run_at=ran_at, next_run_at=ran_at + datetime.timedelta(hours=1))
    actions.save_schedule(form, 'staff')
    row.refresh_from_db()
    assert (row.last_run_at, row.next_run_at) == (ran_at, ran_at + datetime.timedelta(hours=1))
    assert row.call_arguments() == (['edited'], {'key': 'value'})


def test_the_preview_shows_the_runs_the_save_plans(users: dict[str, User]) -> None:
    client = client_for(users, 'staff')
    # An interval changed on a row that has run: the new interval counts from the last run.
    row = make_schedule()
    ScheduledTask.objects.filter(pk=row.pk).update(
        last_run_at=timezone.now() - datetime.timedelta(minutes=50))
    form = _form(task_name='nightly', crontab='', interval_type='hours', interval_count='2',
                 task_args='["from-schedule"]', content='')
    preview = client.post(PREFIX + f'schedules/{row.pk}/edit/', {**form, 'preview': '1'})
    shown = re.findall(r'<li>[^<]*<small><time datetime="([^"]+)"', preview.content.decode())
    client.post(PREFIX + f'schedules/{row.pk}/edit/', form)
    row.refresh_from_db()
    assert shown[0] == row.next_run_at.isoformat()
    assert [datetime.datetime.fromisoformat(a) - datetime.datetime.fromisoformat(b)
            for a, b in zip(shown[1:], shown, strict=False)] == [datetime.timedelta(hours=2)] * 4
    # A paused interval row resumed: its next time on its own grid, not the missed ones.
    paused = make_schedule(name='paused', active=False)
    ScheduledTask.objects.filter(pk=paused.pk).update(
        next_run_at=timezone.now() - datetime.timedelta(minutes=150))
    form = {**form, 'task_name': 'paused', 'interval_count': '1'}
    preview = client.post(PREFIX + f'schedules/{paused.pk}/edit/', {**form, 'preview': '1'})
    shown = re.findall(r'<li>[^<]*<small><time datetime="([^"]+)"', preview.content.decode())
    client.post(PREFIX + f'schedules/{paused.pk}/edit/', form)
    paused.refresh_from_db()
    assert paused.active and shown[0] == paused.next_run_at.isoformat()
    assert paused.next_run_at > timezone.now()


def test_rows_upstream_wrote_are_edited_through_the_api(users: dict[str, User]) -> None:
    row = make_schedule()
    ScheduledTask.objects.filter(pk=row.pk).update(task_args="(1, 'a')",
                                                   content=json.dumps('{}'))
    assert _api(users, f'api/schedules/{row.pk}/', {'active': False}).status_code == 200
    row.refresh_from_db()
    assert not row.active and row.call_arguments() == ([1, 'a'], {})


def test_a_row_whose_queue_is_gone_says_so_instead_of_moving(users: dict[str, User]) -> None:
    row = make_schedule(queue='retired')
    page = client_for(users, 'staff').get(PREFIX + f'schedules/{row.pk}/edit/').content.decode()
    assert '<option value="retired" selected>retired (not in CARROT' in page
    answer = client_for(users, 'staff').post(PREFIX + f'schedules/{row.pk}/edit/',
                                             _form(task_name='nightly', queue='retired'))
    assert answer.status_code == 400
    assert _errors(answer.content.decode())['queue'].startswith('Unknown queue retired:')
    row.refresh_from_db()
    assert row.queue == 'retired'
