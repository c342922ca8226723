"""PostgreSQL away for 30 s while tasks run: nothing acknowledged without its end, nothing
run twice, no dead letter without its row.

The worker reaches PostgreSQL through a proxy of the test's (tests/proxy.py), which drops
every connection and refuses new ones for the outage; the machine's server stays up.
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test.utils import override_settings

from carrot.utilities import publish_message
from tests.conftest import BROKER_URL, Broker, Worker, statuses, wait_for
from tests.project import tasks
from tests.proxy import Proxy

pytestmark = pytest.mark.slow

StartWorker = Callable[..., Worker]

OUTAGE_SECONDS = 30.0
TASKS = 40
REFUSED = 3
HANDED_BACK = 'handed back to the queue'


@pytest.fixture
def proxy(database: str) -> Iterator[Proxy]:
    if database != 'postgresql':
        pytest.skip('cuts a proxy between the worker and PostgreSQL; SQLite has no connection '
                    'to cut')
    found = Proxy(('127.0.0.1', 5432))
    yield found
    found.close()


def _settings(queue: str, side: str | None = None, concurrency: int = 10) -> dict[str, Any]:
    """CARROT for ``queue``, and ``side``, a queue of its own for the refused messages: its
    consumers are free to take them while the main queue's wait for the database."""
    queues: list[dict[str, Any]] = [{'name': queue, 'concurrency': concurrency}]
    if side is not None:
        queues.append({'name': side, 'concurrency': 2})
    return {'default_broker': BROKER_URL, 'queues': queues,
            'task_modules': ['tests.project.tasks']}


def _runs(path: Path) -> collections.Counter[str]:
    return collections.Counter(path.read_text().split() if path.exists() else [])


def test_a_30_s_database_outage_while_tasks_run_loses_nothing_and_runs_nothing_twice(
        broker: Broker, start_worker: StartWorker, proxy: Proxy, tmp_path: Path) -> None:
    queue, side = broker.queue_name(), broker.queue_name('refused')
    settings = _settings(queue, side)
    runs = tmp_path / 'runs'
    with override_settings(CARROT=settings):
        worker = start_worker(settings, env={'CARROT_TEST_PG_PORT': str(proxy.port)})
        for n in range(TASKS):
            publish_message(tasks.record_run, str(runs), f'task-{n}', 0.3 + (n % 3) * 0.1)
        wait_for(lambda: statuses().get('COMPLETED', 0) >= 5, what='the first completions')

        proxy.cut()
        cut_at = time.monotonic()
        for n in range(REFUSED):
            broker.publish_raw(side, b'not json', {
                'message_id': f'refused-{n}', 'delivery_mode': 2,
                'headers': {'type': 'tests.project.tasks.noop'}})
        time.sleep(OUTAGE_SECONDS - 5)
        # Read while the worker cannot write: whatever left the queue has its end recorded.
        ready, unacknowledged = broker.counts(queue)
        completed = statuses().get('COMPLETED', 0)
        assert ready + unacknowledged + completed == TASKS
        assert broker.counts(f'{side}.dead') == (0, 0)  # no dead letter without its row
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - cut_at)))
        proxy.restore()
        back_at = time.monotonic()

        wait_for(lambda: statuses() == {'COMPLETED': TASKS, 'FAILED': REFUSED}, timeout=120,
                 what=f'every task to end, in:\n{worker.output}')
        caught_up = time.monotonic() - back_at
        wait_for(lambda: broker.counts(queue) == (0, 0), what='the queue to be empty')
        wait_for(lambda: broker.counts(side) == (0, 0), what='the side queue to be empty')
        wait_for(lambda: broker.counts(f'{side}.dead') == (REFUSED, 0), what='the dead letters')

    counted = _runs(runs)
    duplicates = sum(count - 1 for count in counted.values())
    requeues = worker.output.count(HANDED_BACK)
    retries = len(re.findall('Writing task records failed|FAILED row of message .* could '
                             'not be written', worker.output))
    print(f'\noutage {OUTAGE_SECONDS:.0f} s: {requeues} requeues, {duplicates} duplicate runs, '
          f'{retries} retry warnings, every task ended {caught_up:.1f} s after the database '
          f'came back')
    assert worker.process.poll() is None, worker.output
    assert set(counted) == {f'task-{n}' for n in range(TASKS)}
    assert duplicates == 0, counted
    assert requeues == 0, worker.output
    assert sorted(dead.properties['message_id'] for dead in broker.get_all(f'{side}.dead')) == \
        [f'refused-{n}' for n in range(REFUSED)]
    assert worker.stop() == 0


def test_a_stop_during_an_outage_ends_within_its_timeouts_and_hands_the_messages_back(
        broker: Broker, start_worker: StartWorker, proxy: Proxy, tmp_path: Path) -> None:
    """A consumer waiting for its start stops at once; an end not written goes back."""
    queue = broker.queue_name()
    settings = _settings(queue, concurrency=2)
    runs = tmp_path / 'runs'
    with override_settings(CARROT=settings):
        worker = start_worker(settings, '--shutdown-timeout', '2',
                              env={'CARROT_TEST_PG_PORT': str(proxy.port)})
        proxy.cut()
        publish_message(tasks.record_run, str(runs), 'ran', 0.5)  # runs; its end waits
        wait_for(lambda: 'Writing task records failed' in worker.output, what='a failed write')
        publish_message(tasks.record_run, str(runs), 'waits')  # waits for its start
        wait_for(lambda: broker.counts(queue) == (0, 2), what='both messages delivered')
        wait_for(lambda: _runs(runs) == {'ran': 1}, what='the first task to run')
        stopping_at = time.monotonic()
        code = worker.stop(timeout=120)
        took = time.monotonic() - stopping_at
    print(f'\nstop during an outage: {took:.1f} s')
    # The shutdown timeout for the consumers, 5 s for their kill, 30 s for the recorder.
    assert code == 0, worker.output
    assert took < 2 + 5 + 30 + 10, took
    assert broker.counts(queue) == (2, 0)
    assert _runs(runs) == {'ran': 1}  # the waiting one never ran
    assert 'the service is stopping and its start is not recorded yet' in worker.output
