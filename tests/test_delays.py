"""Delayed tasks (countdown, eta) and the task options' bad input: against the real RabbitMQ
and database, the worker as a subprocess."""

from __future__ import annotations

import datetime
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.db import DatabaseError, connections, transaction
from django.test import override_settings
from django.utils import timezone
from gevent.event import Event

from carrot import lifecycle, options
from carrot.conf import get_settings, parse
from carrot.exceptions import CarrotConfigException
from carrot.models import MessageLog
from carrot.utilities import publish_message
from carrot.worker import rounds
from tests.conftest import Broker, Worker, carrot_settings, wait_for
from tests.project import tasks

StartWorker = Callable[..., Worker]


def _runs(path: Path) -> list[float]:
    return [float(line) for line in path.read_text().splitlines()] if path.exists() else []


def _restart_rabbitmq() -> None:
    subprocess.run(['rabbitmqctl', '-q', 'stop_app'], check=True, timeout=120)
    subprocess.run(['rabbitmqctl', '-q', 'start_app'], check=True, timeout=120)
    subprocess.run(['rabbitmqctl', '-q', 'await_startup'], check=True, timeout=120)


def test_a_countdown_runs_no_earlier_and_outlives_a_worker_and_a_broker_restart(
        queue: str, start_worker: StartWorker, broker: Broker, tmp_path: Path) -> None:
    runs = tmp_path / 'runs'
    first = start_worker(carrot_settings(queue))
    published = time.time()
    log = publish_message(tasks.runs_at, str(runs), countdown=5)
    assert log.status == 'DELAYED' and log.run_after is not None
    assert abs((log.run_after - timezone.now()).total_seconds() - 5) < 1
    assert broker.message_count(queue) == 0  # held in the database, not in RabbitMQ
    first.stop()
    _restart_rabbitmq()
    start_worker(carrot_settings(queue))
    row = wait_for(lambda: MessageLog.objects.filter(pk=log.pk, status='COMPLETED').first(),
                   timeout=60, what='the delayed task')
    [ran] = _runs(runs)
    assert ran >= published + 5
    assert row.attempts == 1


def test_a_week_long_eta_waits_in_the_database_not_in_a_consumer(
        queue: str, start_worker: StartWorker, broker: Broker, tmp_path: Path) -> None:
    start_worker(carrot_settings(queue))
    eta = timezone.now() + datetime.timedelta(days=7)
    log = publish_message(tasks.runs_at, str(tmp_path / 'runs'), eta=eta)
    soon = publish_message(tasks.runs_at, str(tmp_path / 'soon'), countdown=1)
    wait_for(lambda: MessageLog.objects.filter(pk=soon.pk, status='COMPLETED').exists(),
             timeout=30, what='the task due in a second')
    # The releaser has run at least twice since: the week-long one is still only a row.
    time.sleep(2.5)
    row = MessageLog.objects.get(pk=log.pk)
    assert (row.status, row.run_after) == ('DELAYED', eta)
    assert broker.counts(queue) == (0, 0)  # nothing ready, nothing unacknowledged
    assert not (tmp_path / 'runs').exists()


def test_delayed_tasks_keep_their_order_within_a_second_or_two(
        queue: str, start_worker: StartWorker, tmp_path: Path) -> None:
    start_worker(carrot_settings(queue, concurrency=1))
    runs = tmp_path / 'runs'
    now = timezone.now()
    logs = [publish_message(tasks.record_run, str(runs), str(seconds),
                            eta=now + datetime.timedelta(seconds=seconds))
            for seconds in (5, 1, 3)]
    wait_for(lambda: MessageLog.objects.filter(status='COMPLETED').count() == 3, timeout=60,
             what='three delayed tasks')
    assert runs.read_text().split() == ['1', '3', '5']
    for log in logs:
        row = MessageLog.objects.get(pk=log.pk)
        assert row.completion_time is not None and row.run_after is not None
        assert 0 <= (row.completion_time - row.run_after).total_seconds() < 3


def test_an_eta_in_the_past_runs_now(queue: str, broker: Broker) -> None:
    log = publish_message(tasks.noop, eta=timezone.now() - datetime.timedelta(hours=1))
    assert log.status == 'PUBLISHED' and log.run_after is None
    assert broker.message_count(queue) == 1


def test_a_delayed_publish_in_a_rolled_back_transaction_leaves_nothing(queue: str) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        publish_message(tasks.noop, countdown=1)
        raise RuntimeError('rolled back')
    assert not MessageLog.objects.exists()


BAD_CALLS: list[tuple[dict[str, Any], str]] = [
    ({'max_retries': '3'}, 'max_retries must be a whole number of 0 or more'),
    ({'max_retries': -1}, 'max_retries must be a whole number of 0 or more'),
    ({'countdown': -1}, 'countdown must be a number of seconds of 0 or more'),
    ({'countdown': 1, 'eta': timezone.now()}, 'Pass countdown or eta, not both'),
    ({'eta': datetime.datetime(2030, 1, 1)}, 'is a naive datetime, and USE_TZ is on'),
    ({'eta': '2030-01-01'}, 'eta must be a datetime, not str'),
    ({'time_limit': 3600}, "below RabbitMQ's consumer_timeout"),
    ({'time_limit': 0}, 'time_limit must be a number of seconds above 0'),
    ({'expires': 0}, 'expires must be a positive number of seconds'),
    ({'retry_backoff': float('nan')}, 'retry_backoff must be a positive number'),
]


@pytest.mark.parametrize(('given', 'error'), BAD_CALLS)
def test_a_bad_option_or_delay_is_refused_at_the_call_and_nothing_is_written_or_sent(
        queue: str, broker: Broker, given: dict[str, Any], error: str) -> None:
    with pytest.raises(CarrotConfigException, match=error):
        publish_message(tasks.noop, **given)
    assert not MessageLog.objects.exists()
    assert broker.message_count(queue) == 0


@pytest.mark.parametrize(('entry', 'error'), [
    ({'max_retries': 1.5}, r"CARROT\['queues'\]\[0\] \('q'\): max_retries must be a whole"),
    ({'time_limit': 1800}, "below RabbitMQ's consumer_timeout"),
    ({'retry_for': ['ValueError']}, 'must list dotted paths of exception classes'),
    ({'retry_when': 3}, 'must be the dotted path of a function'),
])
def test_a_bad_option_in_the_settings_names_the_setting(entry: dict[str, Any],
                                                        error: str) -> None:
    with pytest.raises(CarrotConfigException, match=error):
        parse({'queues': [{'name': 'q', **entry}]})


def test_unknown_option_names_are_refused_everywhere() -> None:
    with pytest.raises(CarrotConfigException, match=r"CARROT\['task_defaults'\]: unknown "
                                                    r"option\(s\) max_retry"):
        parse({'task_defaults': {'max_retry': 3}})
    with pytest.raises(CarrotConfigException, match='@task_options: unknown option'):
        options.task_options(retries=3)
    with pytest.raises(CarrotConfigException, match=r"consumer_timeout'\] must be a positive"):
        parse({'consumer_timeout': 0})


def test_a_raised_consumer_timeout_allows_a_longer_time_limit() -> None:
    settings = parse({'consumer_timeout': 7200, 'task_defaults': {'time_limit': 3600}})
    assert settings.task_defaults == {'time_limit': 3600}


def test_a_dotted_path_that_does_not_import_is_refused_when_the_task_is_published(
        queue: str) -> None:
    with override_settings(CARROT=carrot_settings(queue, retry_for=['no.such.Error'])):
        with pytest.raises(CarrotConfigException, match="retry_for names 'no.such.Error', "
                                                        'which does not import'):
            publish_message(tasks.noop)
    assert not MessageLog.objects.exists()


def test_the_call_wins_then_the_task_then_the_queue_then_the_defaults(queue: str) -> None:
    settings = {**carrot_settings(queue, max_retries=5, time_limit=50, expires=500),
                'task_defaults': {'max_retries': 9, 'time_limit': 90, 'expires': 900,
                                  'retry_backoff': 7, 'dont_retry_for': ['builtins.KeyError']}}
    with override_settings(CARROT=settings):
        plain = options.resolve(tasks.noop, queue)
        assert (plain.max_retries, plain.time_limit, plain.expires, plain.retry_backoff) == (
            5, 50, 500, 7)
        assert plain.dont_retry_for == (KeyError,)
        decorated = options.resolve(tasks.fails_for_good, queue)  # max_retries=3 on the task
        assert (decorated.max_retries, decorated.time_limit) == (3, 50)
        called = options.resolve(tasks.fails_for_good, queue, {'max_retries': 1})
        assert (called.max_retries, called.time_limit) == (1, 50)
    assert options.resolve(tasks.noop, get_settings().queues[0].name).max_retries == 0


def test_the_backoff_doubles_with_jitter_between_half_and_all_of_it_up_to_its_maximum(
        ) -> None:
    policy = options.TaskOptions(max_retries=10, retry_backoff=1, retry_backoff_max=10)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (9, 10)]:
        delays = [policy.backoff(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays), (attempt, ceiling)
        assert max(delays) - min(delays) > ceiling / 10  # jittered, not fixed


def test_a_system_check_names_option_paths_that_do_not_import(queue: str) -> None:
    from django.core import checks

    settings = {**carrot_settings(queue, on_retries_exhausted='no.such.hook'),
                'task_defaults': {'retry_for': ['builtins.ValueError', 'builtins.NoSuchError']}}
    with override_settings(CARROT=settings):
        found = [m for m in checks.run_checks() if m.id == 'carrot.E011']
    assert [m.msg for m in found] == [
        "CARROT['task_defaults']: The task option retry_for names 'builtins.NoSuchError', "
        'which does not import: Module "builtins" does not define a "NoSuchError" '
        'attribute/class',
        f"CARROT['queues'] ({queue!r}): The task option on_retries_exhausted names "
        "'no.such.hook', which does not import: No module named 'no'"]


def test_a_lowered_consumer_timeout_needs_a_default_time_limit_below_it() -> None:
    with pytest.raises(CarrotConfigException, match=r"CARROT\['consumer_timeout'\] is 900 s, "
                                                    r'not above the default time limit'):
        parse({'consumer_timeout': 900})
    assert parse({'consumer_timeout': 900, 'task_defaults': {'time_limit': 600}})


def test_a_call_time_limit_allowed_by_a_raised_consumer_timeout_runs_on_the_worker(
        broker: Broker, start_worker: StartWorker) -> None:
    queue = broker.queue_name()
    settings = {**carrot_settings(queue), 'consumer_timeout': 7200}
    with override_settings(CARROT=settings):
        start_worker(settings)
        log = publish_message(tasks.add, 1, 2, time_limit=3600)
        row = wait_for(lambda: MessageLog.objects.filter(
            pk=log.pk, status__in=('COMPLETED', 'FAILED')).first(), what='its end')
    assert (row.status, row.output) == ('COMPLETED', '3')


def test_the_releaser_keeps_its_connection_between_rounds_and_drops_it_when_one_fails(
        queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a second, reconnecting cost more than the round; a failed round reconnects."""
    database = connections[lifecycle.database()]
    releaser = rounds.releaser(Event())
    delayed = publish_message(tasks.add, 1, 2, queue=queue, countdown=3600)
    releaser._round()
    assert database.connection is not None
    kept = database.connection
    releaser._round()
    assert database.connection is kept
    assert MessageLog.objects.get(pk=delayed.pk).status == 'DELAYED'  # not due: not sent

    def broken() -> int:
        raise DatabaseError('the database went away')

    monkeypatch.setattr(releaser, 'work', broken)
    releaser._round()
    assert releaser.failures == 1 and database.connection is None


def test_rounds_far_apart_close_their_connection(queue: str) -> None:
    database = connections[lifecycle.database()]
    heartbeat = rounds.heartbeat(Event(), [queue], scheduler=False)
    heartbeat._round()
    assert database.connection is None
