"""The workloads: each starts from deleted queues and an emptied record, and returns figures.

Every system runs every workload it can with the same publisher shape: one caller (a loop,
as a management command or a web request publishes) and 50 callers (long-lived greenlets of
one gevent-patched process). See README.md for what each one measures.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import (
    BENCH_DIR,
    Adapter,
    BenchError,
    Publisher,
    Worker,
    delete_queues,
    ensure_no_consumers,
    queue_stats,
    run_logged,
    wait_until,
)

READY_TIMEOUT = 60.0
# After the ready line, let start-up stragglers (imports, first heartbeats) finish before
# sampling idle CPU or publishing.
SETTLE_SECONDS = 2.0
SLEEP_TASKS = 2000
SCHEDULES = 10_000
CONFIRM_WARMUP = 100
MANY_CALLERS = 50
TRANSACTION_TASKS = 10_000
# (h): the rate one caller publishes at for every system, within what carrot's one caller
# reaches on a slow hour (about 1,000 calls a second).
PACED_RATE = 300.0
_PACED_MEDIAN = re.compile(r'median ([\d,.]+) ')

Figures = dict[str, float]
# How much earlier than the publisher's last call returned all completions may be seen.
EARLY_COMPLETION_SECONDS = 1.0


@dataclass(frozen=True, kw_only=True)
class Config:
    #: No-op tasks per end-to-end flood, for each publisher shape.
    e2e_tasks: int
    #: No-op tasks in the backlog the worker drains.
    backlog_tasks: int
    #: Seconds of the idle-CPU sample.
    idle_seconds: float
    #: Sequential confirmed publishes in the one-caller latency workload.
    confirm_publishes: int
    #: No-op tasks one caller publishes at PACED_RATE in (h).
    paced_tasks: int
    #: Runs of every workload; medians are reported.
    repeat: int
    #: The systems measured (the pika reference runs besides).
    systems: tuple[str, ...]


def log(message: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {message}', flush=True)


def clean(adapter: Adapter) -> None:
    delete_queues(adapter.queues, adapter.exchanges)


def publisher_args(adapter: Adapter, mode: str, task: str, count: int, callers: int
                   ) -> list[str]:
    args = [adapter.name, mode, task, str(count)]
    if callers > 1:
        args += ['--concurrency', str(callers), '--gevent']
    return args


def _fresh(adapter: Adapter) -> None:
    clean(adapter)
    adapter.reset()
    ensure_no_consumers(adapter.queues[0])


def _publish(adapter: Adapter, task: str, count: int, callers: int, tag: str) -> dict[str, Any]:
    """Publish ``count`` tasks with no worker running; the publisher's timings."""
    publisher = Publisher(publisher_args(adapter, 'bulk', task, count, callers),
                          f'{adapter.name}-publish-{task}-{tag}')
    published = publisher.result(timeout=60 + count / 20)
    stats = queue_stats(adapter.queues[0])
    if stats is None or stats[0] != count:
        raise BenchError(f'{stats and stats[0]} messages in {adapter.queues[0]} before the '
                         f'worker starts, expected {count}')
    return published


def _watch(worker: Worker, publisher: Publisher | None = None) -> Callable[[], None]:
    """A poll-loop check that fails fast when the worker dies or the publisher errs."""
    state = {'checked': publisher is None}

    def watch() -> None:
        worker.check_alive()
        if not state['checked'] and publisher is not None and not publisher.running():
            state['checked'] = True
            publisher.result(timeout=1)  # raises BenchError if it failed
    return watch


def _flood(adapter: Adapter, worker: Worker, count: int, callers: int, tag: str,
           key: str = '', env: dict[str, str] | None = None) -> Figures:
    """Publish ``count`` no-op tasks to the running worker; time until the last is done.

    The figures are named after ``key`` (``e2e<callers>`` by default); ``env`` is the
    publisher's own environment (a variant of the publishing settings)."""
    key = key or f'e2e{callers}'
    adapter.reset()
    cpu_before = worker.cpu_seconds()
    publisher = Publisher(publisher_args(adapter, 'bulk', 'noop', count, callers),
                          f'{adapter.name}-publish-{key}-{tag}', env)
    try:
        done_at = wait_until(lambda: adapter.done_count() >= count, 60 + count / 50,
                             adapter.poll_interval, f'{count} no-op tasks',
                             on_tick=_watch(worker, publisher))
        cpu = worker.cpu_seconds() - cpu_before
        published = publisher.result(timeout=30)
    finally:
        publisher.kill()
    # The last task can run before its publish call returns (its message is written
    # first), and the publisher can be descheduled before it reads the clock: a little
    # early is that; much earlier, someone else's tasks were counted.
    if done_at < published['t1'] - EARLY_COMPLETION_SECONDS:
        raise BenchError(f'all {count} completions seen {published["t1"] - done_at:.2f} s '
                         'before publishing ended: another publisher or worker shares the '
                         'queue or the database')
    seconds = done_at - published['t0']
    variant = f' ({" ".join(f"{k}={v}" for k, v in env.items())})' if env else ''
    log(f'  {adapter.name}: {count} no-op tasks from {callers} caller(s){variant} in '
        f'{seconds:.2f}s = {count / seconds:,.0f}/s (publishing {published["rate"]:,.0f}/s), '
        f'worker CPU {1e6 * cpu / count:,.0f} ms per 1,000')
    return {f'{key}_rate': count / seconds, f'{key}_publish_rate': published['rate'],
            f'{key}_cpu': 1e6 * cpu / count}


def idle_cpu(adapter: Adapter, worker: Worker, seconds: float) -> float:
    """The worker's CPU in % of a core over ``seconds`` with nothing published to it."""
    before, started = worker.cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    idle = 100.0 * (worker.cpu_seconds() - before) / (time.monotonic() - started)
    if adapter.done_count():
        raise BenchError(f'{adapter.done_count()} tasks ran during the idle sample: '
                         'someone else publishes to the bench queue')
    return idle


def idle_and_end_to_end(adapter: Adapter, config: Config, tag: str) -> Figures:
    """On one worker: idle CPU and memory after start-up, then a no-op flood from one caller
    and one from 50 (and the adapter's one-caller variants), then memory again."""
    _fresh(adapter)
    with Worker(adapter.worker_spec(), f'{adapter.name}-worker-e2e-{tag}') as worker:
        worker.wait_ready(READY_TIMEOUT)
        time.sleep(SETTLE_SECONDS)
        idle = idle_cpu(adapter, worker, config.idle_seconds)
        rss_ready = worker.rss_mb()
        log(f'  {adapter.name}: idle CPU {idle:.2f}%, {rss_ready:.0f} MB resident')
        figures = {'idle_cpu': idle, 'rss_ready': rss_ready}
        for callers in (1, MANY_CALLERS):
            figures.update(_flood(adapter, worker, config.e2e_tasks, callers, tag))
        for key, env in adapter.one_caller_variants.items():
            figures.update(_flood(adapter, worker, config.e2e_tasks, 1, tag, key, env))
        figures['rss_after'] = worker.rss_mb()
    return figures


class FirstDone:
    """A poll-loop predicate, true once ``count`` tasks are done, that remembers the first
    poll to see any done: the wall-clock time, the worker's CPU seconds and the count then
    (the worker's start-up is before it)."""

    def __init__(self, adapter: Adapter, worker: Worker, count: int) -> None:
        self.adapter, self.worker, self.count = adapter, worker, count
        self.first: tuple[float, float, int] | None = None

    def __call__(self) -> bool:
        done = self.adapter.done_count()
        if self.first is None and done:
            self.first = (time.time(), self.worker.cpu_seconds(), done)
        return done >= self.count


def drain_noop(adapter: Adapter, config: Config, tag: str) -> Figures:
    """A backlog of no-op tasks published first; the worker's rate and CPU per task once it
    runs them, counted from the first completion seen (start-up excluded)."""
    _fresh(adapter)
    count = config.backlog_tasks
    _publish(adapter, 'noop', count, MANY_CALLERS, tag)
    with Worker(adapter.worker_spec(), f'{adapter.name}-worker-drain-noop-{tag}') as worker:
        seen = FirstDone(adapter, worker, count)
        done_at = wait_until(seen, 120 + count / 100, adapter.poll_interval,
                             'the no-op backlog to drain', on_tick=worker.check_alive)
        cpu = worker.cpu_seconds()
    assert seen.first is not None
    first_at, first_cpu, first_done = seen.first
    tasks = count - first_done
    if tasks < count / 2:
        raise BenchError(f'{first_done} of {count} tasks were done at the first look: '
                         'too few left to measure')
    rate = tasks / (done_at - first_at)
    per_thousand = 1e6 * (cpu - first_cpu) / tasks
    log(f'  {adapter.name}: drained {count:,} no-op tasks at {rate:,.0f}/s, worker CPU '
        f'{per_thousand:,.0f} ms per 1,000')
    return {'drain_rate': rate, 'drain_cpu': per_thousand}


def drain_sleeping(adapter: Adapter, tag: str) -> Figures:
    """2,000 tasks of 50 ms published first; how long concurrency 100 takes to run them, and
    the worker's CPU from the first poll that sees a task done to the last: whether the
    drain is bound by the worker's CPU rather than by waits."""
    _fresh(adapter)
    _publish(adapter, 'sleep50', SLEEP_TASKS, MANY_CALLERS, tag)
    with Worker(adapter.worker_spec(), f'{adapter.name}-worker-drain-{tag}') as worker:
        seen = FirstDone(adapter, worker, SLEEP_TASKS)
        done_at = wait_until(seen, 120, adapter.poll_interval, 'the backlog to drain',
                             on_tick=worker.check_alive)
        cpu_at_end, ended = worker.cpu_seconds(), time.time()
        spawned_at = worker.started_at
    figures = {'sleep_spawn': done_at - spawned_at}
    first = adapter.first_start()
    if first is not None:
        figures['sleep_first'] = done_at - first
    busy = ''
    if seen.first is not None and ended > seen.first[0]:
        began, cpu_at_first, _ = seen.first
        share = 100 * (cpu_at_end - cpu_at_first) / (ended - began)
        busy = f', worker CPU {share:.0f}% of a core from the first end to the last'
    log(f'  {adapter.name}: {SLEEP_TASKS} x 50 ms: {figures.get("sleep_first", float("nan")):.2f}'
        f's from the first start, {figures["sleep_spawn"]:.2f}s from the worker spawn{busy}')
    return figures


def confirmed_calls(adapter: Adapter, config: Config, tag: str) -> Figures:
    """Sequential confirmed publishes from one caller, no worker consuming."""
    _fresh(adapter)
    count = config.confirm_publishes
    args = [adapter.name, 'latency', 'noop', str(count), '--confirm', '--warmup',
            str(CONFIRM_WARMUP)]
    result = Publisher(args, f'{adapter.name}-publish-confirm-{tag}').result(
        timeout=60 + count / 20)
    log(f'  {adapter.name}: {result["rate"]:,.0f} confirmed publishes/s, '
        f'p50 {result["p50_ms"]:.2f} ms, p99 {result["p99_ms"]:.2f} ms')
    return {'confirm_rate': result['rate'], 'confirm_p50': result['p50_ms'],
            'confirm_p99': result['p99_ms']}


def one_transaction(adapter: Adapter, tag: str, together: bool = False) -> Figures:
    """carrot only: 10,000 publishes in one ``transaction.atomic()``, timed until the commit
    returns, when every message is confirmed; ``together``: inside ``publish_together()``
    (workload e')."""
    _fresh(adapter)
    args = [adapter.name, 'atomic', 'noop', str(TRANSACTION_TASKS)]
    if together:
        args.append('--together')
    kind = 'together' if together else 'atomic'
    result = Publisher(args, f'{adapter.name}-publish-{kind}-{tag}').result(timeout=300)
    stats = queue_stats(adapter.queues[0])
    if stats is None or stats[0] != TRANSACTION_TASKS:
        raise BenchError(f'{stats and stats[0]} messages queued after the commit, expected '
                         f'{TRANSACTION_TASKS}')
    log(f'  {adapter.name}: {TRANSACTION_TASKS:,} publishes in one transaction'
        f'{" with publish_together()" if together else ""} at {result["rate"]:,.0f}/s')
    return {f'{kind}_rate': result['rate']}


def idle_scheduler(adapter: Any, config: Config, tag: str) -> Figures:
    """carrot only: the service idle with SCHEDULES active schedules, none of them due."""
    _fresh(adapter)
    adapter.create_schedules(SCHEDULES)
    seconds = max(20.0, 2 * config.idle_seconds)  # statement counts reach PostgreSQL's
    try:                                           # statistics within a second or so
        with Worker(adapter.idle_scheduler_spec(), f'{adapter.name}-worker-sched-{tag}'
                    ) as worker:
            worker.wait_ready(READY_TIMEOUT)
            time.sleep(SETTLE_SECONDS)
            statements = adapter.database_statements()
            before, started = worker.cpu_seconds(), time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - started
            cpu = 100.0 * (worker.cpu_seconds() - before) / elapsed
            after = adapter.database_statements()
            rate = None if statements is None else (after - statements) / elapsed
            if adapter.done_count():
                raise BenchError(f'{adapter.done_count()} tasks ran: a schedule was due')
    finally:
        adapter.delete_schedules()
    figures = {'scheduler_cpu': cpu}
    if rate is not None:
        figures['scheduler_statements'] = rate
    log(f'  {adapter.name}: idle with {SCHEDULES:,} schedules: CPU {cpu:.2f}%'
        + (f', {rate:.1f} database statements/s' if rate is not None else ''))
    return figures


def paced(adapter: Adapter, config: Config, tag: str) -> Figures:
    """(h) One caller publishing at PACED_RATE for every system, so that each worker is fed
    the same rate: its CPU per 1,000 tasks, measured by ``paced.py`` in a process of its
    own (carrot untracked needs its settings before Django starts)."""
    per_thousand = paced_in_subprocess(adapter.name, PACED_RATE, config.paced_tasks)
    log(f'  {adapter.name}: {config.paced_tasks:,} tasks at {PACED_RATE:,.0f}/s, worker CPU '
        f'{per_thousand:,.0f} ms per 1,000')
    return {'paced_cpu': per_thousand}


def paced_in_subprocess(system: str, rate: float, tasks: int) -> float:
    """The worker CPU per 1,000 tasks that one ``paced.py --system`` run prints (its output
    is in LOG_DIR)."""
    argv = [sys.executable, str(BENCH_DIR / 'paced.py'), '--system', system, '--repeat', '1',
            '--rate', str(rate), '--tasks', str(tasks)]
    code, output = run_logged(argv, f'paced-{system}-{time.strftime("%H%M%S")}',
                              timeout=READY_TIMEOUT + 120 + tasks / rate * 2)
    lines = output.strip().splitlines()
    found = _PACED_MEDIAN.search(lines[-1]) if lines else None
    if code != 0 or found is None:
        raise BenchError(f'paced.py --system {system} failed (exit {code}): '
                         f'{output.strip()[-400:]}')
    return float(found.group(1).replace(',', ''))


def steps_for(adapter: Adapter, config: Config, tag: str) -> list[Callable[[], Figures]]:
    """The workloads ``adapter`` takes part in, in the order they run."""
    steps: list[Callable[[], Figures]] = []
    if adapter.has_worker:
        steps += [lambda: idle_and_end_to_end(adapter, config, tag),
                  lambda: drain_noop(adapter, config, tag),
                  lambda: drain_sleeping(adapter, tag),
                  lambda: paced(adapter, config, tag)]
    steps.append(lambda: confirmed_calls(adapter, config, tag))
    if getattr(adapter, 'create_schedules', None) is not None:
        steps += [lambda: one_transaction(adapter, tag),
                  lambda: one_transaction(adapter, tag, together=True),
                  lambda: idle_scheduler(adapter, config, tag)]
    return steps
