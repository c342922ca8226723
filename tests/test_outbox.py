"""The row as the outbox record: a publish returns before its confirm, and its task still runs.

Against the real RabbitMQ (restarted in one test) and the test database; the worker and the
killed publisher are subprocesses; a proxy drops what the publisher sends when told to.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.db import connection, transaction
from django.test.utils import override_settings
from django.utils import timezone

from carrot import lifecycle, message, outbox
from carrot.broker import get_publisher
from carrot.conf import get_settings
from carrot.models import MessageLog
from carrot.utilities import publish_message
from tests.conftest import ROOT, Broker, Worker, carrot_settings, statuses, wait_for
from tests.project import tasks
from tests.proxy import Proxy

StartWorker = Callable[..., Worker]

PUBLISHER = '''
import os, signal, sys
import django
django.setup()
from carrot.utilities import publish_message
queue, path, first, total = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for index in range(total):
    if index == first:
        print('sent the first ones', flush=True)
        sys.stdin.readline()
    publish_message('tests.project.tasks.record_run', path, f'task-{index}', queue=queue)
print(f'returned {total}', flush=True)
os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.fixture
def rabbitmq_proxy() -> Iterator[Proxy]:
    proxy = Proxy(('127.0.0.1', 5672))
    yield proxy
    proxy.close()


def _runs(path: Path) -> list[str]:
    return sorted(path.read_text().split()) if path.exists() else []


def _restart_rabbitmq() -> None:
    subprocess.run(['rabbitmqctl', '-q', 'stop_app'], check=True, timeout=120)
    subprocess.run(['rabbitmqctl', '-q', 'start_app'], check=True, timeout=120)
    subprocess.run(['rabbitmqctl', '-q', 'await_startup'], check=True, timeout=120)


ON_POSTGRESQL = pytest.mark.skipif(os.environ.get('CARROT_TEST_DB') != 'postgresql',
                                   reason='synchronous_commit changes only PostgreSQL commits')


@pytest.mark.parametrize('synchronous_commit', [
    True, pytest.param(False, marks=ON_POSTGRESQL, id='synchronous_commit-off')])
def test_every_returned_publish_runs_once_though_the_publisher_is_killed_and_rabbitmq_restarts(
        queue: str, broker: Broker, rabbitmq_proxy: Proxy, start_worker: StartWorker,
        tmp_path: Path, synchronous_commit: bool) -> None:
    """20 tasks reach RabbitMQ; the next 20 calls return while the network drops their
    frames; the publisher is SIGKILLed right after the last call returns, and RabbitMQ
    restarts before a worker starts. All 40 run, each once: also when the rows are committed
    without waiting for the disk (the database server itself does not crash here)."""
    runs = tmp_path / 'runs'
    through_proxy = {**carrot_settings(queue), 'synchronous_commit': synchronous_commit}
    through_proxy['default_broker'] = f'amqp://guest:guest@127.0.0.1:{rabbitmq_proxy.port}/'
    publisher = subprocess.Popen(
        [sys.executable, '-c', PUBLISHER, queue, str(runs), '20', '40'], cwd=ROOT,
        env={**os.environ, 'CARROT_TEST_CARROT': json.dumps(through_proxy)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert publisher.stdout is not None and publisher.stdin is not None
    assert publisher.stdout.readline().strip() == 'sent the first ones'
    wait_for(lambda: broker.exists(queue) and broker.counts(queue)[0] == 20,
             what='the first 20 messages in the queue')
    rabbitmq_proxy.hold()
    publisher.stdin.write('go\n')
    publisher.stdin.flush()
    output, _ = publisher.communicate(timeout=60)
    assert publisher.returncode == -9, output
    assert 'returned 40' in output
    rabbitmq_proxy.cut()
    assert broker.counts(queue)[0] == 20  # the last 20 never reached RabbitMQ
    assert MessageLog.objects.filter(status=MessageLog.PUBLISHED).count() == 40
    assert MessageLog.objects.filter(awaiting_confirm=True).count() >= 20

    _restart_rabbitmq()
    worker = start_worker({**carrot_settings(queue, concurrency=5),
                           'resend_unconfirmed_after': 1})
    wait_for(lambda: statuses() == {'COMPLETED': 40}, timeout=120, what='all 40 tasks')
    wait_for(lambda: broker.counts(queue) == (0, 0), what='every copy settled')
    assert _runs(runs) == sorted(f'task-{index}' for index in range(40))
    assert set(MessageLog.objects.values_list('attempts', 'awaiting_confirm')) == {(1, False)}
    assert 'Sent ' in worker.output and 'again whose publishing process' in worker.output


def _wal_syncs() -> int:
    """The WAL flushes PostgreSQL has counted, this connection's own included."""
    with connection.cursor() as cursor:
        cursor.execute('SELECT pg_stat_force_next_flush()')  # this backend's counts, when idle
        cursor.execute('SELECT wal_sync FROM pg_stat_wal')
        syncs: int = cursor.fetchone()[0]
    return syncs


@ON_POSTGRESQL
def test_with_synchronous_commit_off_a_row_is_committed_without_waiting_for_the_disk(
        queue: str) -> None:
    """Each synchronous commit flushes the WAL to disk before it returns; with
    CARROT['synchronous_commit'] False the 50 rows' commits leave that to PostgreSQL's WAL
    writer (a flush every 200 ms), and the connection's own setting is left as it was,
    also for a transaction the rows are written in."""
    with connection.cursor() as cursor:
        cursor.execute('SHOW fsync')
        if cursor.fetchone()[0] != 'on':
            pytest.skip('this PostgreSQL does not flush its WAL (fsync off)')
    flushes = {}
    for synchronous in (True, False):
        with override_settings(CARROT={**carrot_settings(queue),
                                       'synchronous_commit': synchronous}):
            before = _wal_syncs()
            for index in range(50):
                publish_message(tasks.add, index, index)
            flushes[synchronous] = _wal_syncs() - before
            with connection.cursor() as cursor:
                cursor.execute('SHOW synchronous_commit')
                assert cursor.fetchone()[0] == 'on'
                with transaction.atomic():
                    publish_message(tasks.add, 1, 2)
                    cursor.execute('SHOW synchronous_commit')
                    assert cursor.fetchone()[0] == 'on'
    assert flushes[True] >= 40, flushes
    assert flushes[False] <= 10, flushes
    assert MessageLog.objects.filter(status=MessageLog.PUBLISHED).count() == 102


def _resent_copy(broker: Broker, queue: str, log: MessageLog) -> None:
    """Publish the copy of ``log``'s message the outbox would send again."""
    task_message = message.TaskMessage(task=log.task, args=log.positionals,
                                       kwargs=log.keywords, message_id=log.uuid, resent=True)
    body, properties = message.encode(task_message)
    broker.publish_raw(queue, body, properties)


@pytest.mark.parametrize(('seconds', 'seen_as', 'said'), [
    (0.0, 'COMPLETED', 'was completed before'),
    (2.0, 'IN_PROGRESS', 'another copy of it started'),
])
def test_a_resent_copy_of_a_task_another_copy_started_is_acknowledged_without_running(
        queue: str, broker: Broker, start_worker: StartWorker, tmp_path: Path, seconds: float,
        seen_as: str, said: str) -> None:
    runs = tmp_path / 'runs'
    worker = start_worker(carrot_settings(queue, concurrency=2))
    log = publish_message(tasks.record_run, str(runs), 'once', seconds, queue=queue)
    wait_for(lambda: statuses() == {seen_as: 1}, what=f'the task {seen_as}')
    _resent_copy(broker, queue, log)
    wait_for(lambda: said in worker.output, what='the copy to be seen')
    wait_for(lambda: statuses() == {'COMPLETED': 1}, what='the task to end')
    wait_for(lambda: broker.counts(queue) == (0, 0), what='both acknowledged')
    assert _runs(runs) == ['once']
    assert MessageLog.objects.get(pk=log.pk).attempts == 1


def test_a_resent_copy_whose_first_send_was_lost_runs_once(
        queue: str, broker: Broker, start_worker: StartWorker, tmp_path: Path) -> None:
    runs = tmp_path / 'runs'
    log = _row_awaiting_confirm(queue, 'lost-first-send', [str(runs), 'resent'])
    start_worker(carrot_settings(queue))  # declares the queue
    _resent_copy(broker, queue, log)
    _resent_copy(broker, queue, log)  # sent again by its process and by the service
    wait_for(lambda: statuses() == {'COMPLETED': 1}, what='the task')
    wait_for(lambda: broker.counts(queue) == (0, 0), what='both copies settled')
    assert _runs(runs) == ['resent']
    assert MessageLog.objects.get(pk=log.pk).attempts == 1


def _row_awaiting_confirm(queue: str, message_id: str, args: list[object]) -> MessageLog:
    return lifecycle.record_published(
        message_id=message_id, task='tests.project.tasks.record_run', args_json=json.dumps(args),
        kwargs_json='{}', queue=queue, exchange='', routing_key=queue, priority=0)


def _in_queue(broker: Broker, queue: str, confirmed: bool = True,
              ) -> dict[str, message.TaskMessage]:
    """Every message now in ``queue``, taken, by message id."""
    return {decoded.message_id: decoded for decoded in
            (message.decode(m.body, m.properties) for m in broker.get_all(queue, confirmed))}


def test_publishes_a_lost_connection_left_unconfirmed_are_sent_again_by_their_process(
        queue: str, broker: Broker, rabbitmq_proxy: Proxy) -> None:
    settings = carrot_settings(queue)
    settings['default_broker'] = f'amqp://guest:guest@127.0.0.1:{rabbitmq_proxy.port}/'
    with override_settings(CARROT=settings):
        try:
            first = publish_message(tasks.add, 1, 2, queue=queue)
            assert outbox.drain(10)
            rabbitmq_proxy.hold()
            held = [publish_message(tasks.add, n, n, queue=queue) for n in range(5)]
            assert MessageLog.objects.filter(awaiting_confirm=True).count() == 5
            rabbitmq_proxy.cut()
            rabbitmq_proxy.restore()
            assert outbox.drain(30)
        finally:
            get_publisher().close()
    sent = _in_queue(broker, queue)
    assert set(sent) == {first.uuid, *(log.uuid for log in held)}
    assert {message_id for message_id, m in sent.items() if m.resent} == {log.uuid for log in held}
    assert not MessageLog.objects.filter(awaiting_confirm=True).exists()


def test_a_publish_the_broker_refuses_is_sent_again_until_it_is_taken(broker: Broker) -> None:
    queue = broker.queue_name('full')  # declared by the first publish, with its arguments
    full_at_one = {'x-max-length': 1, 'x-overflow': 'reject-publish'}
    with override_settings(CARROT=carrot_settings(queue, queue_arguments=full_at_one)):
        first = publish_message(tasks.add, 1, 1, queue=queue)
        second = publish_message(tasks.add, 2, 2, queue=queue)  # refused, but later
        assert not outbox.drain(1.0)
        assert list(MessageLog.objects.filter(awaiting_confirm=True)) == [second]
        assert set(_in_queue(broker, queue, confirmed=False)) == {first.uuid}  # makes room
        assert outbox.drain(30)
    [(message_id, again)] = _in_queue(broker, queue).items()
    assert (message_id, again.resent, again.args) == (second.uuid, True, [2, 2])
    assert not MessageLog.objects.filter(awaiting_confirm=True).exists()


def test_the_service_sends_again_only_the_old_rows_still_awaiting_their_confirm(
        queue: str, broker: Broker) -> None:
    with override_settings(CARROT={**carrot_settings(queue), 'resend_unconfirmed_after': 30}):
        old = _row_awaiting_confirm(queue, 'old', ['x', 'old'])
        young = _row_awaiting_confirm(queue, 'young', ['x', 'young'])
        done = _row_awaiting_confirm(queue, 'done', ['x', 'done'])
        long_ago = timezone.now() - datetime.timedelta(seconds=60)
        MessageLog.objects.filter(pk__in=[old.pk, done.pk]).update(publish_time=long_ago)
        MessageLog.objects.filter(pk=done.pk).update(status=MessageLog.COMPLETED)
        assert outbox.resend_unconfirmed() == 1
        assert outbox.resend_unconfirmed() == 0
    [(message_id, again)] = _in_queue(broker, queue).items()
    assert (message_id, again.resent, again.args) == ('old', True, ['x', 'old'])
    assert dict(MessageLog.objects.values_list('uuid', 'awaiting_confirm')) == {
        'old': False, 'young': True, 'done': False}
    assert young.pk


def test_a_resent_copy_redelivered_after_its_worker_died_runs_again(
        queue: str, broker: Broker, start_worker: StartWorker, tmp_path: Path) -> None:
    """The only copy left (its first send was lost) started the row itself: when its worker
    is killed, RabbitMQ's redelivery of it must run, not take the row for another copy's."""
    runs = tmp_path / 'runs'
    log = _row_awaiting_confirm(queue, 'only-copy', [str(runs), 'resent', 3.0])
    first = start_worker(carrot_settings(queue))
    _resent_copy(broker, queue, log)
    wait_for(lambda: statuses() == {'IN_PROGRESS': 1}, what='the copy to start')
    first.kill()
    start_worker(carrot_settings(queue))
    wait_for(lambda: statuses() == {'COMPLETED': 1}, timeout=60, what='the redelivery to run')
    assert _runs(runs) == ['resent']  # the killed run never got to write its line
    assert MessageLog.objects.get(pk=log.pk).attempts == 2


def _released_for_attempt_2(queue: str, message_id: str, args: list[object]) -> MessageLog:
    """A row whose attempt 1 ran and failed, released now for attempt 2: PUBLISHED, awaiting
    the confirm of attempt 2's message, which is not sent yet."""
    log = _row_awaiting_confirm(queue, message_id, args)
    [started] = lifecycle.start_many([lifecycle.Start(
        message_id=message_id, task=log.task, args=args, kwargs={}, queue=queue, exchange='',
        routing_key=queue, priority=0)])
    lifecycle.finish_many([dataclasses.replace(lifecycle.retrying(
        message_id, exception='ConnectionError: once', traceback=None, log='', attempt=1,
        run_after=timezone.now()), pk=started.pk)])
    [row] = lifecycle.release_due([queue], 10)
    return row


def test_a_resent_copy_of_an_ended_attempt_does_not_run_beside_the_next_attempt(
        queue: str, broker: Broker, start_worker: StartWorker, tmp_path: Path) -> None:
    """Attempt 1's first send went unconfirmed and was sent again; attempt 1 ran, failed and
    its row was released for attempt 2 before the copy came. The copy must not run: attempt
    2 runs, once."""
    runs = tmp_path / 'runs'
    row = _released_for_attempt_2(queue, 'ended-attempt', [str(runs), 'attempt', 0.5])
    _resent_copy(broker, queue, row)  # attempt 1's copy
    worker = start_worker(carrot_settings(queue, concurrency=2))
    wait_for(lambda: 'the end of this attempt is recorded already' in worker.output,
             what='the copy seen')
    wait_for(lambda: broker.counts(queue) == (0, 0), what='the copy acknowledged')
    assert statuses() == {'PUBLISHED': 1}  # left to attempt 2
    queues = {queue: get_settings().queue(queue)}
    assert outbox.send_rows(lifecycle.database(), [row], queues, resent=False) == 1
    wait_for(lambda: statuses() == {'COMPLETED': 1}, what='attempt 2 to run')
    assert _runs(runs) == ['attempt']
    assert MessageLog.objects.get(pk=row.pk).attempts == 2


def test_a_late_confirm_of_an_earlier_send_leaves_the_next_attempt_awaiting_its_own(
        queue: str, broker: Broker) -> None:
    """The publisher recorded attempt 1's confirm only after the row had run, failed and been
    released for attempt 2: if it cleared the row's flag, attempt 2's message, lost before
    RabbitMQ stored it, would never be sent again."""
    row = _released_for_attempt_2(queue, 'late-confirm', ['x', 'late'])
    alias = lifecycle.database()
    lifecycle.mark_confirmed(alias, [row.uuid], released_at=None)  # as the publisher's outbox
    assert MessageLog.objects.get(pk=row.pk).awaiting_confirm
    assert outbox.send_rows(alias, [row], {queue: get_settings().queue(queue)},
                            resent=False) == 1
    assert not MessageLog.objects.get(pk=row.pk).awaiting_confirm  # attempt 2's own confirm
    assert [m.attempt for m in _in_queue(broker, queue).values()] == [2]


def test_the_service_resends_a_released_row_and_its_confirm_clears_the_row(
        queue: str, broker: Broker) -> None:
    """The service reads the row's run_after back from the database and matches its confirm
    by it: the row must stop awaiting, or it would be sent again every round."""
    with override_settings(CARROT={**carrot_settings(queue), 'resend_unconfirmed_after': 30}):
        row = _released_for_attempt_2(queue, 'released-lost', ['x', 'lost'])
        long_ago = timezone.now() - datetime.timedelta(seconds=60)
        MessageLog.objects.filter(pk=row.pk).update(publish_time=long_ago, run_after=long_ago)
        assert outbox.resend_unconfirmed() == 1
        assert not MessageLog.objects.get(pk=row.pk).awaiting_confirm
        assert outbox.resend_unconfirmed() == 0
    [again] = _in_queue(broker, queue).values()
    assert (again.message_id, again.attempt, again.resent) == ('released-lost', 2, True)
