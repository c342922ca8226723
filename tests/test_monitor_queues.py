"""The monitor's queue pages: purging a queue, and the dead-letter queues (listing, sending
back, purging), against the real RabbitMQ and database."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import DatabaseError, transaction

from carrot import lifecycle, message, queues
from carrot.exceptions import CarrotError
from carrot.models import MessageLog, MonitorAction
from carrot.monitor import queue_actions
from carrot.utilities import publish_message
from tests.conftest import Broker
from tests.monitoring import (
    PREFIX,
    client_for,
    make_rows,
    users_fixture,  # noqa: F401  (the users fixture)
)
from tests.project import tasks


def _dead(broker: Broker, queue: str, task: str, reason: str) -> MessageLog:
    """A message in ``queue``'s dead-letter queue, as a worker leaves it, and its FAILED row."""
    body, properties = message.encode(message.TaskMessage(task=task, args=['dead']))
    properties = message.dead_letter_properties(properties, reason)
    broker.publish_raw(f'{queue}.dead', body, properties)
    [row] = make_rows(1, queue=queue, task=task, uuid=properties['message_id'],
                      exception=reason)
    return row


def _confirm_post(client: Any, path: str, **fields: Any) -> Any:
    return client.post(PREFIX + path, {'confirm': '1', **fields}, follow=True)


def test_a_purge_asks_first_then_takes_the_ready_messages_and_marks_their_rows(
        users: dict[str, User], queue: str, broker: Broker) -> None:
    logs = [publish_message(tasks.echo, n, queue=queue) for n in range(3)]
    broker.publish_raw(queue, b'{"args": [], "kwargs": {}}', {'message_id': 'no-row'})
    client = client_for(users, 'actor')
    asked = client.get(PREFIX + f'queues/{queue}/purge/').content.decode()
    assert '4 ready messages match.' in asked and 'name="confirm" value="1"' in asked
    unconfirmed = client.post(PREFIX + f'queues/{queue}/purge/').content.decode()
    assert '4 ready messages match.' in unconfirmed
    assert broker.message_count(queue) == 4 and not MonitorAction.objects.exists()

    answer = _confirm_post(client, f'queues/{queue}/purge/')
    assert 'Purged 4.' in answer.content.decode()
    assert broker.message_count(queue) == 0
    for log in logs:
        log.refresh_from_db()
        assert log.status == MessageLog.FAILED
        assert log.exception == f'Purged from queue {queue} through the monitor by actor.'
    [entry] = MonitorAction.objects.all()
    assert (entry.action, entry.count, entry.target) == ('purge', 4, f'queue {queue}')
    assert '3 of their rows marked failed' in entry.detail


def test_a_purge_takes_at_most_its_cap_and_says_so(users: dict[str, User], queue: str,
                                                   broker: Broker,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_actions, 'PURGE_MAX', 2)
    logs = [publish_message(tasks.echo, n, queue=queue) for n in range(3)]
    answer = _confirm_post(client_for(users, 'staff'), f'queues/{queue}/purge/')
    assert 'Purged 2 (the first 2 of more: act again for the rest).' in answer.content.decode()
    assert broker.message_count(queue) == 1
    statuses = [MessageLog.objects.get(pk=log.pk).status for log in logs]
    assert statuses == [MessageLog.FAILED, MessageLog.FAILED, MessageLog.PUBLISHED]
    assert 'capped at 2 messages' in MonitorAction.objects.get().detail


def test_purged_tasks_can_be_requeued_from_the_failed_list(users: dict[str, User], queue: str,
                                                           broker: Broker) -> None:
    log = publish_message(tasks.echo, 'again', queue=queue)
    client = client_for(users, 'staff')
    _confirm_post(client, f'queues/{queue}/purge/')
    client.post(PREFIX + 'tasks/requeue/', {'ids': [log.pk], 'status': 'failed'})
    assert MessageLog.objects.get(pk=log.pk).status == MessageLog.PUBLISHED
    [sent] = broker.get_all(queue)
    assert sent.properties['message_id'] == log.uuid


def test_the_queued_list_of_one_queue_offers_its_purge(users: dict[str, User], queue: str
                                                       ) -> None:
    text = client_for(users, 'staff').get(
        PREFIX + f'tasks/queued/?queue={queue}').content.decode()
    assert f'href="{PREFIX}queues/{queue}/purge/"' in text
    viewer = client_for(users, 'viewer').get(
        PREFIX + f'tasks/queued/?queue={queue}').content.decode()
    assert '/purge/' not in viewer


@pytest.mark.parametrize('who', ['viewer', 'plain'])
def test_who_may_not_act_purges_nothing(who: str, users: dict[str, User], queue: str,
                                        broker: Broker) -> None:
    publish_message(tasks.echo, queue=queue)
    for path in (f'queues/{queue}/purge/', f'api/queues/{queue}/purge/'):
        assert _confirm_post(client_for(users, who), path).status_code == 403
    assert broker.message_count(queue) == 1
    assert not MonitorAction.objects.exists()


def test_a_purge_without_its_csrf_token_or_by_get_purges_nothing(
        users: dict[str, User], queue: str, broker: Broker) -> None:
    publish_message(tasks.echo, queue=queue)
    refused = client_for(users, 'staff', csrf=True).post(
        PREFIX + f'queues/{queue}/purge/', {'confirm': '1'})
    assert refused.status_code == 403 and b'CSRF' in refused.content
    client = client_for(users, 'staff')
    assert client.get(PREFIX + f'api/queues/{queue}/purge/').status_code == 405
    assert client.get(PREFIX + f'queues/{queue}/purge/?confirm=1').status_code == 200
    assert broker.message_count(queue) == 1


def test_an_unknown_queue_is_a_clear_404(users: dict[str, User]) -> None:
    client = client_for(users, 'staff')
    for path in ('queues/nowhere/purge/', 'deadletters/nowhere/', 'api/deadletters/nowhere/'):
        answer = client.get(PREFIX + path)
        assert answer.status_code == 404
        assert 'Unknown queue' in answer.content.decode() and 'nowhere' in answer.content.decode()


def test_the_dead_letters_are_listed_and_left_where_they_are(
        users: dict[str, User], queue: str, broker: Broker) -> None:
    first = _dead(broker, queue, 'tests.project.tasks.fail', 'retries exhausted')
    _dead(broker, queue, 'tests.project.tasks.fail', 'retries exhausted')
    _dead(broker, queue, 'tests.project.tasks.echo', 'time limit of 1 s exceeded')
    client = client_for(users, 'staff')
    overview = client.get(PREFIX + 'deadletters/').content.decode()
    assert f'href="{PREFIX}deadletters/{queue}/"' in overview and '>3</td>' in overview
    page = client.get(PREFIX + f'deadletters/{queue}/').content.decode()
    assert first.uuid in page and 'time limit of 1 s exceeded' in page
    assert page.count('retries exhausted') == 2
    only = client.get(PREFIX + f'api/deadletters/{queue}/?task=tests.project.tasks.fail').json()
    assert only['waiting'] == 3
    assert [letter['task'] for letter in only['results']] == ['tests.project.tasks.fail'] * 2
    assert only['results'][0]['message_id'] == first.uuid
    counts = client.get(PREFIX + 'api/deadletters/').json()['results']
    assert {'queue': queue, 'dead_letter_queue': f'{queue}.dead', 'waiting': 3,
            'url': f'{PREFIX}api/deadletters/{queue}/'} in counts
    assert broker.message_count(f'{queue}.dead') == 3


def test_dead_letters_of_one_task_are_sent_back_after_a_confirmation(
        users: dict[str, User], queue: str, broker: Broker) -> None:
    failed = [_dead(broker, queue, 'tests.project.tasks.fail', 'retries exhausted')
              for _ in range(2)]
    other = _dead(broker, queue, 'tests.project.tasks.echo', 'retries exhausted')
    client = client_for(users, 'actor')
    path = f'deadletters/{queue}/requeue/'
    asked = client.post(PREFIX + path, {'task': 'tests.project.tasks.fail'}).content.decode()
    assert '2 dead letters match.' in asked and 'Send back 2' in asked
    assert broker.message_count(f'{queue}.dead') == 3
    answer = _confirm_post(client, path, task='tests.project.tasks.fail')
    assert 'Sent back 2.' in answer.content.decode()
    assert sorted(m.properties['message_id'] for m in broker.get_all(queue)) == sorted(
        row.uuid for row in failed)
    assert all(MessageLog.objects.get(pk=row.pk).status == MessageLog.PUBLISHED
               for row in failed)
    assert MessageLog.objects.get(pk=other.pk).status == MessageLog.FAILED
    assert broker.message_count(f'{queue}.dead') == 1
    [entry] = MonitorAction.objects.all()
    assert (entry.action, entry.count, entry.target) == (
        'requeue_dead', 2, f'dead letters of {queue} of task tests.project.tasks.fail')


def test_the_api_purges_dead_letters_and_their_rows_stay_failed(
        users: dict[str, User], queue: str, broker: Broker) -> None:
    row = _dead(broker, queue, 'tests.project.tasks.fail', 'retries exhausted')
    client = client_for(users, 'staff')
    assert client.get(PREFIX + f'api/deadletters/{queue}/purge/').status_code == 405
    answer = client.post(PREFIX + f'api/deadletters/{queue}/purge/', json.dumps({}),
                         content_type='application/json')
    assert answer.status_code == 200
    assert (answer.json()['action'], answer.json()['count']) == ('purge_dead', 1)
    assert broker.message_count(f'{queue}.dead') == 0
    assert MessageLog.objects.get(pk=row.pk).status == MessageLog.FAILED
    viewer = client_for(users, 'viewer').post(PREFIX + f'api/deadletters/{queue}/requeue/')
    assert viewer.status_code == 403


def test_a_bad_body_to_the_dead_letter_api_takes_nothing(users: dict[str, User], queue: str,
                                                         broker: Broker) -> None:
    _dead(broker, queue, 'tests.project.tasks.fail', 'retries exhausted')
    client = client_for(users, 'staff')
    path = PREFIX + f'api/deadletters/{queue}/purge/'
    for body, content_type, error in [
            ('{"task": "tests.project.tasks.fail"', 'application/json', 'not JSON'),
            ('["tests.project.tasks.fail"]', 'application/json', 'JSON object'),
            ('{"task": 3}', 'application/json', 'must be a dotted task path'),
            ('{"tasks": "x"}', 'application/json', 'at most "task"'),
            ('task=tests.project.tasks.fail', 'text/plain', 'Send JSON or a form')]:
        answer = client.post(path, body, content_type=content_type)
        assert answer.status_code == 400 and error in answer.json()['error'], body
    assert broker.message_count(f'{queue}.dead') == 1
    assert not MonitorAction.objects.exists()


def test_a_purge_says_which_messages_had_no_row_to_mark(users: dict[str, User], queue: str,
                                                         broker: Broker) -> None:
    [running] = make_rows(1, MessageLog.IN_PROGRESS, queue=queue)
    broker.publish_raw(queue, b'{"args": [], "kwargs": {}}', {'message_id': running.uuid})
    broker.publish_raw(queue, b'{"args": [], "kwargs": {}}', {})  # no message id at all
    result = queue_actions.purge_queue(queue, 'staff')
    assert (result.count, result.error) == (2, '')
    assert result.notes == ['0 of their rows marked failed',
                            f'1 had no PUBLISHED row (untracked, or a copy of a task running '
                            f'or ended): {running.uuid}', '1 had no message id, so no row']
    assert MessageLog.objects.get(pk=running.pk).status == MessageLog.IN_PROGRESS


def test_a_purge_is_refused_inside_a_transaction(queue: str, broker: Broker) -> None:
    publish_message(tasks.echo, queue=queue)
    with transaction.atomic(), pytest.raises(CarrotError, match='inside a transaction'):
        queues.purge(queue, 'purged', 10)
    assert broker.message_count(queue) == 1


def test_a_purge_the_database_stops_half_way_is_audited_and_loses_nothing(
        users: dict[str, User], queue: str, broker: Broker,
        monkeypatch: pytest.MonkeyPatch) -> None:
    logs = [publish_message(tasks.echo, n, queue=queue) for n in range(3)]
    monkeypatch.setattr(queues, 'BATCH', 1)
    marked = lifecycle.mark_purged
    calls: list[int] = []

    def fails_the_second_time(*args: Any) -> list[str]:
        calls.append(1)
        if len(calls) == 2:
            raise DatabaseError('the database went away')
        return marked(*args)

    monkeypatch.setattr(lifecycle, 'mark_purged', fails_the_second_time)
    answer = _confirm_post(client_for(users, 'staff'), f'queues/{queue}/purge/')
    assert ('Purged 1 (the first 10000 of more: act again for the rest), then stopped: the '
            'database went away.') in answer.content.decode()
    assert broker.message_count(queue) == 2
    statuses = [MessageLog.objects.get(pk=log.pk).status for log in logs]
    assert statuses == [MessageLog.FAILED, MessageLog.PUBLISHED, MessageLog.PUBLISHED]
    [entry] = MonitorAction.objects.all()
    assert entry.count == 1 and 'stopped: the database went away' in entry.detail
