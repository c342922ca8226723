"""The monitor's pages and actions, through Django's test client on the real database."""

from __future__ import annotations

import datetime
import re
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core import checks
from django.test.utils import override_settings
from django.utils import timezone

from carrot import conf, message, outbox
from carrot.broker import declare
from carrot.exceptions import CarrotConfigException
from carrot.models import MessageLog, MonitorAction, ScheduledTask
from carrot.monitor import actions, queries
from carrot.utilities import publish_message
from tests.conftest import BROKER_URL, Broker, carrot_settings, wait_for
from tests.monitoring import (
    LOG,
    OTHER_PREFIX,
    PREFIX,
    client_for,
    make_rows,
    make_schedule,
    users_fixture,  # noqa: F401  (the users fixture)
)
from tests.project import tasks

PAGES = ['', 'tasks/queued/', 'tasks/running/', 'tasks/failed/', 'tasks/completed/',
         'tasks/{task}/', 'tasks/find/?id={uuid}', 'schedules/', 'schedules/{schedule}/',
         'audit/', 'health/', 'overview/', 'assets/monitor.css', 'assets/monitor.js',
         'tasks/requeue/?status=failed&all=1', 'tasks/delete/?status=failed&all=1',
         'schedules/new/', 'schedules/{schedule}/edit/', 'deadletters/', 'deadletters/default/',
         'queues/default/purge/', 'tasks/queued/?queue=default']
#: The pages that only those who may act see: each is a form that changes something.
FORMS = ('/requeue/', '/delete/', '/new/', '/edit/', '/purge/')


def _fill(page: str) -> str:
    [row] = make_rows(1) if not MessageLog.objects.exists() else [MessageLog.objects.first()]
    schedule = ScheduledTask.objects.first() or make_schedule()
    return PREFIX + page.format(task=row.pk, uuid=row.uuid, schedule=schedule.pk)


def _everything() -> tuple[Any, ...]:
    return (tuple(MessageLog.objects.order_by('pk').values_list()),
            tuple(ScheduledTask.objects.order_by('pk').values_list()),
            MonitorAction.objects.count())


@pytest.mark.parametrize('page', PAGES)
def test_anonymous_viewers_are_sent_to_log_in(page: str, users: dict[str, User]) -> None:
    url = _fill(page)
    answer = client_for(users, 'anonymous').get(url)
    assert answer.status_code == 302
    assert answer['Location'].startswith('/accounts/login/?next=')


@pytest.mark.parametrize('page', PAGES)
def test_users_who_are_not_staff_are_refused(page: str, users: dict[str, User]) -> None:
    answer = client_for(users, 'plain').get(_fill(page))
    assert answer.status_code == 403
    assert b'staff users only' in answer.content


@pytest.mark.parametrize('page', PAGES)
def test_staff_see_every_page(page: str, users: dict[str, User]) -> None:
    url = _fill(page)
    answer = client_for(users, 'staff').get(url)
    expected = 302 if page in ('', 'tasks/find/?id={uuid}') else 200
    assert answer.status_code == expected, answer.content[:500]


@pytest.mark.parametrize('page', [p for p in PAGES if not any(f in p for f in FORMS)])
def test_read_only_staff_see_every_page_and_no_action(page: str, users: dict[str, User],
                                                      broker: Broker) -> None:
    make_rows(2, MessageLog.FAILED)
    make_rows(2, MessageLog.COMPLETED)
    if page.startswith('deadletters/'):
        _something_to_act_on(broker)  # so that an action would be offered, were it allowed
    url = _fill(page)
    answer = client_for(users, 'viewer').get(url, follow=True)
    assert answer.status_code == 200
    text = answer.content.decode()
    assert 'method="post"' not in text
    assert 'Requeue' not in text and 'Run selected' not in text
    if 'assets' not in page:
        assert 'read-only' in text


def _something_to_act_on(broker: Broker) -> None:
    """A dead letter in the default queue's dead-letter queue (and none other)."""
    default = conf.get_settings().queue('default')
    body, properties = message.encode(message.TaskMessage(task='tests.project.tasks.echo'))
    with broker.connection() as connection, connection.channel() as channel:
        declare(channel, default)
        channel.queue.purge(default.dead_letter_queue)
    broker.publish_raw(default.dead_letter_queue, body,
                       message.dead_letter_properties(properties, 'retries exhausted'))


@pytest.mark.parametrize('page', [p for p in PAGES if any(f in p for f in FORMS)])
def test_the_confirmations_and_forms_are_refused_to_read_only_staff(
        page: str, users: dict[str, User]) -> None:
    answer = client_for(users, 'viewer').get(_fill(page))
    assert answer.status_code == 403
    assert b'carrot.change_messagelog' in answer.content


def test_staff_with_the_permission_are_offered_the_actions(users: dict[str, User]) -> None:
    make_rows(1)
    for who in ('staff', 'actor'):
        text = client_for(users, who).get(PREFIX + 'tasks/failed/').content.decode()
        assert 'Requeue selected' in text and 'Delete selected' in text
        assert 'name="csrfmiddlewaretoken"' in text


# Every action: its URL and form, and how to tell it changed something.
def _requeue(queue: str) -> tuple[str, dict[str, Any]]:
    [row] = make_rows(1, queue=queue)
    return 'tasks/requeue/', {'ids': [row.pk], 'status': 'failed'}


def _delete(queue: str) -> tuple[str, dict[str, Any]]:
    [row] = make_rows(1, MessageLog.COMPLETED, queue=queue)
    return 'tasks/delete/', {'ids': [row.pk], 'status': 'completed'}


def _run(queue: str) -> tuple[str, dict[str, Any]]:
    return 'schedules/run/', {'ids': [make_schedule(queue=queue).pk]}


def _pause(queue: str) -> tuple[str, dict[str, Any]]:
    return 'schedules/pause/', {'ids': [make_schedule(queue=queue).pk]}


def _resume(queue: str) -> tuple[str, dict[str, Any]]:
    return 'schedules/resume/', {'ids': [make_schedule(queue=queue, active=False).pk]}


def _schedule_form(**changes: Any) -> dict[str, Any]:
    return {'task_name': 'created', 'task': 'tests.project.tasks.echo', 'crontab': '*/5 * * * *',
            'interval_type': 'seconds', 'interval_count': '1', 'queue': '', 'priority': '0',
            'task_args': '[1]', 'content': '{"key": "value"}', 'active': 'on', **changes}


def _create(queue: str) -> tuple[str, dict[str, Any]]:
    return 'schedules/new/', _schedule_form(queue=queue)


def _edit(queue: str) -> tuple[str, dict[str, Any]]:
    schedule = make_schedule(queue=queue)
    return f'schedules/{schedule.pk}/edit/', _schedule_form(task_name='nightly', queue=queue)


def _purge(queue: str) -> tuple[str, dict[str, Any]]:
    publish_message(tasks.echo, queue=queue)
    outbox.drain(10)  # its confirm recorded before the test looks at the rows
    return f'queues/{queue}/purge/', {'confirm': '1'}


ACTIONS = [_requeue, _delete, _run, _pause, _resume, _create, _edit, _purge]


@pytest.mark.parametrize('action', ACTIONS, ids=lambda a: a.__name__[1:])
@pytest.mark.parametrize('who', ['anonymous', 'plain', 'viewer'])
def test_an_action_by_someone_who_may_not_act_changes_nothing(
        action: Any, who: str, users: dict[str, User], queue: str) -> None:
    path, form = action(queue)
    before = _everything()
    answer = client_for(users, who).post(PREFIX + path, form)
    assert answer.status_code == (302 if who == 'anonymous' else 403)
    assert _everything() == before


@pytest.mark.parametrize('action', ACTIONS, ids=lambda a: a.__name__[1:])
def test_an_action_without_its_csrf_token_is_refused(
        action: Any, users: dict[str, User], queue: str) -> None:
    path, form = action(queue)
    before = _everything()
    answer = client_for(users, 'staff', csrf=True).post(PREFIX + path, form)
    assert answer.status_code == 403
    assert b'CSRF' in answer.content
    assert _everything() == before


@pytest.mark.parametrize('action', ACTIONS, ids=lambda a: a.__name__[1:])
def test_an_action_with_its_csrf_token_is_done_and_audited(
        action: Any, users: dict[str, User], queue: str, broker: Broker) -> None:
    path, form = action(queue)
    client = client_for(users, 'actor', csrf=True)
    page = client.get(PREFIX + 'tasks/failed/')
    token = page.cookies['csrftoken'].value
    before = _everything()
    answer = client.post(PREFIX + path, {**form, 'csrfmiddlewaretoken': token})
    assert answer.status_code == 302
    assert _everything() != before
    [entry] = MonitorAction.objects.all()
    assert entry.username == 'actor' and entry.count == 1
    assert entry.action == {'tasks/requeue/': 'requeue', 'tasks/delete/': 'delete',
                            'schedules/run/': 'run_now', 'schedules/pause/': 'pause',
                            'schedules/resume/': 'resume', 'schedules/new/': 'create'
                            }.get(path, path.rsplit('/', 2)[1])


@pytest.mark.parametrize('action', ACTIONS, ids=lambda a: a.__name__[1:])
def test_a_get_of_an_action_changes_nothing(action: Any, users: dict[str, User],
                                            queue: str) -> None:
    path, form = action(queue)
    before = _everything()
    answer = client_for(users, 'staff').get(PREFIX + path, form)
    # A form's page shows the form (and ignores what the query says); an action redirects.
    assert answer.status_code in ((200,) if path.endswith(('/new/', '/edit/', '/purge/'))
                                  else (302, 405))
    assert _everything() == before


def test_no_page_changes_anything_on_a_get(users: dict[str, User]) -> None:
    make_rows(3)
    make_rows(2, MessageLog.COMPLETED)
    make_schedule()
    client = client_for(users, 'staff')
    before = _everything()
    for page in PAGES:
        assert client.get(_fill(page) + '&confirm=1&ids=1' if '?' in page
                          else _fill(page)).status_code < 400
    assert _everything() == before


def test_requeue_sends_the_same_message_again_and_the_row_is_published(
        users: dict[str, User], queue: str, broker: Broker) -> None:
    [row] = make_rows(1, queue=queue, args=['again'], attempts=1, log=LOG,
                      traceback='Traceback ...')
    answer = client_for(users, 'staff').post(PREFIX + 'tasks/requeue/', {
        'ids': [row.pk], 'status': 'failed', 'next': PREFIX + f'tasks/{row.pk}/'},
        follow=True)
    assert answer.status_code == 200
    assert 'Requeued 1.' in answer.content.decode()
    row.refresh_from_db()
    assert row.status == MessageLog.PUBLISHED
    assert (row.exception, row.traceback, row.failure_time, row.log) == (None, None, None, None)
    assert row.attempts == 1
    [sent] = broker.get_all(queue)
    assert sent.properties['message_id'] == row.uuid
    assert sent.properties['headers']['type'] == 'tests.project.tasks.echo'
    assert sent.body == b'{"args": ["again"], "kwargs": {}}'
    assert MessageLog.objects.count() == 1  # the same row, no new one


def test_a_requeued_task_runs_again_in_the_worker(
        users: dict[str, User], queue: str, broker: Broker, start_worker: Any) -> None:
    [row] = make_rows(1, queue=queue, args=['second try'], attempts=1)
    result = actions.requeue([row.pk])
    assert result.count == 1
    worker = start_worker(carrot_settings(queue))
    wait_for(lambda: MessageLog.objects.get(pk=row.pk).status == MessageLog.COMPLETED,
             what='the requeued task to complete')
    worker.stop()
    row.refresh_from_db()
    assert row.attempts == 2
    assert '"second try"' in (row.output or '')
    assert MessageLog.objects.count() == 1


def test_only_failed_orphaned_and_stuck_tasks_are_requeued(
        users: dict[str, User], queue: str, broker: Broker) -> None:
    # A fresh IN_PROGRESS row (not orphaned) and a fresh PUBLISHED one (not stuck).
    rows = [*make_rows(1, MessageLog.COMPLETED, queue=queue),
            *make_rows(1, MessageLog.IN_PROGRESS, queue=queue),
            *make_rows(1, MessageLog.PUBLISHED, queue=queue)]
    result = actions.requeue([row.pk for row in rows] + [999_999])
    assert (result.count, result.skipped) == (0, 4)
    assert any('it is completed; only failed, orphaned and stuck tasks are requeued' in r
               for r in result.reasons)
    assert any('no such task' in r for r in result.reasons)
    assert broker.get_all(queue) == []
    assert sorted(MessageLog.objects.values_list('status', flat=True)) == sorted(
        [MessageLog.COMPLETED, MessageLog.IN_PROGRESS, MessageLog.PUBLISHED])


def test_a_failed_task_that_cannot_be_published_again_stays_failed_and_says_why(
        users: dict[str, User], queue: str, broker: Broker) -> None:
    [unknown] = make_rows(1, task='tests.project.tasks.not_there', queue=queue)
    [lost_queue] = make_rows(1, queue='gone')
    result = actions.requeue([unknown.pk, lost_queue.pk])
    assert (result.count, result.skipped) == (0, 2)
    assert 'cannot be published again' in result.reasons[0]
    assert "Unknown queue 'gone'" in result.reasons[1]
    assert set(MessageLog.objects.values_list('status', flat=True)) == {MessageLog.FAILED}


def test_a_requeue_whose_broker_is_down_leaves_the_row_failed_saying_so(
        users: dict[str, User], broker: Broker) -> None:
    with override_settings(CARROT={**carrot_settings('nowhere'),
                                   'default_broker': 'amqp://guest:guest@127.0.0.1:1/'}):
        [row] = make_rows(1, queue='nowhere')
        result = actions.requeue([row.pk])
    assert (result.count, result.skipped) == (0, 1)
    row.refresh_from_db()
    assert row.status == MessageLog.FAILED
    assert (row.exception or '').startswith('Not published')


def test_requeue_all_matching_shows_a_count_and_asks_first(
        users: dict[str, User], queue: str, broker: Broker) -> None:
    chosen = make_rows(3, task='tests.project.tasks.echo', queue=queue)
    others = make_rows(2, task='tests.project.tasks.add', queue=queue)
    client = client_for(users, 'staff')
    query = {'status': 'failed', 'all': '1', 'task': 'tests.project.tasks.ec'}
    confirm = client.get(PREFIX + 'tasks/requeue/', query)
    text = confirm.content.decode()
    assert '3 tasks match' in text
    assert 'name="confirm" value="1"' in text
    # Without confirm=1 a POST only asks again.
    again = client.post(PREFIX + 'tasks/requeue/', query)
    assert again.status_code == 200 and '3 tasks match' in again.content.decode()
    assert set(MessageLog.objects.values_list('status', flat=True)) == {MessageLog.FAILED}
    done = client.post(PREFIX + 'tasks/requeue/', {**query, 'confirm': '1'})
    assert done.status_code == 302
    statuses = dict(MessageLog.objects.values_list('pk', 'status'))
    assert {statuses[r.pk] for r in chosen} == {MessageLog.PUBLISHED}
    assert {statuses[r.pk] for r in others} == {MessageLog.FAILED}
    assert len(broker.get_all(queue)) == 3
    [entry] = MonitorAction.objects.all()
    assert entry.target == 'all failed tasks matching task=tests.project.tasks.ec'
    assert entry.count == 3


def test_an_action_on_all_matching_is_capped_and_batched(
        users: dict[str, User], queue: str, broker: Broker,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actions, 'MAX_ROWS', 5)
    monkeypatch.setattr(actions, 'BATCH', 2)
    rows = make_rows(7, queue=queue)
    answer = client_for(users, 'staff').post(PREFIX + 'tasks/requeue/', {
        'status': 'failed', 'all': '1', 'confirm': '1'}, follow=True)
    assert 'Requeued 5 (the first 5 of more: act again for the rest).' in \
        answer.content.decode()
    published = set(MessageLog.objects.filter(status=MessageLog.PUBLISHED)
                    .values_list('pk', flat=True))
    assert published == {row.pk for row in rows[2:]}  # the newest five
    assert len(broker.get_all(queue)) == 5
    assert 'capped at 5 rows' in MonitorAction.objects.get().detail


def test_delete_removes_finished_rows_only_and_cancels_delayed_ones(
        users: dict[str, User]) -> None:
    finished = [*make_rows(2, MessageLog.FAILED), *make_rows(1, MessageLog.COMPLETED),
                *make_rows(1, MessageLog.DELAYED, run_after=timezone.now())]
    unfinished = [*make_rows(1, MessageLog.PUBLISHED), *make_rows(1, MessageLog.IN_PROGRESS)]
    result = actions.delete([row.pk for row in finished + unfinished])
    assert (result.count, result.skipped) == (4, 2)
    assert set(MessageLog.objects.values_list('pk', flat=True)) == {r.pk for r in unfinished}


def test_run_now_publishes_the_scheduled_task_and_leaves_its_schedule(
        users: dict[str, User], queue: str, broker: Broker) -> None:
    schedule = make_schedule(queue=queue)
    planned = schedule.next_run_at
    answer = client_for(users, 'staff').post(PREFIX + 'schedules/run/',
                                             {'ids': [schedule.pk]}, follow=True)
    [log] = MessageLog.objects.all()
    assert 'Published 1.' in answer.content.decode()
    assert log.positionals == ['from-schedule']
    assert [m.properties['message_id'] for m in broker.get_all(queue)] == [log.uuid]
    schedule.refresh_from_db()
    assert schedule.next_run_at == planned
    assert f'nightly published as message {log.uuid}' in MonitorAction.objects.get().detail


def test_pause_and_resume_a_schedule(users: dict[str, User]) -> None:
    schedule = make_schedule()
    client = client_for(users, 'staff')
    client.post(PREFIX + 'schedules/pause/', {'ids': [schedule.pk]})
    schedule.refresh_from_db()
    assert not schedule.active
    long_ago = timezone.now() - datetime.timedelta(days=3)
    ScheduledTask.objects.filter(pk=schedule.pk).update(next_run_at=long_ago)
    client.post(PREFIX + 'schedules/resume/', {'ids': [schedule.pk]})
    schedule.refresh_from_db()
    assert schedule.active
    assert schedule.next_run_at > timezone.now()  # its next run, not the missed ones
    again = actions.set_active([schedule.pk], True)
    assert (again.count, again.skipped) == (0, 1)
    assert [e.action for e in MonitorAction.objects.order_by('pk')] == ['pause', 'resume']


def test_the_audit_log_shows_who_did_what_and_when(users: dict[str, User]) -> None:
    [row] = make_rows(1, MessageLog.COMPLETED)
    client = client_for(users, 'staff')
    client.post(PREFIX + 'tasks/delete/', {'ids': [row.pk], 'status': 'completed'})
    text = client.get(PREFIX + 'audit/').content.decode()
    assert 'staff' in text and 'Delete' in text and f'tasks {row.pk}' in text
    assert '<time datetime=' in text and ' ago' in text


def _walk(client: Any, url: str) -> list[int]:
    """Every row id shown, following the "Older" links to the end."""
    seen: list[int] = []
    pages = 0
    while url:
        text = client.get(url).content.decode()
        seen += [int(pk) for pk in re.findall(r'href="[^"]*/tasks/(\d+)/"', text)]
        found = re.search(r'<a href="([^"]+)" rel="next">', text)
        url = found.group(1).replace('&amp;', '&') if found else ''
        pages += 1
        assert pages < 100
    return seen


def test_keyset_pages_show_every_row_exactly_once(users: dict[str, User]) -> None:
    rows = make_rows(23)
    make_rows(4, MessageLog.COMPLETED)
    seen = _walk(client_for(users, 'staff'), PREFIX + 'tasks/failed/?limit=5')
    assert seen == sorted((row.pk for row in rows), reverse=True)


def test_an_argument_search_pages_through_its_scan_window(
        users: dict[str, User], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queries, 'SCAN_WINDOW', 4)
    rows = make_rows(20)
    wanted = [row.pk for row in rows if '1' in row.task_args]  # [1], [10] … [19]
    seen = _walk(client_for(users, 'staff'), PREFIX + 'tasks/failed/?limit=3&args=1')
    assert seen == sorted(wanted, reverse=True)


def test_search_by_message_id_task_prefix_and_argument_text(users: dict[str, User]) -> None:
    [echo] = make_rows(1, args=['needle in args'])
    [add] = make_rows(1, task='tests.project.tasks.add', args=[1, 2])
    client = client_for(users, 'staff')

    def shown(query: str) -> set[int]:
        text = client.get(PREFIX + 'tasks/failed/?' + query).content.decode()
        return {int(pk) for pk in re.findall(r'href="[^"]*/tasks/(\d+)/"', text)}

    assert shown(f'id={add.uuid}') == {add.pk}
    assert shown('task=tests.project.tasks.a') == {add.pk}
    assert shown('task=tests.project') == {add.pk, echo.pk}
    assert shown('args=NEEDLE') == {echo.pk}
    assert shown('args=nothing') == set()
    found = client.get(PREFIX + 'tasks/find/', {'id': echo.uuid})
    assert found['Location'] == f'{PREFIX}tasks/{echo.pk}/'
    assert client.get(PREFIX + 'tasks/find/', {'id': 'no-such'}).status_code == 404


def test_filters_by_queue_and_time_and_the_tab_counts(users: dict[str, User]) -> None:
    old = make_rows(2, queue='default')
    MessageLog.objects.filter(pk__in=[r.pk for r in old]).update(
        publish_time=timezone.now() - datetime.timedelta(days=2))
    make_rows(3, queue='default')
    make_rows(1, MessageLog.COMPLETED, queue='default')
    make_rows(4, queue='other')
    client = client_for(users, 'staff')
    since = (timezone.now() - datetime.timedelta(days=1)).isoformat()
    text = client.get(PREFIX + 'tasks/failed/', {'queue': 'default', 'since': since}
                      ).content.decode()
    assert len(re.findall(r'href="[^"]*/tasks/(\d+)/"', text)) == 3
    assert re.search(r'Failed <span class="count">3</span>', text)
    assert re.search(r'Completed <span class="count">1</span>', text)
    assert client.get(PREFIX + 'tasks/failed/', {'since': 'yesterday'}).status_code == 400


def test_counts_stop_at_the_cap(users: dict[str, User], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queries, 'COUNT_CAP', 5)
    make_rows(8)
    text = client_for(users, 'staff').get(PREFIX + 'tasks/failed/').content.decode()
    assert 'Failed <span class="count">5+</span>' in text


def test_a_task_page_shows_its_log_filtered_by_level_and_text(users: dict[str, User]) -> None:
    [row] = make_rows(1, log=LOG, traceback='Traceback: the end', output='"result"')
    client = client_for(users, 'staff')
    page = client.get(PREFIX + f'tasks/{row.pk}/').content.decode()
    assert 'Starting the import' in page and 'read 10 rows' in page
    assert 'Traceback: the end' in page and 'ValueError: boom' in page
    errors = client.get(PREFIX + f'tasks/{row.pk}/', {'level': 'warning'}).content.decode()
    assert 'row 7 is bad' in errors and 'ValueError: row 7' in errors  # with its traceback
    assert 'Starting the import' not in errors and '1 of 3 records' in errors
    searched = client.get(PREFIX + f'tasks/{row.pk}/', {'q': 'READ 10'}).content.decode()
    assert 'read 10 rows' in searched and 'row 7 is bad' not in searched


def test_a_running_task_page_refreshes_itself_and_a_finished_one_does_not(
        users: dict[str, User]) -> None:
    [running] = make_rows(1, MessageLog.IN_PROGRESS, log=LOG)
    [done] = make_rows(1, MessageLog.COMPLETED)
    client = client_for(users, 'staff')
    page = client.get(PREFIX + f'tasks/{running.pk}/').content.decode()
    assert 'data-refresh="5"' in page and 'id="log" data-live' in page
    assert 'row 7 is bad' in page
    assert 'data-refresh="0"' in client.get(PREFIX + f'tasks/{done.pk}/').content.decode()


def test_times_are_shown_in_the_viewers_time_zone(users: dict[str, User]) -> None:
    [row] = make_rows(1)
    at = datetime.datetime(2026, 12, 1, 9, 30, tzinfo=datetime.UTC)
    MessageLog.objects.filter(pk=row.pk).update(publish_time=at)
    with override_settings(TIME_ZONE='Asia/Tokyo'):
        page = client_for(users, 'staff').get(PREFIX + f'tasks/{row.pk}/').content.decode()
    assert '2026-12-01 18:30:00' in page and 'JST' in page
    assert 'datetime="2026-12-01T09:30:00+00:00"' in page


def test_every_link_and_form_follows_the_prefix(users: dict[str, User]) -> None:
    [row] = make_rows(1)
    make_schedule()
    client = client_for(users, 'staff')
    for page in ('tasks/failed/', f'tasks/{row.pk}/', 'schedules/', 'audit/', 'overview/',
                 'schedules/new/', 'health/', 'deadletters/', 'deadletters/default/',
                 'queues/default/purge/', 'tasks/queued/?queue=default'):
        text = client.get(OTHER_PREFIX + page).content.decode()
        targets = re.findall(r'(?:href|action|formaction|src)="(/[^"]*)"', text)
        assert targets
        assert all(t.startswith(OTHER_PREFIX) for t in targets), targets
    assert client.get(OTHER_PREFIX)['Location'] == OTHER_PREFIX + 'overview/'
    answer = client.post(OTHER_PREFIX + 'tasks/delete/', {'ids': [row.pk], 'status': 'failed'})
    assert answer['Location'] == OTHER_PREFIX + 'tasks/failed/'
    assert not MessageLog.objects.exists()


def test_no_page_shows_the_broker_password(users: dict[str, User]) -> None:
    secret = 'Pa55-w0rd-seen-nowhere'
    with override_settings(CARROT={
            'default_broker': f'amqp://carrot:{secret}@127.0.0.1:5672/%2Fprod',
            'queues': [{'name': 'default'}, {'name': 'other',
                                              'host': f'amqp://u:{secret}2@rabbit/'}],
            'task_modules': ['tests.project.tasks']}):
        [row] = make_rows(1)
        make_schedule()
        client = client_for(users, 'staff')
        urls = [_fill(p) for p in PAGES] + [
            PREFIX + f'api/tasks/{row.pk}/', PREFIX + 'api/tasks/failed/',
            PREFIX + 'api/schedules/', PREFIX + 'api/audit/', PREFIX + 'api/overview/']
        for url in urls:
            answer = client.get(url, follow=True)
            assert secret.encode() not in answer.content, url
        root = client.get(PREFIX + 'api/').json()
        assert secret not in str(root)
        assert root['queues'][0]['broker'] == 'amqp://carrot:***@127.0.0.1:5672/%2Fprod'


def test_monitor_authentication_replaces_the_staff_check(users: dict[str, User]) -> None:
    with override_settings(CARROT={
            **carrot_settings('default'),
            'monitor_authentication': ['django.contrib.auth.decorators.login_required']}):
        make_rows(1)
        answer = client_for(users, 'plain').get(PREFIX + 'tasks/failed/')
        assert answer.status_code == 200
        assert 'read-only' in answer.content.decode()  # seeing is not acting
        assert client_for(users, 'plain').post(PREFIX + 'tasks/delete/', {
            'ids': [1], 'status': 'failed'}).status_code == 403
        assert client_for(users, 'anonymous').get(PREFIX + 'tasks/failed/').status_code == 302


def test_monitor_authentication_decorators_are_applied_in_order(users: dict[str, User]) -> None:
    with override_settings(CARROT={
            **carrot_settings('default'),
            'monitor_authentication': [
                'django.contrib.auth.decorators.login_required',
                'django.views.decorators.cache.never_cache']}):
        answer = client_for(users, 'staff').get(PREFIX + 'tasks/queued/')
    assert answer.status_code == 200
    assert 'no-cache' in answer['Cache-Control']


def test_a_monitor_authentication_path_that_does_not_import_is_a_check_error() -> None:
    with override_settings(CARROT={
            **carrot_settings('default'),
            'monitor_authentication': ['myproject.nowhere.only_ops', 'carrot.conf.DEFAULT_QUEUE',
                                       'django.contrib.auth.decorators.login_required']}):
        found = [m for m in checks.run_checks(tags=['carrot']) if m.id == 'carrot.E010']
    assert len(found) == 2
    assert "'myproject.nowhere.only_ops', which does not import" in found[0].msg
    assert "'carrot.conf.DEFAULT_QUEUE', which is a str" in found[1].msg


def test_the_read_only_setting_offers_no_action_even_to_superusers(
        users: dict[str, User]) -> None:
    [row] = make_rows(1)
    with override_settings(CARROT={**carrot_settings('default'), 'monitor_read_only': True}):
        client = client_for(users, 'staff')
        text = client.get(PREFIX + 'tasks/failed/').content.decode()
        assert 'read-only' in text and 'method="post"' not in text
        answer = client.post(PREFIX + 'tasks/delete/', {'ids': [row.pk], 'status': 'failed'})
        assert answer.status_code == 403
        assert b"monitor_read_only" in answer.content
    assert MessageLog.objects.filter(pk=row.pk).exists()


def test_the_read_only_setting_must_be_true_or_false() -> None:
    with pytest.raises(CarrotConfigException, match=r"CARROT\['monitor_read_only'\] must be "
                                                    r"True or False, not 'yes'"):
        conf.parse({'monitor_read_only': 'yes'})
    assert conf.parse({'default_broker': BROKER_URL}).monitor_read_only is False


def test_the_admin_requeues_failed_tasks_and_keeps_status_read_only(
        users: dict[str, User], queue: str, broker: Broker) -> None:
    [row] = make_rows(1, queue=queue)
    client = client_for(users, 'staff')
    change = client.get(f'/admin/carrot/messagelog/{row.pk}/change/').content.decode()
    assert 'name="status"' not in change
    answer = client.post('/admin/carrot/messagelog/', {
        'action': 'requeue', '_selected_action': [str(row.pk)]}, follow=True)
    assert 'Requeued 1.' in answer.content.decode()
    row.refresh_from_db()
    assert row.status == MessageLog.PUBLISHED
    assert len(broker.get_all(queue)) == 1
    assert MonitorAction.objects.get().target == f'tasks {row.pk} (from the admin)'
    actions_offered = client.get('/admin/carrot/messagelog/').content.decode()
    assert 'delete_finished' in actions_offered and 'delete_selected' not in actions_offered


def test_the_admin_pauses_and_resumes_schedules(users: dict[str, User]) -> None:
    schedule = make_schedule()
    client = client_for(users, 'staff')
    client.post('/admin/carrot/scheduledtask/', {'action': 'pause',
                                                 '_selected_action': [str(schedule.pk)]})
    assert not ScheduledTask.objects.get().active
    client.post('/admin/carrot/scheduledtask/', {'action': 'resume',
                                                 '_selected_action': [str(schedule.pk)]})
    assert ScheduledTask.objects.get().active
    assert client.get('/admin/carrot/monitoraction/').status_code == 200


def test_delayed_tasks_have_their_list_and_a_retried_task_shows_each_failed_attempt(
        users: dict[str, User]) -> None:
    due = timezone.now() + datetime.timedelta(minutes=5)
    [retrying] = make_rows(1, status=MessageLog.DELAYED, run_after=due, errors=[
        {'attempt': 1, 'exception': 'ConnectionError: first try', 'traceback': 'Traceback 1',
         'log': 'tried once', 'at': timezone.now().isoformat()}])
    [queued] = make_rows(1, status=MessageLog.PUBLISHED)
    staff = client_for(users, 'staff')
    listed = staff.get(PREFIX + 'tasks/delayed/').content.decode()
    assert f'tasks/{retrying.pk}/' in listed and f'tasks/{queued.pk}/' not in listed
    page = staff.get(f'{PREFIX}tasks/{retrying.pk}/').content.decode()
    assert 'Runs after' in page and 'Failed attempts' in page
    assert 'Attempt 1: <span class="error">ConnectionError: first try</span>' in page
    assert 'Traceback 1' in page and 'tried once' in page
    answer = staff.get(f'{PREFIX}api/tasks/{retrying.pk}/').json()
    assert answer['status'] == 'delayed' and answer['run_after'] == due.isoformat()
    assert [e['attempt'] for e in answer['errors']] == [1]


def test_the_delayed_list_deletes_what_it_offers_to_delete(users: dict[str, User]) -> None:
    [row] = make_rows(1, MessageLog.DELAYED, run_after=timezone.now() + datetime.timedelta(hours=1))
    client = client_for(users, 'staff')
    assert 'Delete selected' in client.get(PREFIX + 'tasks/delayed/').content.decode()
    answer = client.post(PREFIX + 'tasks/delete/', {'ids': [row.pk], 'status': 'delayed'})
    assert answer.status_code == 302
    assert not MessageLog.objects.filter(pk=row.pk).exists()
