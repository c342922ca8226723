"""carrot as a backend of Django's task framework: tasks written with ``@task`` and nothing
carrot-specific, enqueued here and run by a real worker (a subprocess) on RabbitMQ.

Runs on every Django line CI tests: 5.2 with the django-tasks backport, 6.0 and 6.1.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, connections, transaction
from django.test import override_settings
from django.utils import timezone

from carrot import registry
from carrot._django_tasks import (
    InvalidTask,
    TaskResultDoesNotExist,
    TaskResultStatus,
    task_backends,
)
from carrot.broker import declare
from carrot.conf import get_settings
from carrot.exceptions import BrokerUnavailable, TaskNotRegistered
from carrot.models import MessageLog
from carrot.task_backend import CarrotBackend
from carrot.task_results import REFUSED_CLASS_PATH, exception_class_path
from carrot.utilities import publish_message
from tests.conftest import Broker, Worker, carrot_settings, wait_for
from tests.project import tasks as carrot_tasks
from tests.taskapp import tasks

StartWorker = Callable[..., Worker]


def finished(result_id: str, timeout: float = 30) -> Any:
    """The result once its task has finished."""
    backend = task_backends['default']

    def done() -> Any:
        connection.close()
        result = backend.get_result(result_id)
        return result if result.is_finished else None

    return wait_for(done, timeout=timeout, what=f'task {result_id} to finish')


@pytest.fixture
def signals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file the task framework's signals are written to, here and in the worker."""
    path = tmp_path / 'signals.jsonl'
    monkeypatch.setenv('CARROT_TEST_SIGNALS', str(path))
    return path


def outside() -> None:
    """A module-level function of a module carrot runs no task from."""


def make_task(func: Callable[..., Any], backend: str = 'default', **fields: Any) -> Any:
    """A task of ``backend``'s task class, as ``@task`` builds it (Django 6.0 gives its
    fields no defaults)."""
    fields = {'priority': 0, 'queue_name': 'default', 'run_after': None, **fields}
    return task_backends[backend].task_class(func=func, backend=backend, **fields)


def sent(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_task_runs_and_its_result_says_successful_with_the_return_value(
        queue: str, start_worker: StartWorker) -> None:
    worker = start_worker(carrot_settings(queue))
    enqueued = tasks.add.enqueue(2, 3)
    assert enqueued.status == TaskResultStatus.READY
    assert enqueued.args == [2, 3] and enqueued.backend == 'default'
    row = MessageLog.objects.get(uuid=enqueued.id)  # carrot's message id, and its row
    assert row.task == 'tests.taskapp.tasks.add' and row.queue == queue

    result = finished(enqueued.id)
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 5
    assert result.errors == []
    assert result.worker_ids == [f'{socket.gethostname()}:{worker.pid}']
    assert result.attempts == 1
    assert result.enqueued_at <= result.started_at <= result.finished_at
    assert result.last_attempted_at == result.started_at
    enqueued.refresh()  # Django's refresh() reads it through get_result()
    assert enqueued.status == TaskResultStatus.SUCCESSFUL and enqueued.return_value == 5


def test_a_raising_task_says_failed_with_its_class_path_and_traceback(
        queue: str, start_worker: StartWorker) -> None:
    start_worker(carrot_settings(queue))
    result = finished(tasks.fails.enqueue('no such thing').id)
    assert result.status == TaskResultStatus.FAILED
    [error] = result.errors
    assert error.exception_class_path == 'builtins.LookupError'
    assert error.exception_class is LookupError
    assert 'raise LookupError(message)' in error.traceback
    assert error.traceback.rstrip().endswith('LookupError: no such thing')
    with pytest.raises(ValueError, match='Task failed'):
        result.return_value  # noqa: B018  (the property raises)

    declined = finished(tasks.declines.enqueue().id)
    [error] = declined.errors
    assert error.exception_class_path == 'tests.taskapp.tasks.Declined'
    assert error.exception_class is tasks.Declined
    row = MessageLog.objects.get(uuid=declined.id)
    assert row.exception == 'tests.taskapp.tasks.Declined: card refused'


def test_a_return_value_json_cannot_hold_fails_the_task_saying_so(
        queue: str, start_worker: StartWorker) -> None:
    start_worker(carrot_settings(queue))
    result = finished(tasks.returns_a_set.enqueue().id)
    assert result.status == TaskResultStatus.FAILED
    row = MessageLog.objects.get(uuid=result.id)
    assert 'returned a set, which JSON cannot hold' in row.exception


def test_run_after_three_seconds_ahead_runs_no_earlier(
        queue: str, start_worker: StartWorker, tmp_path: Path) -> None:
    start_worker(carrot_settings(queue))
    path = str(tmp_path / 'runs.jsonl')
    asked = time.time()
    later = tasks.record.using(run_after=timezone.now() + datetime.timedelta(seconds=3))
    result = later.enqueue(path, 'later')
    assert result.status == TaskResultStatus.READY
    assert MessageLog.objects.get(uuid=result.id).status == 'DELAYED'
    assert finished(result.id).return_value == 'later'
    [run] = tasks.lines(path)
    assert run['at'] >= asked + 3


def test_priorities_order_a_backlog(broker: Broker, start_worker: StartWorker,
                                    tmp_path: Path) -> None:
    name = broker.queue_name('priority')
    settings = carrot_settings(name, queue_arguments={'x-max-priority': 10})
    path = str(tmp_path / 'runs.jsonl')
    with override_settings(CARROT=settings):
        with broker.connection() as conn, conn.channel() as channel:
            declare(channel, get_settings().queue(name))
        priorities = [-100, 0, 100, -50, 50, 10]
        ids = [tasks.record.using(priority=p).enqueue(path, str(p)).id for p in priorities]
        carrot_priorities = dict(MessageLog.objects.filter(uuid__in=ids)
                                 .values_list('uuid', 'priority'))
        assert [carrot_priorities[i] for i in ids] == [0, 5, 10, 2, 8, 6]  # −100..100 → 0..10
        assert broker.message_count(name) == len(priorities)
        start_worker(settings)  # concurrency 1, prefetch 1: one at a time, highest first
        wait_for(lambda: len(tasks.lines(path)) == len(priorities), what='the backlog')
    assert [int(run['label']) for run in tasks.lines(path)] == [100, 50, 10, 0, -50, -100]


def test_the_signals_fire_in_the_publisher_and_in_the_worker(
        queue: str, start_worker: StartWorker, signals: Path) -> None:
    worker = start_worker(carrot_settings(queue), env={'CARROT_TEST_SIGNALS': str(signals)})
    ok = tasks.add.enqueue(1, 1).id
    bad = tasks.fails.enqueue('boom').id
    finished(ok)
    finished(bad)
    wait_for(lambda: sum(s['signal'] == 'finished' for s in sent(signals)) == 2,
             what='task_finished twice')
    by_kind = {(s['signal'], s['id']): s for s in sent(signals)}
    for result_id in (ok, bad):
        assert by_kind['enqueued', result_id]['pid'] == os.getpid()
        assert by_kind['enqueued', result_id]['status'] == 'READY'
        assert by_kind['started', result_id]['pid'] == worker.pid
        assert by_kind['started', result_id]['status'] == 'RUNNING'
        assert by_kind['finished', result_id]['pid'] == worker.pid
    assert by_kind['finished', ok]['status'] == 'SUCCESSFUL'
    assert by_kind['finished', ok]['exc_info'] is None
    # Sent from inside the except block, as Django's own receiver logs it.
    assert by_kind['finished', bad]['status'] == 'FAILED'
    assert by_kind['finished', bad]['exc_info'] == 'LookupError'
    assert {s['sender'] for s in sent(signals)} == {'carrot.task_backend.CarrotBackend'}


def test_aenqueue_and_aget_result(queue: str, start_worker: StartWorker) -> None:
    start_worker(carrot_settings(queue))

    async def enqueue() -> Any:
        return await tasks.add.aenqueue(20, 22)

    async def read(result_id: str) -> Any:
        try:
            return await tasks.add.aget_result(result_id)
        finally:
            # sync_to_async ran it in asgiref's thread: close that thread's connection,
            # which would otherwise count against PostgreSQL's limit in later tests.
            await sync_to_async(connections.close_all, thread_sensitive=True)()

    result_id = asyncio.run(enqueue()).id
    finished(result_id)
    result = asyncio.run(read(result_id))
    assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == 42


@pytest.mark.parametrize('name', ['flaky', 'flaky_by_task'])
def test_takes_context_sees_the_attempt_number_after_a_retry(
        name: str, queue: str, start_worker: StartWorker, tmp_path: Path,
        signals: Path) -> None:
    if not hasattr(tasks, name):
        pytest.skip('Django 6.0 refuses extra @task arguments: options via @task_options')
    task = getattr(tasks, name)
    worker = start_worker(carrot_settings(queue), env={'CARROT_TEST_SIGNALS': str(signals)})
    attempts = tmp_path / 'attempts'
    result = finished(task.enqueue(str(attempts), 1).id)
    assert attempts.read_text().split() == ['1', '2']
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == {'attempt': 2, 'id': result.id}
    assert [e.exception_class_path for e in result.errors] == ['builtins.ConnectionError']
    assert result.worker_ids == [f'{socket.gethostname()}:{worker.pid}'] * 2
    # Each attempt starts; only the last one finishes the task.
    wait_for(lambda: any(s['signal'] == 'finished' for s in sent(signals)),
             what='task_finished')
    ours = [s for s in sent(signals) if s['id'] == result.id]
    # The publisher's enqueued and the worker's signals go to one file from two processes:
    # the worker may start the task before the publisher has written its line.
    assert [(s['signal'], s['status']) for s in ours if s['pid'] != worker.pid] == [
        ('enqueued', 'READY')]
    assert [(s['signal'], s['status']) for s in ours if s['pid'] == worker.pid] == [
        ('started', 'RUNNING'), ('started', 'RUNNING'), ('finished', 'SUCCESSFUL')]

    exhausted = finished(task.enqueue(str(tmp_path / 'more'), 5).id)  # max_retries=2
    assert exhausted.status == TaskResultStatus.FAILED
    assert (tmp_path / 'more').read_text().split() == ['1', '2', '3']
    assert len(exhausted.errors) == 3 and exhausted.attempts == 3


# -- what is refused -----------------------------------------------------------------------

def test_each_validate_task_refusal_says_what_to_fix() -> None:
    def local() -> None:
        pass

    async def coroutine() -> None:
        pass

    def no_context(path: str) -> None:
        pass

    with pytest.raises(InvalidTask, match='not defined at the top level of a module'):
        make_task(local)
    coroutine.__qualname__ = 'coroutine'  # as if at module level: refused for being async
    with pytest.raises(InvalidTask, match='async function: carrot runs tasks in gevent'):
        make_task(coroutine)
    no_context.__qualname__ = 'no_context'
    with pytest.raises(InvalidTask, match='its first argument must be called "context"'):
        make_task(no_context, takes_context=True)
    with pytest.raises(InvalidTask, match='priority must be a whole number from -100 to 100'):
        tasks.add.using(priority=101)
    with pytest.raises(InvalidTask, match='needs a priority queue.*x-max-priority'):
        tasks.add.using(priority=5)  # CARROT's default queue has no priorities
    with pytest.raises(InvalidTask, match='naive datetime, and USE_TZ is on'):
        tasks.add.using(run_after=datetime.datetime.now())
    with pytest.raises(InvalidTask, match="Unknown queue 'nowhere'"):
        tasks.add.using(queue_name='nowhere')
    with pytest.raises(InvalidTask, match="Unknown queue 'nowhere'"):
        tasks.add.using(queue_name='nowhere', priority=5)  # the queue first: it has no settings
    with pytest.raises(InvalidTask, match="worker would refuse it: tests.test_task_backend.outside "
                                          "is not a registered task"):
        make_task(outside)
    with pytest.raises(InvalidTask, match='max_retries must be a whole number'):
        make_task(tasks.add.func, max_retries=-1)
    with override_settings(CARROT={**carrot_settings('default'),
                                   'queues': [{'name': 'default', 'tracked': False}]}):
        with pytest.raises(InvalidTask, match='untracked'):
            tasks.add.using(queue_name='default')
    only = CarrotBackend('only', {'QUEUES': ['mail']})
    with pytest.raises(InvalidTask, match="not one of this backend's QUEUES \\(mail\\)"):
        only.validate_task(tasks.add)


def test_the_backend_check_names_what_is_wrong() -> None:
    backend = CarrotBackend('odd', {'QUEUES': ['nowhere'], 'OPTIONS': {'RETRIES': 3}})
    found = {message.id: message.msg for message in backend.check()}
    assert 'unknown key(s) RETRIES' in found['carrot.E010']
    assert "Unknown queue 'nowhere'" in found['carrot.E011']
    assert CarrotBackend('fine', {}).check() == []


def test_a_result_id_that_does_not_exist() -> None:
    backend = task_backends['default']
    with pytest.raises(TaskResultDoesNotExist, match="no MessageLog row has this uuid"):
        backend.get_result('no-such-id')


def test_the_result_of_a_plain_carrot_task_is_not_a_framework_result(
        queue: str, start_worker: StartWorker) -> None:
    start_worker(carrot_settings(queue))
    log = publish_message(carrot_tasks.add, 1, 2)
    with pytest.raises(TaskResultDoesNotExist, match='a plain carrot task'):
        task_backends['default'].get_result(log.uuid)


def _row(**fields: Any) -> MessageLog:
    """A MessageLog row of tests.taskapp.tasks.add, as the worker leaves it (not saved)."""
    return MessageLog(uuid='row-1', task='tests.taskapp.tasks.add', task_args='[1, 2]',
                      content='{}', publish_time=timezone.now(), **fields)


def test_result_of_reads_a_running_a_delayed_a_requeued_and_a_failed_row() -> None:
    from carrot.task_results import result_of

    first = timezone.now() - datetime.timedelta(seconds=5)
    later = first + datetime.timedelta(seconds=3)
    attempt_1 = {'attempt': 1, 'exception': 'ValueError: no', 'traceback': 'tb 1',
                 'worker': 'host:1', 'started_at': first.isoformat()}
    attempt_2 = {'attempt': 2, 'exception': 'ConnectionError: gone', 'traceback': 'tb 2',
                 'worker': 'host:2', 'started_at': later.isoformat()}

    running = result_of(_row(status='IN_PROGRESS', attempts=1, worker='host:1',
                             start_time=first), 'default')
    assert running.status == TaskResultStatus.RUNNING
    assert (running.worker_ids, running.started_at, running.last_attempted_at,
            running.finished_at, running.errors) == (['host:1'], first, first, None, [])

    delayed = result_of(_row(status='DELAYED', attempts=1, worker='host:1', start_time=first,
                             errors=[attempt_1]), 'default')
    assert delayed.status == TaskResultStatus.READY and delayed.finished_at is None
    assert delayed.worker_ids == ['host:1'] and delayed.attempts == 1
    assert [(e.exception_class_path, e.traceback) for e in delayed.errors] == [
        ('builtins.ValueError', 'tb 1')]

    requeued = result_of(_row(status='PUBLISHED', attempts=2, errors=[
        attempt_1, attempt_2, {'requeued_at': later.isoformat()}]), 'default')
    assert requeued.status == TaskResultStatus.READY
    assert (requeued.errors, requeued.worker_ids) == ([], [])  # counted afresh

    failed = result_of(_row(status='FAILED', attempts=2, worker='host:2', start_time=later,
                            failure_time=later, completion_time=first,
                            exception=attempt_2['exception'], traceback='tb 2',
                            errors=[attempt_1, attempt_2]), 'default')
    assert failed.status == TaskResultStatus.FAILED
    assert failed.worker_ids == ['host:1', 'host:2'] and failed.attempts == 2
    assert [e.exception_class_path for e in failed.errors] == [
        'builtins.ValueError', 'builtins.ConnectionError']
    assert (failed.started_at, failed.last_attempted_at, failed.finished_at) == (
        first, later, later)  # the failure's time, whatever else the row holds


def test_only_task_objects_run_from_an_apps_tasks_module() -> None:
    assert registry.resolve('tests.taskapp.tasks.add').task is tasks.add
    for name, reason in [('plain_function', 'only tasks of Django\'s task framework'),
                         ('json', 'only tasks of Django\'s task framework'),
                         ('TaskContext', 'only tasks of Django\'s task framework'),
                         ('_flaky', 'underscore')]:
        with pytest.raises(TaskNotRegistered, match=reason):
            registry.resolve(f'tests.taskapp.tasks.{name}')
    with pytest.raises(TaskNotRegistered, match='nor an installed app'):
        registry.resolve('tests.project.guarded_tasks.anything')
    # A @task object works with carrot's own call too.
    assert registry.task_path(tasks.add) == 'tests.taskapp.tasks.add'


def test_an_apps_tasks_module_that_does_not_import_is_a_start_up_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from carrot import checks

    found = registry.app_task_modules()
    assert 'tests.taskapp.tasks' in found  # found among the installed apps
    monkeypatch.setattr(registry, 'app_task_modules',
                        lambda: found | {'tests.project.broken_tasks'})
    [warning] = [m for m in checks.check_settings() if m.id == 'carrot.W004']
    assert 'tests.project.broken_tasks, the tasks module of an installed app, does not ' \
           'import' in warning.msg


def test_a_task_object_is_published_with_carrots_own_call(
        queue: str, start_worker: StartWorker) -> None:
    start_worker(carrot_settings(queue))
    log = publish_message(tasks.add, 4, 5)
    assert finished(log.uuid).return_value == 9


def test_the_worker_refuses_a_plain_function_of_an_apps_tasks_module(
        queue: str, start_worker: StartWorker, broker: Broker) -> None:
    start_worker(carrot_settings(queue))
    broker.publish_raw(queue, b'{"args": [], "kwargs": {}}', {
        'message_id': 'plain-one', 'headers': {'type': 'tests.taskapp.tasks.plain_function'},
        'content_type': 'application/json'})
    row = wait_for(lambda: MessageLog.objects.filter(uuid='plain-one', status='FAILED').first(),
                   what='the refusal')
    assert 'only tasks of Django\'s task framework (@task) run' in row.exception
    assert exception_class_path(row.exception) == 'carrot.exceptions.CarrotError'
    # the row is written first, then the delivery is dead-lettered: wait for the broker
    wait_for(lambda: broker.message_count(f'{queue}.dead') == 1, what='the dead letter')


@pytest.mark.parametrize(('text', 'path'), [
    ('ValueError: boom', 'builtins.ValueError'),
    ('tests.taskapp.tasks.Declined: no thanks', 'tests.taskapp.tasks.Declined'),
    ('somewhere.unloaded.Failure: out of reach', 'somewhere.unloaded.Failure'),
    ('TimeLimitExceeded: past 5 s', 'carrot.exceptions.TimeLimitExceeded'),  # before 0010
    # Refusals, whose reasons start with the task's path or another word:
    ('tests.taskapp.tasks.gone: tests.taskapp.tasks has no function called gone.',
     REFUSED_CLASS_PATH),
    ('tests.taskapp.tasks.Gone: tests.taskapp.tasks has no function called Gone.',
     REFUSED_CLASS_PATH),
    ("'x' is not a dotted path such as \"myapp.tasks.send_mail\".", REFUSED_CLASS_PATH),
    ('Nothing: a bare name that is no exception', REFUSED_CLASS_PATH),
    ('', REFUSED_CLASS_PATH),
    (None, REFUSED_CLASS_PATH),
])
def test_exception_class_path_reads_the_class_and_never_a_task_path(
        text: str | None, path: str) -> None:
    assert exception_class_path(text) == path


# -- enqueue on commit -----------------------------------------------------------------------

def test_inside_a_transaction_the_task_is_sent_on_commit_and_not_on_rollback(
        queue: str, broker: Broker) -> None:
    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic():
        dropped = tasks.add.enqueue(1, 2).id
        raise Rollback
    assert not MessageLog.objects.filter(uuid=dropped).exists()
    with transaction.atomic():
        kept = tasks.add.enqueue(1, 2).id
        assert broker.message_count(queue) == 0
    wait_for(lambda: broker.message_count(queue) == 1, what='the message sent on commit')
    assert MessageLog.objects.filter(uuid=kept).exists()


@pytest.mark.skipif(connection.vendor == 'sqlite',
                    reason='SQLite has one writer: a second connection waits for the first')
def test_enqueue_on_commit_off_sends_at_once_even_if_the_transaction_rolls_back(
        queue: str, broker: Broker, start_worker: StartWorker) -> None:
    start_worker(carrot_settings(queue))
    apart = {'default': {'BACKEND': 'carrot.task_backend.CarrotBackend',
                         'OPTIONS': {'ENQUEUE_ON_COMMIT': False}}}

    class Rollback(Exception):
        pass

    with override_settings(TASKS=apart):
        with pytest.raises(Rollback), transaction.atomic():
            result_id = tasks.add.using().enqueue(3, 4).id
            raise Rollback
        assert finished(result_id).return_value == 7


# -- creating the backend ----------------------------------------------------------------------

@pytest.fixture
def listener() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP port that accepts connections and counts them (it speaks no AMQP)."""
    server = socket.create_server(('127.0.0.1', 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()
    for sock in accepted:
        sock.close()


def test_creating_the_backend_opens_no_connection(
        listener: tuple[int, list[socket.socket]]) -> None:
    port, accepted = listener
    with override_settings(CARROT={**carrot_settings('default'),
                                   'default_broker': f'amqp://guest:guest@127.0.0.1:{port}/'},
                           TASKS={'other': {'BACKEND': 'carrot.task_backend.CarrotBackend'}}):
        started = time.monotonic()
        backend = task_backends['other']
        make_task(tasks.add.func, 'other')  # validated, as @task does
        assert isinstance(backend, CarrotBackend) and backend.check() == []
        assert time.monotonic() - started < 1
        time.sleep(0.2)
        assert accepted == []


def test_with_the_broker_at_a_closed_port_the_first_enqueue_fails_clearly() -> None:
    closed = socket.create_server(('127.0.0.1', 0))
    port = closed.getsockname()[1]
    closed.close()
    with override_settings(CARROT={**carrot_settings('default'),
                                   'default_broker': f'amqp://guest:guest@127.0.0.1:{port}/'},
                           TASKS={'other': {'BACKEND': 'carrot.task_backend.CarrotBackend'}}):
        task = make_task(tasks.add.func, 'other')
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            task.enqueue(1, 2)
        assert time.monotonic() - started < 30
    assert not MessageLog.objects.exists()  # no row left lying
