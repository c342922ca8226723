"""``manage.py carrot`` as a subprocess against the real RabbitMQ and database."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gevent
import pytest
from gevent import events

from carrot import conf
from carrot.models import MessageLog
from carrot.utilities import publish_message
from carrot.worker.consumer import Consumer
from carrot.worker.service import Service, _Worker
from tests.conftest import MANAGE, Broker, Worker, carrot_settings, statuses, wait_for
from tests.project import tasks

StartWorker = Callable[..., Worker]


def test_monkey_patching_comes_before_django_ssl_and_the_database_driver(
        queue: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, '-W', 'error::gevent.monkey.MonkeyPatchWarning', str(MANAGE), 'carrot',
         '--testmode', '--logfile', str(tmp_path / 'carrot.log')],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, 'CARROT_TEST_CARROT': json.dumps(carrot_settings(queue))},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'monkey-patched socket, ssl, threading, time, select' in result.stdout
    assert 'nothing imported before patching' in result.stdout
    assert 'MonkeyPatchWarning' not in result.stderr


def test_the_patch_report_names_modules_imported_too_early() -> None:
    code = ('import ssl, sys; from carrot.worker import patch; '
            'print(patch.patch_all()); print(patch.patched_modules())')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).parent.parent)
    assert result.stdout.splitlines()[0] == "['ssl']"


def test_tasks_run_and_their_rows_say_how_they_ended(
        queue: str, start_worker: StartWorker) -> None:
    worker = start_worker(carrot_settings(queue, concurrency=4))
    added = publish_message(tasks.add, 2, 3)
    echoed = publish_message(tasks.echo, 1, k='v')
    text = publish_message(tasks.not_json)
    failed = publish_message(tasks.fail, 'no luck')
    wait_for(lambda: statuses() in ({'COMPLETED': 3, 'FAILED': 1},), what='four tasks')

    added.refresh_from_db()
    assert (added.status, added.output, added.attempts) == ('COMPLETED', '5', 1)
    assert added.completion_time is not None and added.failure_time is None
    echoed.refresh_from_db()
    assert json.loads(echoed.output or '') == {'args': [1], 'kwargs': {'k': 'v'}}
    text.refresh_from_db()
    assert (text.output or '').startswith('<object object at')
    failed.refresh_from_db()
    assert failed.status == 'FAILED'
    assert failed.exception == 'ValueError: no luck'
    assert 'raise ValueError(message)' in (failed.traceback or '')
    assert 'Task tests.project.tasks.fail failed' in (failed.log or '')
    assert failed.failure_time is not None
    assert worker.stop() == 0


def test_a_thousand_tasks_each_run_exactly_once(
        queue: str, start_worker: StartWorker, broker: Broker) -> None:
    for _ in range(1000):
        publish_message(tasks.noop)
    start_worker(carrot_settings(queue, concurrency=20, prefetch=5), '--loglevel', 'WARNING')
    wait_for(lambda: statuses() == {'COMPLETED': 1000}, timeout=120, what='1000 completions')
    assert set(MessageLog.objects.values_list('attempts', flat=True)) == {1}
    assert broker.counts(queue) == (0, 0)


def test_each_task_log_holds_only_its_own_lines_with_100_running_at_once(
        queue: str, start_worker: StartWorker) -> None:
    start_worker(carrot_settings(queue, concurrency=100))
    logs = [publish_message(tasks.log_lines, f'tag{i:03d}', count=5, pause=0.05)
            for i in range(100)]
    wait_for(lambda: statuses() == {'COMPLETED': 100}, timeout=60, what='100 completions')
    for log in logs:
        log.refresh_from_db()
        tag = json.loads(log.output or '')
        lines = re.findall(r'line \d of (tag\d+)', log.log or '')
        assert lines == [tag] * 5, log.log


def test_failure_callbacks_of_an_upstream_style_consumer_class_are_called(
        queue: str, start_worker: StartWorker, tmp_path: Path) -> None:
    calls = tmp_path / 'callbacks.txt'
    start_worker(carrot_settings(queue, consumer_class='tests.project.consumers.'
                                 'FailureRecordingConsumer'),
                 env={'CARROT_TEST_CALLBACK_FILE': str(calls)})
    failed = publish_message(tasks.fail, 'called back')
    publish_message(tasks.noop)
    wait_for(lambda: statuses() == {'FAILED': 1, 'COMPLETED': 1}, what='two tasks')
    assert calls.read_text().splitlines() == [
        f'{failed.uuid} tests.project.tasks.fail called back']


def test_a_message_from_another_producer_runs_and_gets_its_row(
        queue: str, start_worker: StartWorker, broker: Broker) -> None:
    start_worker(carrot_settings(queue))
    broker.publish_raw(queue, json.dumps({'args': [40, 2]}).encode(), {
        'message_id': 'from-elsewhere-1', 'headers': {'type': 'tests.project.tasks.add'},
        'delivery_mode': 2,
    })
    row = wait_for(lambda: MessageLog.objects.filter(uuid='from-elsewhere-1',
                                                     status='COMPLETED').first(),
                   what='the foreign message to complete')
    assert (row.task, row.output, row.queue) == ('tests.project.tasks.add', '42', queue)


def test_sigterm_lets_a_running_task_finish_then_exits_0(
        queue: str, start_worker: StartWorker) -> None:
    worker = start_worker(carrot_settings(queue))
    log = publish_message(tasks.sleep, 2)
    wait_for(lambda: MessageLog.objects.get(pk=log.pk).status == 'IN_PROGRESS', what='start')
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    log.refresh_from_db()
    assert log.status == 'COMPLETED'


def test_a_task_still_running_at_the_shutdown_timeout_is_handed_back(
        queue: str, start_worker: StartWorker, broker: Broker) -> None:
    worker = start_worker(carrot_settings(queue), '--shutdown-timeout', '1')
    log = publish_message(tasks.sleep, 30)
    wait_for(lambda: MessageLog.objects.get(pk=log.pk).status == 'IN_PROGRESS', what='start')
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    assert 'did not finish in time; handing them back' in worker.output
    wait_for(lambda: broker.counts(queue) == (1, 0), what='the message back in the queue')


def test_a_second_signal_stops_at_once(
        queue: str, start_worker: StartWorker, broker: Broker) -> None:
    worker = start_worker(carrot_settings(queue))
    log = publish_message(tasks.sleep, 30)
    wait_for(lambda: MessageLog.objects.get(pk=log.pk).status == 'IN_PROGRESS', what='start')
    worker.signal(signal.SIGINT)
    wait_for(lambda: 'Stopping: no new tasks' in worker.output, what='the first signal')
    worker.signal(signal.SIGINT)
    assert worker.wait(timeout=15) == 0
    assert 'Second stop signal' in worker.output
    wait_for(lambda: broker.counts(queue) == (1, 0), what='the message back in the queue')


def test_a_worker_killed_mid_task_leaves_the_message_to_run_again(
        queue: str, start_worker: StartWorker, tmp_path: Path) -> None:
    runs = tmp_path / 'runs.txt'
    first = start_worker(carrot_settings(queue))
    log = publish_message(tasks.touch, str(runs), seconds=3)
    wait_for(lambda: MessageLog.objects.get(pk=log.pk).status == 'IN_PROGRESS', what='start')
    first.kill()
    assert not runs.exists()
    second = start_worker(carrot_settings(queue))
    wait_for(lambda: MessageLog.objects.get(pk=log.pk).status == 'COMPLETED', what='rerun')
    log.refresh_from_db()
    assert log.attempts == 2
    assert runs.read_text().splitlines() == [str(second.pid)]


def test_an_unwritable_logfile_ends_the_command_naming_logfile(queue: str) -> None:
    result = subprocess.run(
        [sys.executable, str(MANAGE), 'carrot', '--logfile', '/proc/no/such/carrot.log'],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, 'CARROT_TEST_CARROT': json.dumps(carrot_settings(queue))},
    )
    assert result.returncode != 0
    assert '--logfile /proc/no/such/carrot.log cannot be written' in result.stderr


def test_testmode_fails_with_the_reason_when_the_broker_is_unreachable(
        broker: Broker, tmp_path: Path) -> None:
    settings = carrot_settings(broker.queue_name())
    settings['default_broker'] = 'amqp://guest:hunter2@127.0.0.1:1/'
    result = subprocess.run(
        [sys.executable, str(MANAGE), 'carrot', '--testmode', '--logfile',
         str(tmp_path / 'c.log')], capture_output=True, text=True, timeout=60,
        env={**os.environ, 'CARROT_TEST_CARROT': json.dumps(settings)},
    )
    assert result.returncode == 1
    assert 'Cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/' in result.stderr
    assert 'hunter2' not in result.stderr + result.stdout


def test_bad_settings_stop_the_service_at_start_naming_the_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(MANAGE), 'carrot', '--logfile', str(tmp_path / 'c.log')],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, 'CARROT_TEST_CARROT': json.dumps(
            {'queues': [{'name': 'q', 'concurrency': 0}]})},
    )
    assert result.returncode == 1
    assert "CARROT['queues'][0] ('q')['concurrency'] must be a whole number" in result.stderr


def test_carrot_send_publishes_a_task(queue: str, broker: Broker) -> None:
    result = subprocess.run(
        [sys.executable, str(MANAGE), 'carrot_send', 'tests.project.tasks.echo', '1', 'two',
         '--kwargs', '{"k": [1]}', '--queue', queue], capture_output=True, text=True,
        timeout=60, env={**os.environ, 'CARROT_TEST_CARROT': json.dumps(carrot_settings(queue))},
    )
    assert result.returncode == 0, result.stderr
    [sent] = broker.get_all(queue)
    assert json.loads(sent.body) == {'args': [1, 'two'], 'kwargs': {'k': [1]}}
    assert MessageLog.objects.get().task == 'tests.project.tasks.echo'


def test_carrot_send_refuses_an_unregistered_task(queue: str) -> None:
    result = subprocess.run(
        [sys.executable, str(MANAGE), 'carrot_send', 'os.system', 'ls'], capture_output=True,
        text=True, timeout=60,
        env={**os.environ, 'CARROT_TEST_CARROT': json.dumps(carrot_settings(queue))},
    )
    assert result.returncode == 1
    assert 'is not a registered task' in result.stderr


def test_a_graceful_stop_acknowledges_everything_that_ran(
        queue: str, start_worker: StartWorker) -> None:
    for _ in range(300):
        publish_message(tasks.sleep, 0.01)
    # Task ends take half a second to commit, so some are still pending at the stop.
    slow_worker = Path(__file__).parent / 'project' / 'slow_recorder_worker.py'
    first = start_worker(carrot_settings(queue, concurrency=20, prefetch=2),
                         command=[str(slow_worker)])
    wait_for(lambda: statuses().get('COMPLETED', 0) >= 60, what='some completions')
    assert first.stop() == 0
    second = start_worker(carrot_settings(queue, concurrency=20))
    wait_for(lambda: statuses() == {'COMPLETED': 300}, timeout=60, what='all 300')
    assert second.stop() == 0
    # Nothing that completed under the first worker came back unacknowledged.
    assert 'was completed before' not in second.output
    assert set(MessageLog.objects.values_list('attempts', flat=True)) == {1}


def test_a_task_calling_sys_exit_fails_and_the_worker_goes_on(
        queue: str, start_worker: StartWorker) -> None:
    worker = start_worker(carrot_settings(queue, concurrency=1))
    exited = publish_message(tasks.exit_process)
    after = publish_message(tasks.add, 1, 2)
    wait_for(lambda: statuses() == {'FAILED': 1, 'COMPLETED': 1}, what='both tasks')
    exited.refresh_from_db()
    assert exited.exception == 'SystemExit: 3'
    assert MessageLog.objects.get(pk=after.pk).output == '3'
    assert worker.process.poll() is None


def test_a_negative_shutdown_timeout_is_refused(queue: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(MANAGE), 'carrot', '--shutdown-timeout', '-5', '--logfile',
         str(tmp_path / 'c.log')], capture_output=True, text=True, timeout=60,
        env={**os.environ, 'CARROT_TEST_CARROT': json.dumps(carrot_settings(queue))},
    )
    assert result.returncode != 0
    assert "'-5' is not a number of seconds" in result.stderr


def test_the_blocked_hub_warning_names_what_blocked_it(caplog: pytest.LogCaptureFixture) -> None:
    """gevent's event names a greenlet; the warning says which task or part of carrot it is."""
    settings = conf.parse(None)
    service = Service(settings, shutdown_timeout=1.0)
    consumer = Consumer(settings.queues[0].broker, 'default', logging.getLogger('carrot'),
                        'default-1')
    consumer_greenlet = gevent.spawn(gevent.sleep, 60)
    service.workers.append(_Worker(consumer, consumer_greenlet))
    service.scheduler = gevent.spawn(gevent.sleep, 60)
    service.recorder.start()
    stranger = gevent.spawn(gevent.sleep, 60)
    try:
        def warning_for(greenlet: gevent.Greenlet) -> str:
            caplog.clear()
            service._on_hub_event(events.EventLoopBlocked(greenlet, 1.0, []))
            [record] = caplog.records
            assert record.levelno == logging.WARNING
            return record.getMessage()

        consumer.current_task = 'tests.project.tasks.compute'
        assert 'by task tests.project.tasks.compute (in consumer default-1): while' in warning_for(
            consumer_greenlet)
        consumer.current_task = None
        assert 'by consumer default-1:' in warning_for(consumer_greenlet)
        assert 'by the scheduler:' in warning_for(service.scheduler)
        assert 'by the recorder, writing task rows' in warning_for(service.recorder.greenlet)
        assert 'by a greenlet:' in warning_for(stranger)
    finally:
        service.recorder.stop(timeout=5)
        gevent.killall([consumer_greenlet, service.scheduler, stranger])
