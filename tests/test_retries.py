"""Retries, time limits and expiry: against the real RabbitMQ and database, the worker as a
subprocess."""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from django.test import override_settings
from django.utils import timezone

from carrot import lifecycle, message
from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import Broker, Worker, carrot_settings, wait_for
from tests.project import tasks

StartWorker = Callable[..., Worker]


def _runs(path: Path) -> list[float]:
    """The times the task that writes ``path`` ran."""
    if not path.exists():
        return []
    return [float(line) for line in path.read_text().splitlines() if line != 'not stopped']


def _ended(log: MessageLog, timeout: float = 60) -> MessageLog:
    return wait_for(lambda: MessageLog.objects.filter(
        pk=log.pk, status__in=('COMPLETED', 'FAILED')).first(), timeout=timeout,
        what=f'the end of {log.task}')


def test_a_task_that_fails_twice_then_succeeds_ends_completed_with_its_three_attempts(
        queue: str, start_worker: StartWorker, broker: Broker, tmp_path: Path) -> None:
    start_worker(carrot_settings(queue))
    runs = tmp_path / 'runs'
    log = publish_message(tasks.flaky, str(runs), 2, max_retries=2, retry_backoff=0.2)
    row = _ended(log)
    assert (row.status, row.output, row.attempts) == ('COMPLETED', '3', 3)
    assert [e['attempt'] for e in row.errors] == [1, 2]
    assert [e['exception'] for e in row.errors] == [
        'ConnectionError: run 1 of 2 that fail', 'ConnectionError: run 2 of 2 that fail']
    assert all('raise ConnectionError' in e['traceback'] for e in row.errors)
    assert row.options == {'max_retries': 2, 'retry_backoff': 0.2}
    assert len(_runs(runs)) == 3
    wait_for(lambda: broker.counts(queue) == (0, 0), what='every message acknowledged')
    assert broker.message_count(f'{queue}.dead') == 0


def test_a_task_whose_retries_run_out_is_failed_with_its_story_and_dead_lettered(
        queue: str, start_worker: StartWorker, broker: Broker, tmp_path: Path) -> None:
    hook = tmp_path / 'hook'
    start_worker(carrot_settings(queue), env={'CARROT_TEST_HOOK_FILE': str(hook)})
    runs = tmp_path / 'runs'
    log = publish_message(tasks.always_fails, str(runs))
    row = _ended(log)
    assert row.status == 'FAILED'
    assert row.exception == ('ConnectionError: run 3 fails too (retries exhausted: this was '
                             'attempt 3)')
    assert [e['attempt'] for e in row.errors] == [1, 2, 3]
    assert row.attempts == 3
    # The schedule: each retry waits from half its backoff to all of it (1 s, then 1.5 s at
    # most), and the releaser looks once a second; generous bounds for a busy machine.
    times = _runs(runs)
    assert len(times) == 3
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.5 and gaps[1] >= 0.75, gaps
    assert all(gap < 6 for gap in gaps), gaps
    wait_for(lambda: broker.message_count(f'{queue}.dead') == 1, what='the dead letter')
    [dead] = broker.get_all(f'{queue}.dead')
    assert dead.properties['message_id'] == log.uuid
    assert 'retries exhausted' in message.text(
        dead.properties['headers'][message.DEAD_REASON_HEADER])
    wait_for(lambda: hook.exists(), what='on_retries_exhausted')
    assert hook.read_text() == f'{log.uuid} ConnectionError\n'


def test_a_slow_on_retries_exhausted_hook_does_not_hold_up_the_consumer(
        queue: str, start_worker: StartWorker, tmp_path: Path) -> None:
    hook = tmp_path / 'hook'
    start_worker(carrot_settings(queue, concurrency=1), env={'CARROT_TEST_HOOK_FILE': str(hook)})
    failing = publish_message(tasks.fails_and_reports_late)
    assert _ended(failing).status == 'FAILED'
    # The only consumer takes the next task while the hook waits for its gate.
    after = publish_message(tasks.add, 1, 2)
    assert _ended(after).status == 'COMPLETED'
    assert not hook.exists()
    Path(f'{hook}.gate').touch()
    wait_for(lambda: hook.exists(), what='the hook, once let through')
    assert hook.read_text() == failing.uuid


def test_an_error_the_options_never_retry_fails_at_once(
        queue: str, start_worker: StartWorker, broker: Broker, tmp_path: Path) -> None:
    start_worker(carrot_settings(queue))
    runs = tmp_path / 'runs'
    row = _ended(publish_message(tasks.fails_for_good, str(runs)))
    assert (row.status, row.exception) == ('FAILED', "KeyError: 'not worth retrying'")
    assert [e['attempt'] for e in row.errors] == [1]
    assert len(_runs(runs)) == 1
    wait_for(lambda: broker.counts(queue) == (0, 0), what='the message acknowledged')
    assert broker.message_count(f'{queue}.dead') == 0  # failed, not exhausted


def test_a_task_can_ask_for_its_own_retry_with_a_delay(
        queue: str, start_worker: StartWorker, tmp_path: Path) -> None:
    start_worker(carrot_settings(queue))
    runs = tmp_path / 'runs'
    row = _ended(publish_message(tasks.asks_for_retry, str(runs), 2.0))
    assert (row.status, row.output) == ('COMPLETED', '2')
    assert row.errors[0]['exception'] == 'carrot.exceptions.Retry: not yet'
    first, second = _runs(runs)
    assert second - first >= 2.0


def test_an_untracked_task_that_fails_is_retried_under_its_row(
        queue: str, start_worker: StartWorker, tmp_path: Path) -> None:
    start_worker(carrot_settings(queue))
    runs = tmp_path / 'runs'
    # Its options live in the message only: the row its failure gets must keep them, or
    # the second retry would not happen.
    log = publish_message(tasks.flaky, str(runs), 2, max_retries=2, retry_backoff=0.2,
                          tracked=False)
    row = wait_for(lambda: MessageLog.objects.filter(uuid=log.uuid, status='COMPLETED')
                   .first(), timeout=60, what='the retried untracked task')
    assert row.output == '3' and [e['attempt'] for e in row.errors] == [1, 2]
    assert row.options == {'max_retries': 2, 'retry_backoff': 0.2}


def test_a_task_past_its_time_limit_is_stopped_and_failed_while_others_run_on(
        queue: str, start_worker: StartWorker, broker: Broker, tmp_path: Path) -> None:
    start_worker(carrot_settings(queue, concurrency=4))
    over = tmp_path / 'over'
    started = time.monotonic()
    log = publish_message(tasks.overruns, str(over), 30.0)
    others = [publish_message(tasks.sleep, 0.5) for _ in range(6)]
    row = _ended(log, timeout=30)
    assert time.monotonic() - started < 20
    assert row.status == 'FAILED'
    assert row.exception == ('carrot.exceptions.TimeLimitExceeded: the task ran past its time '
                             'limit of 1 s')
    assert 'not stopped' not in over.read_text()
    for other in others:
        assert _ended(other).status == 'COMPLETED'
    wait_for(lambda: broker.message_count(f'{queue}.dead') == 1, what='the dead letter')
    [dead] = broker.get_all(f'{queue}.dead')
    assert 'time limit of 1 s' in message.text(
        dead.properties['headers'][message.DEAD_REASON_HEADER])


def test_an_expired_message_is_not_run_and_its_row_says_why(
        queue: str, start_worker: StartWorker, broker: Broker, tmp_path: Path) -> None:
    runs = tmp_path / 'runs'
    log = publish_message(tasks.runs_at, str(runs), expires=1)
    fresh = publish_message(tasks.runs_at, str(runs), expires=600)
    assert log.expires_at is not None and log.options == {'expires': 1}
    time.sleep(1.5)
    start_worker(carrot_settings(queue))
    row = _ended(log)
    assert row.status == 'FAILED'
    assert row.exception is not None and 'expired at' in row.exception
    assert 'was not run' in row.exception
    assert _ended(fresh).status == 'COMPLETED'
    assert len(_runs(runs)) == 1  # only the fresh one ran
    wait_for(lambda: broker.counts(queue) == (0, 0), what='both acknowledged')
    assert broker.message_count(f'{queue}.dead') == 0


def test_the_options_travel_in_the_message(queue: str, broker: Broker) -> None:
    publish_message(tasks.noop, max_retries=4, time_limit=10)
    publish_message(tasks.noop)
    given, plain = broker.get_all(queue)
    assert json.loads(given.properties['headers'][message.OPTIONS_HEADER]) == {
        'max_retries': 4, 'time_limit': 10}
    assert message.OPTIONS_HEADER not in plain.properties['headers']  # upstream's format


@pytest.mark.parametrize('header', ['{"max_retries": -1}', '{"retry_for": "os.system"}',
                                    'not json'])
def test_a_message_with_bad_options_is_refused_with_the_reason(
        queue: str, start_worker: StartWorker, broker: Broker, header: str) -> None:
    """Another producer's options are checked as a call's: a message cannot name code."""
    start_worker(carrot_settings(queue))
    body, properties = message.encode(message.TaskMessage(task='tests.project.tasks.noop'))
    properties['headers'][message.OPTIONS_HEADER] = header
    broker.publish_raw(queue, body, properties)
    wait_for(lambda: broker.message_count(f'{queue}.dead') == 1, what='the dead letter')
    row = MessageLog.objects.get(uuid=properties['message_id'])
    assert row.status == 'FAILED' and message.OPTIONS_HEADER in (row.exception or '')


def _after_attempt_1(queue: str, message_id: str, status: str, run_after: datetime.datetime,
                     **start: bool) -> tuple[MessageLog, lifecycle.Start]:
    """A row whose attempt 1 failed (``status`` DELAYED, or PUBLISHED once released), and a
    start of attempt 1's message (``start``: redelivered or resent)."""
    now = timezone.now()
    row = MessageLog.objects.create(
        uuid=message_id, task='tests.project.tasks.noop', status=status, queue=queue,
        publish_time=now - datetime.timedelta(seconds=10), run_after=run_after, attempts=1,
        errors=[{'attempt': 1, 'exception': 'E', 'traceback': '', 'log': '',
                 'at': now.isoformat()}])
    return row, lifecycle.Start(message_id=message_id, task=row.task, args=[], kwargs={},
                                queue=queue, exchange='', routing_key=queue, priority=0,
                                attempt=1, **start)


def test_a_redelivered_attempt_whose_end_is_recorded_is_superseded_and_not_run_again(
        queue: str) -> None:
    """Its acknowledgement was lost after its retry was written: its row waits for the next
    attempt, or runs it, and the old attempt must not run beside it."""
    row, again = _after_attempt_1(queue, 'lost-ack', 'DELAYED',
                                  timezone.now() + datetime.timedelta(minutes=1),
                                  redelivered=True)
    [started] = lifecycle.start_many([again])
    assert started.superseded and MessageLog.objects.get(pk=row.pk).status == 'DELAYED'
    MessageLog.objects.filter(pk=row.pk).update(status='IN_PROGRESS')  # attempt 2 runs
    assert lifecycle.start_many([again])[0].superseded
    next_one = dataclasses.replace(again, attempt=2)
    assert not lifecycle.start_many([next_one])[0].superseded  # attempt 2's own redelivery
    # In one batch with attempt 2's first delivery, the old attempt alone is left out.
    MessageLog.objects.filter(pk=row.pk).update(status='PUBLISHED')  # released
    first_of_2 = dataclasses.replace(next_one, redelivered=False)
    old, new = lifecycle.start_many([again, first_of_2])
    assert old.superseded and not new.superseded
    assert MessageLog.objects.get(pk=row.pk).status == 'IN_PROGRESS'
    # A requeue counts from 1 again, its history kept: a redelivery of its attempt 1 runs.
    MessageLog.objects.filter(pk=row.pk).update(status='FAILED')
    assert lifecycle.mark_requeued(lifecycle.database(), ['lost-ack']) == ['lost-ack']
    requeued = MessageLog.objects.get(pk=row.pk)
    assert requeued.status == 'PUBLISHED' and 'requeued_at' in requeued.errors[-1]
    assert not lifecycle.start_many([again])[0].superseded
    assert MessageLog.objects.get(pk=row.pk).status == 'IN_PROGRESS'


def test_a_resent_copy_of_an_ended_attempt_is_superseded_beside_the_next_attempt(
        queue: str) -> None:
    """In one batch: a re-sent copy of attempt 1, whose row was released for attempt 2, and
    attempt 2's message. The copy is left out; attempt 2 starts the row."""
    row, copy = _after_attempt_1(queue, 'resent-late', 'PUBLISHED', timezone.now(), resent=True)
    [alone] = lifecycle.start_many([copy])
    assert alone.superseded and MessageLog.objects.get(pk=row.pk).status == 'PUBLISHED'
    next_one = dataclasses.replace(copy, attempt=2, resent=False)
    superseded, started = lifecycle.start_many([copy, next_one])
    assert superseded.superseded
    assert not (started.superseded or started.started_elsewhere or started.already_completed)
    row.refresh_from_db()
    assert (row.status, row.attempts) == ('IN_PROGRESS', 2)
    # A re-sent copy of the attempt that runs now is another copy's, as before.
    assert lifecycle.start_many([dataclasses.replace(copy, attempt=2)])[0].started_elsewhere


def test_retries_of_an_error_the_options_never_retry_are_not_exhausted() -> None:
    from carrot.options import TaskOptions
    from carrot.worker.ends import end_of
    from carrot.worker.executor import Outcome

    policy = TaskOptions(max_retries=2, dont_retry_for=(KeyError,))
    outcome = Outcome(output=None, log='', exception=KeyError('k'), traceback='')
    last = end_of('m', outcome, policy, 3)
    assert (last.finish.status, last.dead_letter, last.exhausted) == ('FAILED', None, False)
    outcome = Outcome(output=None, log='', exception=ValueError('v'), traceback='')
    last = end_of('m', outcome, policy, 3)
    assert last.exhausted and last.dead_letter is not None
    assert end_of('m', outcome, policy, 2).finish.status == 'DELAYED'


def test_expiry_works_with_use_tz_off(
        queue: str, start_worker: StartWorker, broker: Broker, tmp_path: Path) -> None:
    """Naive local times then: the message still says its offset, the rows stay naive."""
    runs = tmp_path / 'runs'
    with override_settings(USE_TZ=False):
        late = publish_message(tasks.runs_at, str(runs), expires=1)
        fresh = publish_message(tasks.runs_at, str(runs), expires=600)
        failing = publish_message(tasks.fail, 'untracked', expires=600, tracked=False)
        time.sleep(1.5)
        start_worker(carrot_settings(queue), env={'CARROT_TEST_USE_TZ': '0'})
        rows = {log.uuid: wait_for(lambda log=log: MessageLog.objects.filter(
            uuid=log.uuid, status__in=('COMPLETED', 'FAILED')).first(), what='its end')
            for log in (late, fresh, failing)}
        assert rows[late.uuid].status == 'FAILED' and 'expired at' in (
            rows[late.uuid].exception or '')
        assert rows[fresh.uuid].status == 'COMPLETED'
        assert rows[failing.uuid].exception == 'ValueError: untracked'
        assert rows[failing.uuid].expires_at is not None
    assert len(_runs(runs)) == 1
