"""``manage.py carrot_deadletters``: against the real RabbitMQ and database; the end-to-end
test with the worker as a subprocess."""

from __future__ import annotations

import datetime
import io
from collections.abc import Callable
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from carrot import deadletters, message
from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import Broker, Worker, carrot_settings, wait_for
from tests.project import tasks

StartWorker = Callable[..., Worker]


def _command(*args: str) -> str:
    out = io.StringIO()
    call_command('carrot_deadletters', *args, stdout=out)
    return out.getvalue()


def _dead(broker: Broker, queue: str, task: str, reason: str,
          dead_at: datetime.datetime | None = None) -> str:
    """A message in ``queue``'s dead-letter queue, as a worker leaves it; its id."""
    body, properties = message.encode(message.TaskMessage(task=task))
    properties = message.dead_letter_properties(properties, reason)
    if dead_at is not None:
        properties['headers'][message.DEAD_AT_HEADER] = dead_at.isoformat()
    broker.publish_raw(f'{queue}.dead', body, properties)
    return str(properties['message_id'])


def test_a_task_whose_retries_ran_out_is_listed_and_requeued_to_run_again(
        queue: str, start_worker: StartWorker, broker: Broker, tmp_path: Path) -> None:
    start_worker(carrot_settings(queue), env={'CARROT_TEST_HOOK_FILE': str(tmp_path / 'hook')})
    runs = tmp_path / 'runs'
    log = publish_message(tasks.always_fails, str(runs))
    wait_for(lambda: broker.message_count(f'{queue}.dead') == 1, timeout=60,
             what='the dead letter')
    listed = _command('list', '--queue', queue)
    assert f'{queue}.dead: 1 matching of 1 read' in listed
    assert log.uuid in listed and 'retries exhausted' in listed
    assert broker.message_count(f'{queue}.dead') == 1  # listing takes nothing away
    assert '1 dead letter(s) sent back to' in _command('requeue', '--queue', queue)
    # Its row is PUBLISHED again at once, and it runs its attempts afresh.
    assert MessageLog.objects.get(pk=log.pk).status in ('PUBLISHED', 'IN_PROGRESS', 'DELAYED')
    wait_for(lambda: len(runs.read_text().splitlines()) == 6, timeout=60,
             what='three more runs')
    wait_for(lambda: broker.message_count(f'{queue}.dead') == 1, timeout=60,
             what='the dead letter again')
    row = MessageLog.objects.get(pk=log.pk)
    assert row.status == 'FAILED'
    assert [e.get('attempt', 'requeued') for e in row.errors] == [1, 2, 3, 'requeued', 1, 2, 3]


def test_filters_choose_what_is_purged_and_the_rest_stays_in_its_order(
        queue: str, broker: Broker) -> None:
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=8)
    kept_first = _dead(broker, queue, 'tests.project.tasks.noop', 'recent')
    old_add = _dead(broker, queue, 'tests.project.tasks.add', 'old', dead_at=old)
    old_noop = _dead(broker, queue, 'tests.project.tasks.noop', 'old', dead_at=old)
    kept_last = _dead(broker, queue, 'tests.project.tasks.add', 'recent')
    listed = _command('list', '--queue', queue, '--older-than', '7d')
    assert f'{queue}.dead: 2 matching of 4 read' in listed
    assert old_add in listed and old_noop in listed and kept_first not in listed
    assert 'matching of 4 read' in _command('list', '--queue', queue, '--task',
                                            'tests.project.tasks.add')
    out = _command('purge', '--queue', queue, '--older-than', '7d', '--task',
                   'tests.project.tasks.add', '--no-input')
    assert f'1 dead letter(s) purged from {queue}.dead' in out
    left = [letter.message_id for letter in
            deadletters.inspect(deadletters.Selection(queue=queue)).letters]
    assert left == [kept_first, old_noop, kept_last]
    assert 'purged' in _command('purge', '--queue', queue, '--limit', '1', '--no-input')
    assert [letter.message_id for letter in
            deadletters.inspect(deadletters.Selection(queue=queue)).letters] == [
        old_noop, kept_last]


def test_purge_asks_first_and_keeps_everything_unless_told_yes(
        queue: str, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    _dead(broker, queue, 'tests.project.tasks.noop', 'poison')
    asked: list[str] = []
    monkeypatch.setattr('builtins.input', lambda prompt: asked.append(prompt) or 'no')
    assert 'Nothing purged' in _command('purge', '--queue', queue)
    assert asked == [f'Purge 1 dead letter(s) (1 from {queue}.dead)? Their rows stay, FAILED. '
                     f'Type "yes" to purge: ']
    assert broker.message_count(f'{queue}.dead') == 1
    monkeypatch.setattr('builtins.input', lambda prompt: 'yes')
    assert '1 dead letter(s) purged' in _command('purge', '--queue', queue)
    assert broker.message_count(f'{queue}.dead') == 0


@pytest.mark.parametrize(('args', 'error'), [
    (['list', '--queue', 'no-such-queue'], "Unknown queue 'no-such-queue'"),
    (['list', '--older-than', 'a week'], "--older-than 'a week' is not an age"),
    (['purge', '--limit', '0'], '--limit must be 1 or more'),
])
def test_bad_arguments_say_what_is_wrong(queue: str, args: list[str], error: str) -> None:
    with pytest.raises(CommandError, match=error):
        _command(*args)
