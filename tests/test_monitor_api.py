"""The monitor's JSON API: the same rows, rules and actions as its pages."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test.utils import override_settings

from carrot.models import MessageLog, MonitorAction, ScheduledTask
from carrot.monitor import queries
from tests.conftest import Broker, carrot_settings
from tests.monitoring import (
    LOG,
    OTHER_PREFIX,
    PREFIX,
    client_for,
    make_rows,
    make_schedule,
    users_fixture,  # noqa: F401  (the users fixture)
)

API = PREFIX + 'api/'


def _post(client: Any, path: str, body: dict[str, Any], token: str = '') -> Any:
    headers = {'X-CSRFToken': token} if token else {}
    return client.post(API + path, json.dumps(body), content_type='application/json',
                       headers=headers)


@pytest.mark.parametrize('path', ['', 'tasks/failed/', 'tasks/{task}/', 'tasks/find/?id={uuid}',
                                  'schedules/', 'schedules/{schedule}/', 'audit/', 'health/'])
def test_every_answer_follows_the_access_rules(path: str, users: dict[str, User]) -> None:
    [row] = make_rows(1)
    url = API + path.format(task=row.pk, uuid=row.uuid, schedule=make_schedule().pk)
    anonymous = client_for(users, 'anonymous').get(url)
    assert anonymous.status_code == 403 and 'error' in anonymous.json()
    assert client_for(users, 'plain').get(url).status_code == 403
    assert client_for(users, 'viewer').get(url).status_code == 200
    assert client_for(users, 'staff').get(url).status_code == 200


def test_the_root_says_what_the_viewer_may_do_and_sets_the_csrf_cookie(
        users: dict[str, User]) -> None:
    staff = client_for(users, 'staff').get(API)
    assert staff.json()['read_only'] is False
    assert 'csrftoken' in staff.cookies
    assert staff.json()['links']['requeue'] == API + 'tasks/requeue/'
    assert client_for(users, 'viewer').get(API).json()['read_only'] is True
    other = client_for(users, 'staff').get(OTHER_PREFIX + 'api/').json()
    assert all(link.startswith(OTHER_PREFIX + 'api/') for link in other['links'].values())


def test_a_list_pages_by_keyset_with_capped_counts(users: dict[str, User],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queries, 'COUNT_CAP', 10)
    rows = make_rows(12)
    make_rows(2, MessageLog.COMPLETED)
    client = client_for(users, 'staff')
    url: str | None = API + 'tasks/failed/?limit=5'
    seen: list[int] = []
    first = client.get(url).json()
    assert first['count'] == {'value': 10, 'capped': True}
    assert first['counts']['completed'] == {'value': 2, 'capped': False}
    while url:
        found = client.get(url).json()
        seen += [item['id'] for item in found['results']]
        url = found['next']
    assert seen == sorted((row.pk for row in rows), reverse=True)
    item = first['results'][0]
    assert item['status'] == 'failed' and item['task'] == 'tests.project.tasks.echo'
    assert item['args'] == [11] and item['message_id'] == rows[-1].uuid
    assert 'log' not in item and 'traceback' not in item


def test_a_list_filters_and_refuses_bad_filters(users: dict[str, User]) -> None:
    [echo] = make_rows(1, args=['findme'])
    make_rows(1, task='tests.project.tasks.add')
    client = client_for(users, 'staff')

    def ids(query: str) -> list[int]:
        return [item['id'] for item in client.get(API + 'tasks/failed/?' + query)
                .json()['results']]

    assert ids('args=findme') == [echo.pk]
    assert ids(f'id={echo.uuid}') == [echo.pk]
    assert ids('task=tests.project.tasks.e') == [echo.pk]
    bad = client.get(API + 'tasks/failed/?after=x')
    assert bad.status_code == 400 and 'after must be a row id' in bad.json()['error']
    assert client.get(API + 'tasks/nope/').status_code == 404


def test_a_task_answer_holds_its_log_filtered_by_level(users: dict[str, User]) -> None:
    [row] = make_rows(1, MessageLog.IN_PROGRESS, log=LOG)
    client = client_for(users, 'staff')
    found = client.get(API + f'tasks/{row.pk}/').json()
    assert found['status'] == 'running' and len(found['log']) == 3
    errors = client.get(API + f'tasks/{row.pk}/?level=ERROR').json()['log']
    assert [(line['line'], line['level']) for line in errors] == [(3, 'ERROR')]
    assert errors[0]['text'].endswith('ValueError: row 7')
    assert client.get(API + f'tasks/{row.pk}/?q=starting').json()['log'][0]['line'] == 1
    assert client.get(API + 'tasks/999999/').status_code == 404
    assert client.get(API + f'tasks/find/?id={row.uuid}').json()['id'] == row.pk


def test_requeue_through_the_api_with_a_csrf_token(users: dict[str, User], queue: str,
                                                   broker: Broker) -> None:
    [row] = make_rows(1, queue=queue)
    client = client_for(users, 'staff', csrf=True)
    assert _post(client, 'tasks/requeue/', {'ids': [row.pk]}).status_code == 403
    assert MessageLog.objects.get().status == MessageLog.FAILED
    token = client.get(API).cookies['csrftoken'].value
    answer = _post(client, 'tasks/requeue/', {'ids': [row.pk]}, token)
    assert answer.status_code == 200
    assert answer.json()['count'] == 1 and answer.json()['summary'] == 'Requeued 1.'
    assert MessageLog.objects.get().status == MessageLog.PUBLISHED
    assert [m.properties['message_id'] for m in broker.get_all(queue)] == [row.uuid]
    audit = client.get(API + 'audit/').json()['results']
    assert [(a['user'], a['action'], a['count']) for a in audit] == [('staff', 'requeue', 1)]


def test_an_action_for_all_matching_a_filter(users: dict[str, User]) -> None:
    make_rows(3, MessageLog.COMPLETED, queue='default')
    make_rows(2, MessageLog.COMPLETED, queue='other')
    answer = _post(client_for(users, 'staff'), 'tasks/delete/',
                   {'all': True, 'status': 'completed', 'queue': 'other'})
    assert answer.json()['count'] == 2
    assert MessageLog.objects.count() == 3
    assert MonitorAction.objects.get().target == 'all completed tasks matching queue=other'
    wrong = _post(client_for(users, 'staff'), 'tasks/requeue/',
                  {'all': True, 'status': 'completed'})
    assert wrong.status_code == 400
    assert 'requeue takes failed or running or queued tasks' in wrong.json()['error']


def test_a_form_encoded_post_works_too(users: dict[str, User]) -> None:
    rows = make_rows(2, MessageLog.COMPLETED)
    answer = client_for(users, 'staff').post(API + 'tasks/delete/',
                                             {'ids': [r.pk for r in rows]})
    assert answer.json()['count'] == 2


@pytest.mark.parametrize('path', ['tasks/requeue/', 'tasks/delete/', 'schedules/run/',
                                  'schedules/pause/', 'schedules/resume/'])
def test_actions_are_refused_on_get_to_read_only_users_and_to_the_anonymous(
        path: str, users: dict[str, User]) -> None:
    [row] = make_rows(1, MessageLog.COMPLETED)
    schedule = make_schedule()
    ids = {'ids': [schedule.pk if path.startswith('schedules') else row.pk]}
    get = client_for(users, 'staff').get(API + path, ids)
    assert get.status_code == 405 and 'Use POST' in get.json()['error']
    assert _post(client_for(users, 'viewer'), path, ids).status_code == 403
    assert _post(client_for(users, 'plain'), path, ids).status_code == 403
    assert _post(client_for(users, 'anonymous'), path, ids).status_code == 403
    with override_settings(CARROT={**carrot_settings('default'), 'monitor_read_only': True}):
        refused = _post(client_for(users, 'staff'), path, ids)
        assert refused.status_code == 403 and 'read-only' in refused.json()['error']
    assert MessageLog.objects.filter(pk=row.pk).exists()
    assert ScheduledTask.objects.get().active and not MonitorAction.objects.exists()


def test_schedules_through_the_api(users: dict[str, User], queue: str, broker: Broker) -> None:
    schedule = make_schedule(queue=queue)
    client = client_for(users, 'staff')
    [found] = client.get(API + 'schedules/').json()['results']
    assert found['task_name'] == 'nightly' and found['schedule'] == 'Every 1 hour'
    assert found['args'] == ['from-schedule'] and found['active'] is True
    run = _post(client, 'schedules/run/', {'ids': [schedule.pk]}).json()
    [log] = MessageLog.objects.all()
    assert run['published'] == [{'task_name': 'nightly', 'message_id': log.uuid}]
    assert len(broker.get_all(queue)) == 1
    assert _post(client, 'schedules/pause/', {'ids': [schedule.pk]}).json()['count'] == 1
    assert client.get(API + f'schedules/{schedule.pk}/').json()['active'] is False
    resumed = _post(client, 'schedules/resume/', {'ids': [schedule.pk, 424242]}).json()
    assert (resumed['count'], resumed['skipped']) == (1, 1)
    bad = _post(client, 'schedules/run/', {'ids': 'all'})
    assert bad.status_code == 400 and 'ids must be a list' in bad.json()['error']


def test_a_task_shows_where_and_when_it_last_started(users: dict[str, User]) -> None:
    [row] = make_rows(1)
    MessageLog.objects.filter(pk=row.pk).update(
        worker='host-a:4242', start_time=row.publish_time,
        errors=[{'attempt': 1, 'exception': 'ValueError: no', 'traceback': '', 'log': '',
                 'at': '2026-12-04T00:00:00+00:00', 'worker': 'host-b:7',
                 'started_at': None}])
    client = client_for(users, 'viewer')
    found = client.get(API + f'tasks/{row.pk}/').json()
    assert found['worker'] == 'host-a:4242'
    assert found['start_time'] == found['publish_time']
    page = client.get(PREFIX + f'tasks/{row.pk}/').content.decode()
    assert 'host-a:4242' in page and 'Last started' in page
    assert 'Attempt 1 on <span class="mono">host-b:7</span>' in page
