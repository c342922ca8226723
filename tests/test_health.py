"""Workers' heartbeats and what the monitor's health page flags: orphaned and stuck tasks,
late schedules; requeueing the first two. Against the real RabbitMQ and database, the
worker as a subprocess."""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable

from django.contrib.auth.models import User
from django.utils import timezone

from carrot import heartbeats
from carrot.models import MessageLog, ScheduledTask, WorkerHeartbeat
from tests.conftest import Broker, Worker, carrot_settings, wait_for
from tests.monitoring import (
    PREFIX,
    client_for,
    make_rows,
    make_schedule,
    users_fixture,  # noqa: F401  (the users fixture)
)

StartWorker = Callable[..., Worker]
API = PREFIX + 'api/'


def _ago(**delta: float) -> datetime.datetime:
    return timezone.now() - datetime.timedelta(**delta)


def _queued(queue: str, published: datetime.datetime, **fields: object) -> MessageLog:
    """A PUBLISHED row of ``queue``, published at ``published``."""
    [row] = make_rows(1, status=MessageLog.PUBLISHED, queue=queue, **fields)
    MessageLog.objects.filter(pk=row.pk).update(publish_time=published)
    return row


def test_a_running_service_beats_and_a_clean_stop_removes_its_heartbeat(
        queue: str, start_worker: StartWorker) -> None:
    worker = start_worker(carrot_settings(queue, concurrency=3))
    name = f'{socket.gethostname()}:{worker.pid}'
    beat = wait_for(lambda: WorkerHeartbeat.objects.filter(worker=name).first(),
                    what='the first heartbeat')
    assert beat.queues == [f'{queue}×3'] and beat.scheduler is True
    assert name in heartbeats.live_workers()
    first = beat.seen_at
    wait_for(lambda: WorkerHeartbeat.objects.get(worker=name).seen_at > first, timeout=30,
             what='the next heartbeat')
    assert worker.stop() == 0
    assert not WorkerHeartbeat.objects.filter(worker=name).exists()


def test_an_in_progress_row_of_a_silent_worker_is_orphaned_and_requeued_to_completion(
        queue: str, start_worker: StartWorker, users: dict[str, User], broker: Broker) -> None:
    WorkerHeartbeat.objects.create(worker='gone:1', seen_at=_ago(minutes=5),
                                   started_at=_ago(hours=1))
    WorkerHeartbeat.objects.create(worker='alive:2', seen_at=timezone.now())
    [lost] = make_rows(1, status=MessageLog.IN_PROGRESS, queue=queue, worker='gone:1',
                       task='tests.project.tasks.add', args=[2, 3], start_time=_ago(minutes=5),
                       attempts=1)
    [running] = make_rows(1, status=MessageLog.IN_PROGRESS, queue=queue, worker='alive:2',
                          start_time=_ago(minutes=5))
    [fresh_unknown] = make_rows(1, status=MessageLog.IN_PROGRESS, queue=queue,
                                start_time=timezone.now())
    assert [row.pk for row in heartbeats.orphaned()] == [lost.pk]

    client = client_for(users, 'staff')
    page = client.get(PREFIX + 'health/').content.decode()
    assert lost.uuid in page and running.uuid not in page and fresh_unknown.uuid not in page
    assert 'stopped reporting' in page
    answer = client.get(API + 'health/').json()
    assert [t['id'] for t in answer['orphaned']] == [lost.pk]
    assert {w['worker']: w['alive'] for w in answer['workers']} == {
        'gone:1': False, 'alive:2': True}

    # Requeue takes the orphaned row and skips the one whose worker is alive.
    done = client.post(PREFIX + 'tasks/requeue/', {
        'ids': [lost.pk, running.pk], 'status': 'running', 'next': PREFIX + 'health/'})
    assert done.status_code == 302 and done['Location'] == PREFIX + 'health/'
    assert MessageLog.objects.get(pk=running.pk).status == MessageLog.IN_PROGRESS
    assert MessageLog.objects.get(pk=lost.pk).status == MessageLog.PUBLISHED
    start_worker(carrot_settings(queue))
    row = wait_for(lambda: MessageLog.objects.filter(pk=lost.pk, status='COMPLETED').first(),
                   what='the requeued orphan to complete')
    assert row.output == '5' and row.attempts == 2


def test_a_confirmed_queued_row_whose_message_is_gone_is_stuck_and_requeued(
        queue: str, users: dict[str, User], broker: Broker) -> None:
    stuck = _queued(queue, _ago(minutes=10))
    young = _queued(queue, _ago(minutes=1))
    unconfirmed = _queued(queue, _ago(minutes=10), awaiting_confirm=True)
    client = client_for(users, 'staff')
    answer = client.get(API + 'health/').json()
    assert [t['id'] for t in answer['stuck']] == [stuck.pk]
    assert answer['ready'] == {queue: 0}
    assert young.uuid not in client.get(PREFIX + 'health/').content.decode()

    done = client.post(API + 'tasks/requeue/', {'ids': [stuck.pk, young.pk, unconfirmed.pk]},
                       content_type='application/json').json()
    assert (done['count'], done['skipped']) == (1, 2)
    assert [m.properties['message_id'] for m in broker.get_all(queue)] == [stuck.uuid]
    assert MessageLog.objects.get(pk=stuck.pk).status == MessageLog.PUBLISHED


def test_a_queued_row_is_not_stuck_while_its_queue_holds_messages(
        queue: str, users: dict[str, User], broker: Broker) -> None:
    old = _queued(queue, _ago(minutes=10))
    broker.publish_raw(queue, b'{}', {'message_id': 'someone-else'})
    wait_for(lambda: broker.message_count(queue) == 1, what='the message to be ready')
    client = client_for(users, 'staff')
    answer = client.get(API + 'health/').json()
    assert answer['stuck'] == [] and answer['ready'] == {queue: 1}
    done = client.post(API + 'tasks/requeue/', {'ids': [old.pk]},
                       content_type='application/json').json()
    assert done['count'] == 0 and 'only failed, orphaned and stuck' in done['reasons'][0]


def test_a_schedule_past_its_next_run_is_late(users: dict[str, User]) -> None:
    late = make_schedule('late-one')
    ScheduledTask.objects.filter(pk=late.pk).update(next_run_at=_ago(minutes=10))
    on_time = make_schedule('on-time')
    paused = make_schedule('paused', active=False)
    ScheduledTask.objects.filter(pk=paused.pk).update(next_run_at=_ago(minutes=10))
    client = client_for(users, 'staff')
    assert [s['id'] for s in client.get(API + 'health/').json()['late']] == [late.pk]
    page = client.get(PREFIX + 'health/').content.decode()
    assert 'late-one' in page and 'on-time' not in page and on_time.task_name == 'on-time'


def test_a_read_only_viewer_sees_the_health_page_without_requeue(
        users: dict[str, User]) -> None:
    WorkerHeartbeat.objects.create(worker='gone:1', seen_at=_ago(minutes=5))
    make_rows(1, status=MessageLog.IN_PROGRESS, worker='gone:1', start_time=_ago(minutes=5))
    page = client_for(users, 'viewer').get(PREFIX + 'health/').content.decode()
    assert 'gone:1' in page and 'Requeue selected' not in page


def test_ready_counts_are_asked_once_in_a_while_unless_fresh(
        queue: str, broker: Broker) -> None:
    from carrot.monitor import health

    assert health.ready_counts([queue, 'not-in-carrot-settings']) == {
        queue: 0, 'not-in-carrot-settings': None}
    broker.publish_raw(queue, b'{}', {'message_id': 'someone-else'})
    wait_for(lambda: broker.message_count(queue) == 1, what='the message to be ready')
    assert health.ready_counts([queue]) == {queue: 0}  # as asked a moment ago
    assert health.ready_counts([queue], fresh=True) == {queue: 1}
