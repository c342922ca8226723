"""Shared plumbing for the benchmark harness: workers, publishers, RabbitMQ, Redis, stats.

Everything here runs in the harness process (no gevent): it starts workers and publishers
as subprocesses in their own process groups so that they can always be killed as a whole.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

BENCH_DIR = Path(__file__).resolve().parent
PEERS_DIR = BENCH_DIR / 'peers'
AMQP_URL = 'amqp://guest:guest@127.0.0.1:5672/'
REDIS_HOST = '127.0.0.1'
REDIS_PORT = 6379
LOG_DIR = Path(os.environ.get('BENCH_LOG_DIR', '/tmp/carrot-bench-logs'))


# pika logs every refused connection at length; a failed clean-up is reported by us instead.
logging.getLogger('pika').setLevel(logging.CRITICAL)


class BenchError(RuntimeError):
    """A measurement could not be completed (timeout, worker died, ...)."""


# --------------------------------------------------------------------------- adapters


@dataclass
class WorkerSpec:
    """How to start one system's worker and how to know that it is ready."""

    argv: list[str]
    cwd: Path
    ready_pattern: str
    env: dict[str, str] = field(default_factory=dict)


class Adapter:
    """One system under test. Harness-side methods only; publishing lives in publisher.py.

    Subclasses keep their heavy imports (celery, dramatiq, django) inside methods so the
    harness can import every adapter without pulling every framework in.
    """

    name: str = ''
    #: Queues (and their satellites) the system creates; deleted before and after a run.
    queues: tuple[str, ...] = ()
    exchanges: tuple[str, ...] = ()
    #: A human description of the publishing method, copied into the report.
    publish_description: str = ''
    #: What (c) measures for this system, e.g. how confirms are switched on.
    confirm_description: str = ''
    worker_description: str = ''
    has_worker: bool = True
    #: Extra one-caller floods of (a): metric key prefix -> the publisher's environment.
    one_caller_variants: dict[str, dict[str, str]] = {}

    def prepare(self) -> None:
        """Once per harness run, before any measurement."""

    def reset(self) -> None:
        """Before each measurement: forget completed-task bookkeeping."""
        reset_probe(self.name)

    def worker_spec(self) -> WorkerSpec:
        raise NotImplementedError

    def done_count(self) -> int:
        """How many tasks have completed since the last reset()."""
        return probe_done(self.name)

    def first_start(self) -> float | None:
        """Wall-clock time at which the first sleep50 task started, if the tasks record it."""
        return probe_first_start(self.name)

    #: How often to poll done_count(): cheap Redis GETs can go faster than SQL counts.
    poll_interval: float = 0.005

    def close(self) -> None:
        """At the end of the harness run."""


# --------------------------------------------------------------------------- redis probe
# Peers (and carrot's sleep50, for the first-start stamp) report progress through Redis: one
# INCR per finished task is far cheaper than anything else they could do observably.

_redis_client: Any = None


def redis_client() -> Any:
    global _redis_client
    if _redis_client is None:
        import redis

        _redis_client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    return _redis_client


def probe_keys(system: str) -> tuple[str, str]:
    return f'bench:{system}:done', f'bench:{system}:first_start'


def reset_probe(system: str) -> None:
    redis_client().delete(*probe_keys(system))


def probe_done(system: str) -> int:
    value = redis_client().get(probe_keys(system)[0])
    return int(value or 0)


def probe_first_start(system: str) -> float | None:
    value = redis_client().get(probe_keys(system)[1])
    return float(value) if value is not None else None


# --------------------------------------------------------------------------- rabbitmq


def _rabbit_channel() -> Any:
    import pika

    params = pika.URLParameters(AMQP_URL)
    params.blocked_connection_timeout = 10
    params.socket_timeout = 10
    connection = pika.BlockingConnection(params)
    return connection, connection.channel()


def delete_queues(queues: Sequence[str], exchanges: Sequence[str] = ()) -> None:
    """Delete queues/exchanges so every measurement starts with nothing left over.

    A fresh connection per call: the harness is idle for long stretches and a kept
    connection would need heartbeats.
    """
    import pika

    connection, channel = _rabbit_channel()
    try:
        for name in queues:
            try:
                channel.queue_delete(queue=name)
            except pika.exceptions.ChannelClosedByBroker:
                channel = connection.channel()
        for name in exchanges:
            try:
                channel.exchange_delete(exchange=name)
            except pika.exceptions.ChannelClosedByBroker:
                channel = connection.channel()
    finally:
        connection.close()


def queue_stats(queue: str) -> tuple[int, int] | None:
    """(ready messages, consumers) of ``queue``, or None when it does not exist."""
    import pika

    connection, channel = _rabbit_channel()
    try:
        method = channel.queue_declare(queue=queue, passive=True).method
        return int(method.message_count), int(method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return None
    finally:
        if connection.is_open:
            connection.close()


def ensure_no_consumers(queue: str) -> None:
    """Fail when something other than our worker consumes ``queue``.

    The machine is shared: a stray worker on a bench queue would run our tasks and make
    every figure of that workload wrong, so it is an error, not a warning.
    """
    stats = queue_stats(queue)
    if stats is not None and stats[1]:
        raise BenchError(f'{stats[1]} foreign consumer(s) on {queue}: another worker is running '
                         '(`rabbitmqctl list_consumers`); stop it and run again')


# --------------------------------------------------------------------------- processes

_live_processes: list[subprocess.Popen[bytes]] = []


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group, then SIGKILL whatever is still there after ``grace`` s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # The leader may be gone while forked children (dramatiq's worker) are not.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def kill_all_started() -> None:
    """Last-resort cleanup: every subprocess this harness started, by its own group id."""
    while _live_processes:
        _kill_group(_live_processes.pop(), grace=2)


def _spawn(
    argv: Sequence[str], cwd: Path, env: dict[str, str], stdout: Any
) -> subprocess.Popen[bytes]:
    inherited = dict(os.environ)
    # The harness sets this for carrot's ORM; Celery would see it and try to load Django.
    # carrot's manage.py and publisher set it again for themselves.
    inherited.pop('DJANGO_SETTINGS_MODULE', None)
    full_env = {**inherited, 'PYTHONUNBUFFERED': '1', **env}
    proc = subprocess.Popen(
        list(argv), cwd=cwd, env=full_env, stdout=stdout, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,  # own group: killpg reaches all
    )
    _live_processes.append(proc)
    return proc


def run_logged(argv: Sequence[str], log_name: str, timeout: float) -> tuple[int, str]:
    """Run a harness command (another benchmark script) in a process group of its own, its
    output in ``LOG_DIR/<log_name>.log``; return its exit code (-1 when ``timeout`` ran
    out) and its output. At ``timeout``, or when the harness itself is stopped, it is sent
    SIGTERM, which lets it stop what it started, then SIGKILL."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    path = LOG_DIR / f'{log_name}.log'
    with path.open('wb') as out:
        proc = _spawn(argv, BENCH_DIR, {}, out)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = -1
        finally:
            if proc in _live_processes:
                _live_processes.remove(proc)
            if proc.poll() is None:
                _kill_group(proc, grace=15)
    return code, path.read_text(errors='replace')


class Worker:
    """A worker subprocess whose output is copied to a log file and scanned for readiness."""

    def __init__(self, spec: WorkerSpec, log_name: str) -> None:
        self.spec = spec
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f'{log_name}.log'
        self.ready_event = threading.Event()
        self.ready_at: float | None = None  # wall clock
        self.started_at: float = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._pattern = re.compile(spec.ready_pattern)

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.started_at = time.time()
        self._proc = _spawn(self.spec.argv, self.spec.cwd, self.spec.env, subprocess.PIPE)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        # Drain the pipe continuously: a worker blocked on a full pipe would skew results.
        assert self._proc is not None and self._proc.stdout is not None
        with open(self.log_path, 'wb') as log:
            for line in self._proc.stdout:
                log.write(line)
                log.flush()
                text = line.decode(errors='replace')
                if not self.ready_event.is_set() and self._pattern.search(text):
                    self.ready_at = time.time()
                    self.ready_event.set()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def check_alive(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise BenchError(f'worker exited early; see {self.log_path}:\n{self.log_tail()}')

    def wait_ready(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while not self.ready_event.wait(0.05):
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f'worker not ready after {timeout:.0f}s; see {self.log_path}')
        assert self.ready_at is not None
        return self.ready_at

    def cpu_seconds(self) -> float:
        """user+system CPU time of the worker and all of its descendants."""
        total = 0.0
        try:
            root = psutil.Process(self.pid)
            for proc in [root, *root.children(recursive=True)]:
                try:
                    times = proc.cpu_times()
                    total += times.user + times.system
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
        return total

    def rss_mb(self) -> float:
        """Resident memory of the worker and all of its descendants, in MB."""
        total = 0
        try:
            root = psutil.Process(self.pid)
            for proc in [root, *root.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
        return total / 1e6

    def process_count(self) -> int:
        try:
            return 1 + len(psutil.Process(self.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            return 0

    def stop(self) -> None:
        if self._proc is not None:
            _kill_group(self._proc, grace=15)
            if self._proc in _live_processes:
                _live_processes.remove(self._proc)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return '\n'.join(self.log_path.read_text(errors='replace').splitlines()[-lines:])
        except OSError:
            return ''


class Publisher:
    """A publisher.py subprocess; its last stdout line is a JSON result."""

    def __init__(
        self, args: Sequence[str], log_name: str, env: dict[str, str] | None = None
    ) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f'{log_name}.log'
        argv = [sys.executable, str(BENCH_DIR / 'publisher.py'), *args]
        self._log = open(self.log_path, 'wb')
        self._proc = _spawn(argv, BENCH_DIR, env or {}, self._log)

    def running(self) -> bool:
        return self._proc.poll() is None

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f'publisher still running after {timeout:.0f}s; see {self.log_path}')
        finally:
            self.kill()
        text = self.log_path.read_text(errors='replace')
        for line in reversed(text.splitlines()):
            if line.startswith('{'):
                result: dict[str, Any] = json.loads(line)
                if 'error' in result:
                    raise BenchError(f'publisher failed: {result["error"]} (see {self.log_path})')
                return result
        tail = '\n'.join(text.splitlines()[-15:])
        raise BenchError(f'publisher gave no result (exit {self._proc.returncode}):\n{tail}')

    def kill(self) -> None:
        _kill_group(self._proc, grace=2)
        if self._proc in _live_processes:
            _live_processes.remove(self._proc)
        self._log.close()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float,
               what: str, on_tick: Callable[[], None] | None = None) -> float:
    """Poll ``predicate`` until true; return the wall-clock time it was first seen true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.time()
        if on_tick is not None:
            on_tick()
        if time.monotonic() > deadline:
            raise BenchError(f'timed out after {timeout:.0f}s waiting for {what}')
        time.sleep(interval)


# --------------------------------------------------------------------------- stats


def median(values: Sequence[float]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; enough for a few thousand samples."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(pct / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]
