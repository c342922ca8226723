"""Untracked tasks: no MessageLog row when they succeed, a FAILED row when they fail.

Against the real RabbitMQ and database, the worker as a subprocess.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from django.db import transaction
from django.test import override_settings

from carrot import message
from carrot.conf import parse
from carrot.exceptions import CarrotConfigException
from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import Broker, Worker, carrot_settings, wait_for
from tests.project import tasks

StartWorker = Callable[..., Worker]


def _runs(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _drained(broker: Broker, queue: str) -> bool:
    return broker.counts(queue) == (0, 0)


def test_an_untracked_task_that_succeeds_leaves_no_row(
        queue: str, start_worker: StartWorker, broker: Broker, tmp_path: Path) -> None:
    ran = tmp_path / 'ran'
    start_worker(carrot_settings(queue, concurrency=4))
    returned = [publish_message(tasks.touch, str(ran), tracked=False) for _ in range(20)]
    assert all(log.pk is None for log in returned)  # the row the caller gets is not saved
    assert len({log.uuid for log in returned}) == 20
    assert not MessageLog.objects.exists()  # nothing written when published...
    wait_for(lambda: _runs(ran) == 20, what='twenty untracked runs')
    wait_for(lambda: _drained(broker, queue), what='every message acknowledged')
    assert not MessageLog.objects.exists()  # ...nor when they ran
    assert _runs(ran) == 20
    assert broker.message_count(f'{queue}.dead') == 0


def test_an_untracked_task_that_fails_is_recorded_with_its_traceback(
        queue: str, start_worker: StartWorker, broker: Broker) -> None:
    start_worker(carrot_settings(queue))
    returned = publish_message(tasks.fail, 'untracked and failing', tracked=False)
    publish_message(tasks.noop, tracked=False)
    row = wait_for(lambda: MessageLog.objects.filter(uuid=returned.uuid).first(),
                   what='the FAILED row')
    wait_for(lambda: _drained(broker, queue), what='both messages acknowledged')
    row.refresh_from_db()
    assert (row.status, row.attempts, row.task) == ('FAILED', 1, 'tests.project.tasks.fail')
    assert row.exception == 'ValueError: untracked and failing'
    assert 'raise ValueError(message)' in (row.traceback or '')
    assert json.loads(row.task_args or '') == ['untracked and failing']
    assert row.failure_time is not None
    assert MessageLog.objects.count() == 1  # the no-op that succeeded has none
    assert broker.message_count(f'{queue}.dead') == 0


def test_a_queue_can_be_untracked_and_a_call_can_track_a_task_on_it(
        broker: Broker, start_worker: StartWorker, tmp_path: Path) -> None:
    queue = broker.queue_name('untracked')
    settings = carrot_settings(queue, tracked=False)
    ran = tmp_path / 'ran'
    with override_settings(CARROT=settings):
        start_worker(settings)
        untracked = publish_message(tasks.touch, str(ran))
        tracked = publish_message(tasks.add, 2, 3, tracked=True)
        assert untracked.pk is None and tracked.pk is not None
        wait_for(lambda: _runs(ran) == 1, what='the untracked run')
        tracked = wait_for(lambda: MessageLog.objects.filter(
            pk=tracked.pk, status='COMPLETED').first(), what='the tracked run')
        wait_for(lambda: _drained(broker, queue), what='both acknowledged')
    assert tracked.output == '5'
    assert list(MessageLog.objects.values_list('uuid', flat=True)) == [tracked.uuid]


def test_an_untracked_message_says_so_and_a_tracked_one_is_upstreams_format(
        queue: str, broker: Broker) -> None:
    publish_message(tasks.noop, tracked=False)
    publish_message(tasks.noop)
    untracked, tracked = broker.get_all(queue)
    assert untracked.properties['headers'][message.TRACKED_HEADER] is False
    assert message.TRACKED_HEADER not in tracked.properties['headers']


def test_untracked_publishes_in_a_transaction_are_sent_on_commit_and_not_on_rollback(
        queue: str, broker: Broker) -> None:
    with transaction.atomic():
        publish_message(tasks.noop, tracked=False)
        assert broker.message_count(queue) == 0
    assert broker.message_count(queue) == 1
    with pytest.raises(RuntimeError), transaction.atomic():
        publish_message(tasks.noop, tracked=False)
        raise RuntimeError('rolled back')
    assert broker.message_count(queue) == 1
    assert not MessageLog.objects.exists()


def test_an_untracked_message_that_cannot_be_sent_after_commit_gets_a_failed_row(
        queue: str, broker: Broker) -> None:
    """It must not vanish: the caller's transaction is over, so the row is how it is seen."""
    with transaction.atomic():
        log = publish_message(tasks.noop, tracked=False, exchange='carrot-no-such-exchange')
    row = MessageLog.objects.get(uuid=log.uuid)
    assert row.status == 'FAILED'
    assert 'Not published' in (row.exception or '')
    assert broker.message_count(queue) == 0


def test_tracked_must_be_true_or_false(queue: str) -> None:
    with pytest.raises(CarrotConfigException, match="tracked must be True, False or None, "
                                                    "not 'no'"):
        publish_message(tasks.noop, tracked='no')  # type: ignore[arg-type]
    assert not MessageLog.objects.exists()
    with pytest.raises(CarrotConfigException,
                       match=r"CARROT\['queues'\]\[0\] \('q'\)\['tracked'\] must be True or "
                             r"False, not 0"):
        parse({'queues': [{'name': 'q', 'tracked': 0}]})


def test_a_foreign_message_with_a_bad_tracked_header_is_dead_lettered_with_its_row(
        queue: str, start_worker: StartWorker, broker: Broker) -> None:
    start_worker(carrot_settings(queue))
    message_id = str(uuid.uuid4())
    broker.publish_raw(queue, b'{"args": [], "kwargs": {}}', {
        'message_id': message_id,
        'headers': {'type': 'tests.project.tasks.noop', message.TRACKED_HEADER: 'yes'}})
    row = wait_for(lambda: MessageLog.objects.filter(uuid=message_id, status='FAILED').first(),
                   what='the FAILED row')
    assert f"The '{message.TRACKED_HEADER}' header is 'yes'" in (row.exception or '')
    wait_for(lambda: broker.message_count(f'{queue}.dead') == 1, what='the dead letter')


def test_a_failed_untracked_task_requeued_from_the_monitor_ends_in_its_row(
        broker: Broker, start_worker: StartWorker) -> None:
    """The row exists, so the requeued run is tracked: it must not stay PUBLISHED."""
    from carrot.monitor import actions

    queue = broker.queue_name('untracked')
    settings = carrot_settings(queue, tracked=False)
    with override_settings(CARROT=settings):
        start_worker(settings)
        failed = publish_message(tasks.add, 'a', 1)  # str + int: TypeError
        row = wait_for(lambda: MessageLog.objects.filter(uuid=failed.uuid,
                                                         status='FAILED').first(),
                       what='the FAILED row')
        MessageLog.objects.filter(pk=row.pk).update(task_args='[2, 3]')  # now it succeeds
        assert actions.requeue([row.pk]).count == 1
        row = wait_for(lambda: MessageLog.objects.filter(pk=row.pk, status='COMPLETED').first(),
                       what='the requeued run recorded in its row')
    assert (row.output, row.attempts) == ('5', 2)
