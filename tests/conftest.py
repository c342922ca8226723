"""Fixtures: a real RabbitMQ, a real database, and carrot workers as subprocesses.

Each test gets its own queue names (deleted afterwards) and an empty MessageLog table, so
tests neither see nor leave each other's messages.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MANAGE = ROOT / 'tests' / 'manage.py'
BROKER_URL = 'amqp://guest:guest@127.0.0.1:5672/'

_workdir = Path(tempfile.mkdtemp(prefix='carrot-tests-'))
os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tests.project.settings')
os.environ.setdefault('CARROT_TEST_SQLITE_PATH', str(_workdir / 'tests.sqlite3'))
if os.environ.get('CARROT_TEST_DB') == 'postgresql':
    os.environ.setdefault('CARROT_TEST_PG_NAME', f'carrot_tests_{os.getpid()}')

import django  # noqa: E402

django.setup()

from amqpstorm import AMQPChannelError, UriConnection  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, connections  # noqa: E402
from django.test.utils import override_settings  # noqa: E402

from carrot.broker import declare, get_publisher  # noqa: E402
from carrot.conf import get_settings  # noqa: E402
from carrot.models import MessageLog, QueueStats, ScheduledTask, WorkerHeartbeat  # noqa: E402


def _create_postgres_database() -> None:
    import psycopg

    name = os.environ['CARROT_TEST_PG_NAME']
    with psycopg.connect('host=127.0.0.1 user=postgres dbname=postgres',
                         autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS {name}')
        admin.execute(f'CREATE DATABASE {name}')


def _drop_postgres_database() -> None:
    import psycopg

    connections.close_all()
    with psycopg.connect('host=127.0.0.1 user=postgres dbname=postgres',
                         autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS {os.environ["CARROT_TEST_PG_NAME"]} '
                      f'WITH (FORCE)')


@pytest.fixture(scope='session', autouse=True)
def database() -> Iterator[str]:
    """The migrated test database, shared by this process and its workers."""
    vendor = os.environ.get('CARROT_TEST_DB', 'sqlite')
    if vendor == 'postgresql':
        _create_postgres_database()
    call_command('migrate', verbosity=0)
    yield vendor
    connections.close_all()
    if vendor == 'postgresql':
        _drop_postgres_database()
    shutil.rmtree(_workdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def empty_tables() -> Iterator[None]:
    for model in (MessageLog, ScheduledTask, WorkerHeartbeat, QueueStats):
        model.objects.all().delete()
    yield
    for model in (MessageLog, ScheduledTask, WorkerHeartbeat, QueueStats):
        model.objects.all().delete()
    connection.close()


def _confirmed() -> None:
    """Before looking at a queue: wait until RabbitMQ has confirmed what this process
    published (``publish_message`` returns before the confirm; see carrot.outbox)."""
    from carrot import outbox

    outbox.drain(10)


class Broker:
    """Direct access to the test RabbitMQ, for setting up and inspecting queues."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def connection(self) -> Any:
        return UriConnection(BROKER_URL)

    def queue_name(self, label: str = 'q') -> str:
        name = f'carrot_test_{label}_{uuid.uuid4().hex[:8]}'
        self.created.append(name)
        return name

    def counts(self, queue: str) -> tuple[int, int]:
        """(ready, unacknowledged) messages of ``queue``, from rabbitmqctl."""
        _confirmed()
        out = subprocess.run(
            ['rabbitmqctl', '-q', 'list_queues', 'name', 'messages_ready',
             'messages_unacknowledged'], capture_output=True, text=True, check=True,
        ).stdout
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == queue:
                return int(parts[1]), int(parts[2])
        raise AssertionError(f'queue {queue} does not exist')

    def message_count(self, queue: str) -> int:
        _confirmed()
        with self.connection() as conn, conn.channel() as channel:
            return int(channel.queue.declare(queue, passive=True)['message_count'])

    def exists(self, queue: str) -> bool:
        try:
            self.message_count(queue)
        except AMQPChannelError:
            return False
        return True

    def get_all(self, queue: str, confirmed: bool = True) -> list[Any]:
        """Take every message now in ``queue`` (acknowledged); ``confirmed`` first waits
        for the confirms of what this process published."""
        if confirmed:
            _confirmed()
        messages = []
        with self.connection() as conn, conn.channel() as channel:
            while (message := channel.basic.get(queue, no_ack=True, auto_decode=False)):
                messages.append(message)
        return messages

    def publish_raw(self, queue: str, body: bytes, properties: dict[str, Any]) -> None:
        with self.connection() as conn, conn.channel() as channel:
            channel.confirm_deliveries()
            channel.basic.publish(body, queue, properties=properties)

    def publish_unencodable(self, queue: str, body: bytes, properties: dict[str, Any],
                            swap: tuple[bytes, bytes] = (b'', b''),
                            cluster_id: str = '') -> None:
        """Publish what amqpstorm would refuse to send, as another client might.

        ``swap`` replaces bytes of the encoded header frame (a header value that is not
        UTF-8); ``cluster_id`` sets the deprecated property amqpstorm refuses.
        """
        from pamqp import body as content_body
        from pamqp import commands, frame, header

        encoded = commands.Basic.Properties(**properties)
        encoded.cluster_id = cluster_id  # after the constructor, which would refuse it
        with self.connection() as conn, conn.channel() as channel:
            number = channel.channel_id
            head = frame.marshal(header.ContentHeader(0, len(body), encoded), number)
            if swap[0]:
                assert len(swap[0]) == len(swap[1]) and swap[0] in head
                head = head.replace(*swap)
            conn._io.write_to_socket(
                frame.marshal(commands.Basic.Publish(routing_key=queue), number) + head
                + frame.marshal(content_body.ContentBody(body), number))
        # Closing the channel waited for RabbitMQ to take what was written before.

    def cleanup(self) -> None:
        with self.connection() as conn, conn.channel() as channel:
            for name in self.created:
                for queue in (name, f'{name}.dead'):
                    channel.queue.delete(queue)
                channel.exchange.delete(name)


@pytest.fixture
def broker() -> Iterator[Broker]:
    found = Broker()
    yield found
    get_publisher().close()
    found.cleanup()


def carrot_settings(queue: str, *, broken_module: bool = False,
                    **queue_options: Any) -> dict[str, Any]:
    """CARROT for one queue; ``broken_module`` also lists a task module that cannot import."""
    modules = ['tests.project.tasks'] + (['tests.project.broken_tasks'] if broken_module else [])
    return {
        'default_broker': BROKER_URL,
        'queues': [{'name': queue, **queue_options}],
        'task_modules': modules,
    }


@pytest.fixture
def queue(broker: Broker) -> Iterator[str]:
    """A fresh queue name, made the only queue of CARROT in this process."""
    name = broker.queue_name()
    with override_settings(CARROT=carrot_settings(name, concurrency=4)):
        with broker.connection() as conn, conn.channel() as channel:
            declare(channel, get_settings().queue(name))
        yield name


class Worker:
    """``manage.py carrot`` in a subprocess, its output collected as it runs."""

    def __init__(self, settings: dict[str, Any], logfile: Path, args: list[str],
                 env: dict[str, str] | None = None, command: list[str] | None = None) -> None:
        self.logfile = logfile
        environment = {**os.environ, 'CARROT_TEST_CARROT': json.dumps(settings), **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, *(command or [str(MANAGE), 'carrot']), '--logfile', str(logfile),
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors='replace',
            env=environment,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip('\n'))
            if 'carrot service ready' in line:
                self.ready.set()

    @property
    def output(self) -> str:
        return '\n'.join(self.lines)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 30) -> Worker:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._reader.join(2)
                raise AssertionError(f'worker did not become ready:\n{self.output}')
        return self

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, and the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 60) -> int:
        """The exit status, once the worker has exited by itself."""
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start workers; each is killed at the end of the test if still running."""
    started: list[Worker] = []

    def start(settings: dict[str, Any], *args: str, ready: bool = True,
              env: dict[str, str] | None = None, command: list[str] | None = None) -> Worker:
        worker = Worker(settings, tmp_path / f'carrot-{len(started)}.log',
                        ['--loglevel', 'INFO', *args], env, command)
        started.append(worker)
        return worker.wait_ready() if ready else worker

    yield start
    for worker in started:
        worker.kill()


def wait_for(condition: Callable[[], Any], timeout: float = 30, what: str = 'condition') -> Any:
    """Poll ``condition`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout} s waiting for {what}')
        time.sleep(0.1)
        connection.close()  # see the workers' commits, not a stale SQLite snapshot


def statuses() -> dict[str, int]:
    connection.close()
    counts: dict[str, int] = {}
    for status in MessageLog.objects.values_list('status', flat=True):
        counts[status] = counts.get(status, 0) + 1
    return counts
