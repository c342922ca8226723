"""Bad messages, a broker that restarts, a database that is busy: nothing is lost."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from django.test.utils import override_settings

from carrot.models import MessageLog
from carrot.utilities import publish_message
from carrot.worker.recorder import START_HOLD_SECONDS
from tests.conftest import Broker, Worker, carrot_settings, statuses, wait_for
from tests.project import tasks

StartWorker = Callable[..., Worker]


def _dead_reason(message: object) -> str:
    headers = message.properties['headers']  # type: ignore[attr-defined]
    reason = headers['x-carrot-dead-reason']
    return reason.decode() if isinstance(reason, bytes) else str(reason)


@pytest.mark.parametrize(('body', 'properties', 'reason'), [
    (b'not json at all', {'message_id': 'bad-body',
                          'headers': {'type': 'tests.project.tasks.noop'}},
     'The message body is not JSON'),
    (b'{"args": []}', {'message_id': 'no-type'}, "no 'type' header"),
    (b'{"args": []}', {'message_id': 'unknown-task', 'headers': {'type': 'os.system'}},
     'os.system is not a registered task'),
    (b'{"args": []}', {'message_id': 'import-fails',
                       'headers': {'type': 'tests.project.broken_tasks.never'}},
     'broken_tasks cannot be imported'),
    (b'{"args": []}', {'message_id': 'missing-function',
                       'headers': {'type': 'tests.project.tasks.nothing_here'}},
     'has no function called nothing_here'),
    (b'{"args": []}', {'message_id': 'long-' + 'x' * 245,
                       'headers': {'type': 'tests.project.tasks.noop'}},
     'carrot keeps at most 200'),
    (b'{"args": []}', {'message_id': 'nul-\x00-id',
                       'headers': {'type': 'tests.project.tasks.noop'}},
     'The message_id holds a NUL character'),
])
def test_a_message_that_cannot_run_is_dead_lettered_with_a_failed_row_saying_why(
        broker: Broker, start_worker: StartWorker, body: bytes,
        properties: dict[str, object], reason: str) -> None:
    queue = broker.queue_name()
    settings = carrot_settings(queue, broken_module=True)
    with override_settings(CARROT=settings):
        start_worker(settings)
        broker.publish_raw(queue, body, {**properties, 'delivery_mode': 2})
        good = publish_message(tasks.add, 1, 1)  # the worker goes on consuming
        message_id = str(properties['message_id'])
        linkable = len(message_id) <= 200 and '\x00' not in message_id
        wait_for(lambda: statuses() == ({'FAILED': 1, 'COMPLETED': 1} if linkable
                                        else {'COMPLETED': 1}), what='both messages')
        wait_for(lambda: broker.counts(f'{queue}.dead')[0] == 1, what='the dead letter')

    assert MessageLog.objects.get(pk=good.pk).output == '2'
    if linkable:
        row = MessageLog.objects.get(uuid=message_id)
        assert reason in (row.exception or '')
    [dead] = broker.get_all(f'{queue}.dead')
    assert dead.body == body
    assert reason in _dead_reason(dead)
    assert broker.counts(queue) == (0, 0)


@pytest.mark.parametrize(('swap', 'cluster_id', 'kept_properties'), [
    ((b'S\x00\x00\x00\x02ZZ', b'S\x00\x00\x00\x02\xff\xfe'), '', False),
    ((b'', b''), 'cluster-7', True),
])
def test_a_refused_message_whose_properties_cannot_be_sent_again_is_still_dead_lettered(
        queue: str, broker: Broker, start_worker: StartWorker, swap: tuple[bytes, bytes],
        cluster_id: str, kept_properties: bool) -> None:
    """Another client's header that is not UTF-8, or its cluster_id, which amqpstorm refuses."""
    start_worker(carrot_settings(queue))
    broker.publish_unencodable(
        queue, b'{"args": []}', {'message_id': 'foreign-1', 'delivery_mode': 2,
                                 'content_type': 'application/json',
                                 'headers': {'type': 'os.system', 'x-note': 'ZZ'}},
        swap=swap, cluster_id=cluster_id)
    wait_for(lambda: broker.counts(f'{queue}.dead')[0] == 1, what='the dead letter')
    [dead] = broker.get_all(f'{queue}.dead')
    assert 'os.system is not a registered task' in _dead_reason(dead)
    assert dead.properties['message_id'] == 'foreign-1'
    assert (dead.properties.get('content_type') == 'application/json') is kept_properties
    if not kept_properties:
        assert 'its properties could not be sent again' in _dead_reason(dead)
    row = MessageLog.objects.get(uuid='foreign-1')
    assert row.status == 'FAILED' and 'os.system' in (row.exception or '')
    assert broker.counts(queue) == (0, 0)


def test_a_bad_message_without_an_id_is_dead_lettered_with_an_error_log_line(
        queue: str, broker: Broker, start_worker: StartWorker) -> None:
    worker = start_worker(carrot_settings(queue))
    broker.publish_raw(queue, b'\x00\x01garbage', {'delivery_mode': 2})
    wait_for(lambda: broker.counts(f'{queue}.dead') == (1, 0), what='the dead letter')
    worker.stop()
    assert MessageLog.objects.count() == 0
    assert "ERROR carrot: carrot_test" in worker.logfile.read_text()
    assert 'dead-lettered' in worker.logfile.read_text()


@pytest.mark.broker_restart
def test_the_broker_restarting_mid_consumption_loses_no_task(
        queue: str, start_worker: StartWorker, broker: Broker) -> None:
    for _ in range(300):
        publish_message(tasks.sleep, 0.05)
    worker = start_worker(carrot_settings(queue, concurrency=5), '--loglevel', 'WARNING')
    wait_for(lambda: statuses().get('COMPLETED', 0) >= 20, what='some completions')
    subprocess.run(['rabbitmqctl', '-q', 'stop_app'], check=True, timeout=120)
    try:
        completed_while_down = statuses().get('COMPLETED', 0)
        assert completed_while_down < 300
    finally:
        subprocess.run(['rabbitmqctl', '-q', 'start_app'], check=True, timeout=120)
        subprocess.run(['rabbitmqctl', '-q', 'await_startup'], check=True, timeout=120)
    wait_for(lambda: statuses().get('COMPLETED', 0) == 300, timeout=180,
             what='all 300 tasks to complete after the restart')
    assert statuses() == {'COMPLETED': 300}
    assert 'reconnecting' in worker.output or 'broker unavailable' in worker.output
    assert broker.counts(queue) == (0, 0)


def test_a_fault_in_carrot_itself_dead_letters_the_message_and_consuming_goes_on(
        queue: str, broker: Broker, start_worker: StartWorker) -> None:
    worker = start_worker(carrot_settings(
        queue, consumer_class='tests.project.consumers.CrashingConsumer'))
    crashed = publish_message(tasks.echo, 1)
    good = publish_message(tasks.add, 1, 2)
    wait_for(lambda: MessageLog.objects.get(pk=good.pk).status == 'COMPLETED', what='add')
    wait_for(lambda: MessageLog.objects.get(pk=crashed.pk).status == 'FAILED', what='echo')
    crashed.refresh_from_db()
    assert 'RuntimeError: a bug in the consumer' in (crashed.exception or '')
    [dead] = broker.get_all(f'{queue}.dead')
    assert 'a bug in the consumer' in _dead_reason(dead)
    assert 'Traceback' in worker.output


def test_a_fault_after_the_task_ran_leaves_its_row_failed(
        queue: str, broker: Broker, start_worker: StartWorker) -> None:
    """The start the recorder held back is dropped, not written over the FAILED row."""
    start_worker(carrot_settings(
        queue, consumer_class='tests.project.consumers.FailingAfterTheTaskConsumer'))
    broken = publish_message(tasks.echo, 1)
    good = publish_message(tasks.add, 1, 2)
    wait_for(lambda: MessageLog.objects.get(pk=broken.pk).status == 'FAILED', what='FAILED')
    time.sleep(3 * START_HOLD_SECONDS)
    broken.refresh_from_db()
    assert broken.status == 'FAILED'
    assert 'a bug after the task ran' in (broken.exception or '')
    [dead] = broker.get_all(f'{queue}.dead')
    assert 'a bug after the task ran' in _dead_reason(dead)
    wait_for(lambda: MessageLog.objects.get(pk=good.pk).status == 'COMPLETED', what='add')


def test_what_a_task_returns_that_cannot_be_shown_does_not_fail_it(
        queue: str, broker: Broker, start_worker: StartWorker) -> None:
    start_worker(carrot_settings(queue))
    log = publish_message(tasks.unprintable)
    wait_for(lambda: MessageLog.objects.get(pk=log.pk).status == 'COMPLETED', what='COMPLETED')
    log.refresh_from_db()
    assert log.output == ('(a _Unprintable that cannot be shown: RuntimeError: this output '
                          'cannot be printed)')
    assert broker.counts(f'{queue}.dead') == (0, 0)


def test_text_a_database_cannot_encode_is_stored_escaped_without_failing_its_batch(
        queue: str, broker: Broker, start_worker: StartWorker) -> None:
    """A lone surrogate (an undecodable file name) in a task's log, error and output."""
    worker = start_worker(carrot_settings(queue, concurrency=5))
    failing = publish_message(tasks.open_undecodable, True)
    returning = publish_message(tasks.open_undecodable, False)
    others = [publish_message(tasks.add, n, 1) for n in range(20)]
    wait_for(lambda: statuses() == {'FAILED': 1, 'COMPLETED': 21}, what='every task to end')
    failing.refresh_from_db()
    assert 'no such file: caf\\udce9.txt' in (failing.exception or '')
    assert 'opening caf\\udce9.txt' in failing.log
    assert 'caf\\udce9.txt' in (failing.traceback or '')
    returning.refresh_from_db()
    assert returning.output == '"caf\\udce9.txt"'  # JSON escapes it itself
    assert {row.attempts for row in MessageLog.objects.all()} == {1}  # nothing ran twice
    assert [MessageLog.objects.get(pk=o.pk).output for o in others] == [
        str(n + 1) for n in range(20)]
    assert broker.counts(queue) == (0, 0)
    worker.stop()
    assert 'opening caf\\udce9.txt' in worker.logfile.read_text(encoding='utf-8')
    assert 'Logging error' not in worker.output


def test_a_task_that_blocks_the_hub_is_reported(
        queue: str, start_worker: StartWorker) -> None:
    worker = start_worker(carrot_settings(queue))
    # gevent's monitor looks once a second and reports a greenlet it found running at two
    # looks in a row; on a busy machine the looks drift apart, so the block is made long.
    log = publish_message(tasks.compute, 4.0)
    wait_for(lambda: MessageLog.objects.get(pk=log.pk).status == 'COMPLETED', what='compute')
    wait_for(lambda: 'blocked for more than 1.0 s by task tests.project.tasks.compute'
             in worker.output, timeout=10, what=f'the warning, in:\n{worker.output}')


def test_a_queue_deleted_under_the_worker_is_declared_again_and_consumed(
        queue: str, broker: Broker, start_worker: StartWorker) -> None:
    worker = start_worker(carrot_settings(queue, concurrency=2))
    with broker.connection() as conn, conn.channel() as channel:
        channel.queue.delete(queue)
    wait_for(lambda: 'cancelled the consumer' in worker.output, what='the cancel')
    wait_for(lambda: broker.exists(queue), what='the queue to be declared again')
    log = publish_message(tasks.add, 2, 2)
    wait_for(lambda: MessageLog.objects.get(pk=log.pk).status == 'COMPLETED', what='the task')


def test_a_message_that_arrives_while_the_database_is_locked_waits_and_runs_once(
        queue: str, broker: Broker, start_worker: StartWorker, database: str,
        tmp_path: Path) -> None:
    """The worker waits for a database it cannot write to: the task runs (its start is held
    back), its end waits with the message unacknowledged on its consumer instead of being
    handed back to run again, and is written once the lock is gone."""
    if database != 'sqlite':
        pytest.skip('holds the SQLite write lock to make every write fail; the PostgreSQL '
                    'outage is tests/test_outage.py')
    import sqlite3

    from django.conf import settings as django_settings

    runs = tmp_path / 'runs'
    worker = start_worker(carrot_settings(queue), env={'CARROT_TEST_SQLITE_TIMEOUT': '0.2'})
    blocker = sqlite3.connect(django_settings.DATABASES['default']['NAME'],
                              isolation_level=None)
    blocker.execute('BEGIN IMMEDIATE')  # every other writer now gets "database is locked"
    try:
        broker.publish_raw(queue, json.dumps({'args': [str(runs), 'locked']}).encode(), {
            'message_id': 'while-locked', 'delivery_mode': 2,
            'headers': {'type': 'tests.project.tasks.record_run'}})
        wait_for(lambda: broker.counts(queue) == (0, 1), what='the worker to take the message')
        time.sleep(3)  # several of the recorder's retries
        assert broker.counts(queue) == (0, 1), 'the message left its consumer while locked'
        assert not MessageLog.objects.filter(uuid='while-locked').exists()  # nothing written
    finally:
        blocker.execute('ROLLBACK')
        blocker.close()
    row = wait_for(lambda: MessageLog.objects.filter(uuid='while-locked',
                                                     status='COMPLETED').first(),
                   timeout=60, what='the message to run once the database is back')
    assert row.output == '"locked"'
    wait_for(lambda: broker.counts(queue) == (0, 0), what='the queue to be empty')
    assert runs.read_text().split() == ['locked'], 'the task ran more than once'
    assert 'handed back to the queue' not in worker.output


def test_a_dead_letter_keeps_the_message_but_not_its_expiry(
        queue: str, broker: Broker, start_worker: StartWorker) -> None:
    start_worker(carrot_settings(queue))
    broker.publish_raw(queue, b'not json', {'message_id': 'expiring', 'expiration': '60000',
                                            'headers': {'type': 'tests.project.tasks.noop'}})
    wait_for(lambda: broker.counts(f'{queue}.dead') == (1, 0), what='the dead letter')
    [dead] = broker.get_all(f'{queue}.dead')
    assert dead.body == b'not json'
    assert not dead.properties.get('expiration')
    assert dead.properties['delivery_mode'] == 2
