"""Benchmark carrot against Celery and Dramatiq on the same RabbitMQ.

    python benchmarks/run.py [--quick] [--only carrot|celery|dramatiq] [--repeat 3]

Workloads (see README.md): (a) no-op tasks end to end, (b) backlog drain of 2,000 x 50 ms
tasks with concurrency 100, (c) confirmed publishes from one caller (raw pika as reference),
(d) CPU of an idle worker with 100 consumers, (e) carrot only: CPU and database statements of
an idle service whose scheduler holds 10,000 schedules, none due. Prints a table of medians
and writes benchmarks/last-report.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _bootstrap() -> None:
    """Re-run in .venv-bench with the peers installed, once RabbitMQ, Redis and PostgreSQL answer.

    So that ``python3 benchmarks/run.py`` is the one command, on a fresh machine too.
    """
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests.bootstrap import ensure_postgresql, ensure_rabbitmq, ensure_redis, venv_python

    folder = Path(os.environ.get('CARROT_BENCH_VENV', root / '.venv-bench'))
    python = venv_python([root / 'benchmarks' / 'requirements.txt'], folder=folder)
    ensure_rabbitmq()
    if not ensure_redis():
        sys.exit('Redis is not answering on 127.0.0.1:6379 (the peers count completions there).')
    if not ensure_postgresql():
        sys.exit('PostgreSQL is not answering on 127.0.0.1:5432 (carrot records tasks there; '
                 'BENCH_DB=sqlite uses a SQLite file instead).')
    if Path(sys.prefix).resolve() != folder.resolve():
        os.execv(str(python), [str(python), __file__, *sys.argv[1:]])


if __name__ == '__main__' and not os.environ.get('CARROT_BENCH_NO_BOOTSTRAP'):
    _bootstrap()

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

from common import (  # noqa: E402
    BENCH_DIR,
    LOG_DIR,
    Adapter,
    BenchError,
    Publisher,
    Worker,
    delete_queues,
    ensure_no_consumers,
    kill_all_started,
    median,
    queue_stats,
    redis_client,
    wait_until,
)

SYSTEMS = ('carrot', 'celery', 'dramatiq')
PEERS = ('celery', 'dramatiq')
REPORT_PATH = BENCH_DIR / 'last-report.md'
READY_TIMEOUT = 60.0
# After the ready line, let start-up stragglers (imports, first heartbeats) finish before
# sampling idle CPU or publishing.
SETTLE_SECONDS = 2.0
DRAIN_TASKS = 2000
SCHEDULES = 10_000
CONFIRM_WARMUP = 100
# The machine is shared: another session may restart RabbitMQ under us. One retry per
# workload keeps such a blip from costing a whole data point.
ATTEMPTS = 2


@dataclass(frozen=True)
class Config:
    e2e_tasks: int
    idle_seconds: float
    confirm_publishes: int
    repeat: int
    systems: tuple[str, ...]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int = 0


METRICS = (
    Metric('e2e_rate', '(a) no-op tasks end to end', 'tasks/s', True),
    Metric('e2e_seconds', '(a) time to publish and run all no-op tasks', 's', False, 2),
    Metric('e2e_publish_rate', '(a) publishing phase alone', 'msg/s', True),
    Metric('drain_first', '(b) drain 2,000 x 50 ms: first task start -> last done', 's', False, 2),
    Metric('drain_ready', '(b) drain: worker ready line -> last done', 's', False, 2),
    Metric('drain_spawn', '(b) drain: worker process start -> last done', 's', False, 2),
    Metric('backlog_publish_rate', '(b) publishing the backlog, one process (see set-up)',
           'msg/s', True),
    Metric('confirm_rate', '(c) confirmed publishes, one caller', 'msg/s', True),
    Metric('confirm_p50', '(c) one confirmed publish call, median', 'ms', False, 2),
    Metric('confirm_p99', '(c) one confirmed publish call, p99', 'ms', False, 2),
    Metric('idle_cpu', '(d) idle worker CPU, 100 consumers', '% of a core', False, 2),
    Metric('scheduler_cpu', f'(e) idle service CPU, scheduler with {SCHEDULES:,} schedules',
           '% of a core', False, 2),
    Metric('scheduler_statements', '(e) its database statements', 'per s', False, 1),
)

Results = dict[str, dict[str, list[float]]]  # system -> metric -> one value per repeat


def log(message: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {message}', flush=True)


def load_adapter(name: str) -> Adapter:
    adapter: Adapter = importlib.import_module(f'{name}_adapter').ADAPTER
    return adapter


def clean(adapter: Adapter) -> None:
    delete_queues(adapter.queues, adapter.exchanges)


def publisher_args(adapter: Adapter, mode: str, task: str, count: int, *extra: str) -> list[str]:
    args = [adapter.name, mode, task, str(count), *extra]
    if adapter.publish_concurrency > 1 and mode == 'bulk':
        args += ['--concurrency', str(adapter.publish_concurrency), '--gevent']
    return args


def wait_for_done(adapter: Adapter, count: int, timeout: float, what: str,
                  watch: Callable[[], None]) -> float:
    """Poll the system's completed count until ``count``; the wall time it was seen."""
    return wait_until(lambda: adapter.done_count() >= count, timeout, adapter.poll_interval,
                      what, on_tick=watch)


def publisher_watch(worker: Worker, publisher: Publisher) -> Callable[[], None]:
    """A poll-loop check that fails fast when the worker dies or the publisher errs."""
    state = {'checked': False}

    def watch() -> None:
        worker.check_alive()
        if not state['checked'] and not publisher.running():
            state['checked'] = True
            publisher.result(timeout=1)  # raises BenchError if it failed
    return watch


# --------------------------------------------------------------------------- workloads


def idle_cpu_percent(worker: Worker, seconds: float) -> float:
    before = worker.cpu_seconds()
    started = time.monotonic()
    time.sleep(seconds)
    return 100.0 * (worker.cpu_seconds() - before) / (time.monotonic() - started)


def run_idle_and_e2e(adapter: Adapter, config: Config, tag: str) -> dict[str, float]:
    """(d) then (a), on one worker: idle CPU right after start-up, then the no-op flood."""
    clean(adapter)
    adapter.reset()
    ensure_no_consumers(adapter.queues[0])
    with Worker(adapter.worker_spec(), f'{adapter.name}-worker-e2e-{tag}') as worker:
        worker.wait_ready(READY_TIMEOUT)
        time.sleep(SETTLE_SECONDS)
        idle = idle_cpu_percent(worker, config.idle_seconds)
        if adapter.done_count():
            # Someone else published to our queue: the worker was not idle.
            raise BenchError(f'{adapter.done_count()} tasks ran during the idle sample')
        log(f'  {adapter.name}: idle CPU {idle:.2f}% ({worker.process_count()} processes)')
        count = config.e2e_tasks
        publisher = Publisher(publisher_args(adapter, 'bulk', 'noop', count),
                              f'{adapter.name}-publish-e2e-{tag}')
        try:
            done_at = wait_for_done(adapter, count, timeout=60 + count / 50,
                                    what=f'{count} no-op tasks',
                                    watch=publisher_watch(worker, publisher))
            published = publisher.result(timeout=30)
        finally:
            publisher.kill()
    clean(adapter)
    if done_at < published['t1']:
        raise BenchError(f'all {count} completions seen before publishing ended: '
                         'another publisher or worker shares the queue or the database')
    seconds = done_at - published['t0']
    log(f'  {adapter.name}: {count} no-op tasks in {seconds:.2f}s = {count / seconds:,.0f}/s '
        f'(publishing {published["rate"]:,.0f}/s)')
    return {'idle_cpu': idle, 'e2e_seconds': seconds, 'e2e_rate': count / seconds,
            'e2e_publish_rate': published['rate']}


def run_drain(adapter: Adapter, tag: str) -> dict[str, float]:
    """(b) publish the backlog with no worker running, then start one and time the drain."""
    clean(adapter)
    adapter.reset()
    publisher = Publisher(publisher_args(adapter, 'bulk', 'sleep50', DRAIN_TASKS),
                          f'{adapter.name}-publish-drain-{tag}')
    published = publisher.result(timeout=180)
    ensure_no_consumers(adapter.queues[0])
    stats = queue_stats(adapter.queues[0])
    if stats is None or stats[0] != DRAIN_TASKS:
        raise BenchError(f'{stats and stats[0]} messages in {adapter.queues[0]} before the '
                         f'worker starts, expected {DRAIN_TASKS}')
    with Worker(adapter.worker_spec(), f'{adapter.name}-worker-drain-{tag}') as worker:
        done_at = wait_for_done(adapter, DRAIN_TASKS, timeout=120, what='the backlog to drain',
                                watch=worker.check_alive)
        ready_at = worker.wait_ready(5)
        spawned_at = worker.started_at
    first = adapter.first_start()
    clean(adapter)
    result = {'drain_ready': done_at - ready_at, 'drain_spawn': done_at - spawned_at,
              'backlog_publish_rate': published['rate']}
    if first is not None:
        result['drain_first'] = done_at - first
    log(f'  {adapter.name}: drained {DRAIN_TASKS} x 50 ms: '
        f'{result.get("drain_first", float("nan")):.2f}s from first start, '
        f'{result["drain_ready"]:.2f}s from ready, {result["drain_spawn"]:.2f}s from spawn '
        f'(backlog published at {published["rate"]:,.0f}/s)')
    return result


def run_confirm(adapter: Adapter, config: Config, tag: str) -> dict[str, float]:
    """(c) sequential confirmed publishes from one caller, no worker consuming."""
    clean(adapter)
    adapter.reset()
    count = config.confirm_publishes
    args = [adapter.name, 'latency', 'noop', str(count),
            '--confirm', '--warmup', str(CONFIRM_WARMUP)]
    publisher = Publisher(args, f'{adapter.name}-publish-confirm-{tag}')
    result = publisher.result(timeout=60 + count / 20)
    clean(adapter)
    adapter.reset()
    log(f'  {adapter.name}: {result["rate"]:,.0f} confirmed publishes/s, '
        f'p50 {result["p50_ms"]:.2f} ms, p99 {result["p99_ms"]:.2f} ms')
    return {'confirm_rate': result['rate'], 'confirm_p50': result['p50_ms'],
            'confirm_p99': result['p99_ms']}


def run_idle_scheduler(adapter: Any, config: Config, tag: str) -> dict[str, float]:
    """(e) carrot only: the service idle with SCHEDULES active schedules, none of them due."""
    clean(adapter)
    adapter.reset()
    adapter.create_schedules(SCHEDULES)
    seconds = max(20.0, 2 * config.idle_seconds)  # statement counts reach PostgreSQL's
    try:                                           # statistics within a second or so
        with Worker(adapter.idle_scheduler_spec(), f'{adapter.name}-worker-sched-{tag}'
                    ) as worker:
            worker.wait_ready(READY_TIMEOUT)
            time.sleep(SETTLE_SECONDS)
            statements = adapter.database_statements()
            before = worker.cpu_seconds()
            started = time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - started
            cpu = 100.0 * (worker.cpu_seconds() - before) / elapsed
            rate = (adapter.database_statements() - statements) / elapsed
            if adapter.done_count():
                raise BenchError(f'{adapter.done_count()} tasks ran: a schedule was due')
    finally:
        adapter.delete_schedules()
    log(f'  {adapter.name}: idle with {SCHEDULES:,} schedules: CPU {cpu:.2f}%, '
        f'{rate:.1f} database statements/s')
    return {'scheduler_cpu': cpu, 'scheduler_statements': rate}


def measure_system(adapter: Adapter, config: Config, tag: str, results: Results) -> None:
    """One repeat of every workload for one system; a failed workload is logged and skipped."""
    steps: list[Callable[[], dict[str, float]]] = [lambda: run_confirm(adapter, config, tag)]
    if adapter.has_worker:
        steps = [lambda: run_idle_and_e2e(adapter, config, tag),
                 lambda: run_drain(adapter, tag), *steps]
    if hasattr(adapter, 'create_schedules'):
        steps.append(lambda: run_idle_scheduler(adapter, config, tag))
    for step in steps:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                for key, value in step().items():
                    results[adapter.name][key].append(value)
                break
            except Exception as error:  # noqa: BLE001 - any failure: log, clean up, retry
                log(f'  FAILED {adapter.name} (attempt {attempt}/{ATTEMPTS}): '
                    f'{type(error).__name__}: {error}')
                if attempt == ATTEMPTS:
                    results[adapter.name]['_failures'].append(1.0)
            finally:
                kill_all_started()
                try:
                    clean(adapter)
                except Exception as error:  # noqa: BLE001 - the broker may be the problem
                    log(f'  cleanup of {adapter.name} failed: {type(error).__name__}: {error}')
                    time.sleep(2)


# --------------------------------------------------------------------------- report


def fmt(value: float | None, digits: int) -> str:
    if value is None:
        return '-'
    return f'{value:,.{digits}f}'


def ratio(metric: Metric, carrot: float | None, peer: float | None) -> str:
    if carrot is None or peer is None or peer == 0:
        return '-'
    return f'{carrot / peer:.2f}x'


def direction(metric: Metric) -> str:
    return 'higher is better' if metric.higher_is_better else 'lower is better'


def table_rows(results: Results, columns: Sequence[str]) -> list[list[str]]:
    rows = []
    for metric in METRICS:
        values = {name: median(results.get(name, {}).get(metric.key, [])) for name in columns}
        if all(v is None for v in values.values()):
            continue
        row = [f'{metric.label} [{metric.unit}, {direction(metric)}]']
        row += [fmt(values[name], metric.digits) for name in columns]
        row += [ratio(metric, values.get('carrot'), values.get(peer)) for peer in PEERS]
        rows.append(row)
    return rows


def render_text(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    def line(cells: list[str]) -> str:
        return '  '.join(cell.ljust(w) if i == 0 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths, strict=True)))
    lines = [line(r) for r in [header, *rows]]
    lines.insert(1, '-' * len(lines[0]))
    return '\n'.join(lines)


def render_markdown(rows: list[list[str]], header: list[str]) -> str:
    out = ['| ' + ' | '.join(header) + ' |', '|' + '---|' + '---:|' * (len(header) - 1)]
    out += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(out)


def package_versions() -> str:
    names = ('celery', 'kombu', 'amqp', 'dramatiq', 'pika', 'amqpstorm', 'gevent', 'django',
             'psycopg', 'redis')
    found = []
    for name in names:
        try:
            found.append(f'{name} {importlib.metadata.version(name)}')
        except importlib.metadata.PackageNotFoundError:
            pass
    return ', '.join(found)


def command_output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return '?'


def environment_lines(adapters: dict[str, Adapter]) -> list[str]:
    lines = [
        f'- Machine: {os.cpu_count()} cores, {platform.platform()}, '
        f'Python {platform.python_version()}; '
        f'load average at start {os.getloadavg()[0]:.2f} (shared machine: expect noise)',
        f'- RabbitMQ {command_output(["rabbitmqctl", "version"])}, '
        f'Redis {redis_client().info("server").get("redis_version", "?")} '
        "(the peers' completion counter)",
        f'- Packages: {package_versions()}',
    ]
    for name, adapter in adapters.items():
        if adapter.has_worker:
            lines.append(f'- {name} worker: {adapter.worker_description}')
            lines.append(f'- {name} publishing in (a)/(b): {adapter.publish_description}')
        lines.append(f'- {name} confirmed publishing in (c): {adapter.confirm_description}')
    return lines


def raw_lines(results: Results) -> list[str]:
    lines = []
    for name, metrics in results.items():
        for metric in METRICS:
            values = metrics.get(metric.key)
            if values:
                shown = ', '.join(fmt(v, metric.digits) for v in values)
                lines.append(f'- {name} {metric.key}: {shown}')
        if metrics.get('_failures'):
            lines.append(f'- {name}: {len(metrics["_failures"])} workload run(s) FAILED (see log)')
    return lines


def write_report(results: Results, config: Config, adapters: dict[str, Adapter],
                 env_lines: list[str], elapsed: float, argv: list[str]) -> str:
    columns = [*config.systems, 'pika']
    header = ['workload', *columns, 'carrot/celery', 'carrot/dramatiq']
    rows = table_rows(results, columns)
    text = render_text(rows, header)
    markdown = '\n'.join([
        '# carrot benchmark: last report',
        '',
        f'Generated {datetime.datetime.now().isoformat(timespec="seconds")} by '
        f'`python benchmarks/run.py {" ".join(argv)}` in {elapsed:.0f} s. '
        f'Medians of {config.repeat} run(s). Ratios are carrot / peer: above 1 is better for '
        'carrot where higher is better, below 1 is better for carrot where lower is better.',
        '',
        render_markdown(rows, header),
        '',
        f'(a) N = {config.e2e_tasks} no-op tasks with the worker already running; time from the '
        'first publish call to the moment the harness sees the N-th completion. '
        f'(b) {DRAIN_TASKS} tasks of `time.sleep(0.05)` published before the worker starts, '
        'concurrency 100 (ideal 1.0 s). (c) '
        f'{config.confirm_publishes} sequential confirmed publishes after {CONFIRM_WARMUP} '
        f'warm-up ones; pika is the raw-client reference. (d) worker CPU (all its processes) over '
        f'{config.idle_seconds:.0f} s, starting {SETTLE_SECONDS:.0f} s after its ready line. '
        f'(e) carrot only: the same worker with its scheduler on and {SCHEDULES:,} active '
        'one-day schedules, none due; CPU and the transactions PostgreSQL counted in its '
        f'database (pg_stat_database) over {max(20.0, 2 * config.idle_seconds):.0f} s.',
        '',
        '## Set-up',
        '',
        *env_lines,
        '',
        '## Every run',
        '',
        *raw_lines(results),
        '',
    ])
    REPORT_PATH.write_text(markdown)
    return text


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true',
                        help='1,000 no-op tasks, 500 confirmed publishes, 5 s idle sample')
    parser.add_argument('--only', choices=SYSTEMS,
                        help='benchmark one system (the pika reference still runs)')
    parser.add_argument('--repeat', type=int, default=3,
                        help='runs of every workload; medians are reported (default 3)')
    parser.add_argument('--tasks', type=int,
                        help='no-op tasks for (a) (default 5000, 1000 with --quick)')
    args = parser.parse_args(argv)
    config = Config(
        e2e_tasks=args.tasks or (1000 if args.quick else 5000),
        idle_seconds=5.0 if args.quick else 10.0,
        confirm_publishes=500 if args.quick else 2000,
        repeat=max(1, args.repeat),
        systems=(args.only,) if args.only else SYSTEMS,
    )
    return config, args


def _terminate(signum: int, _frame: Any) -> None:
    # Turn SIGTERM/SIGHUP into an exception so every finally: block (worker kills) runs.
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    config, _ = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = time.monotonic()
    adapters = {name: load_adapter(name) for name in (*config.systems, 'pika')}
    results: Results = defaultdict(lambda: defaultdict(list))
    log(f'logs of workers and publishers: {LOG_DIR}')
    try:
        for adapter in adapters.values():
            clean(adapter)
            adapter.prepare()
        env_lines = environment_lines(adapters)
        for run in range(1, config.repeat + 1):
            for name, adapter in adapters.items():  # interleaved, so noise spreads evenly
                log(f'run {run}/{config.repeat}: {name}')
                measure_system(adapter, config, f'run{run}', results)
    except (KeyboardInterrupt, SystemExit):
        log('interrupted: stopping workers and deleting the bench queues')
        raise
    finally:
        kill_all_started()
        for adapter in adapters.values():
            try:
                clean(adapter)
                adapter.reset()
                adapter.close()
            except Exception as error:  # cleanup must not hide the real error
                log(f'cleanup of {adapter.name} failed: {type(error).__name__}: {error}')
    text = write_report(results, config, adapters, env_lines, time.monotonic() - started, argv)
    print()
    print(text)
    print(f'\nMarkdown report: {REPORT_PATH}')
    failures = sum(len(m.get('_failures', [])) for m in results.values())
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
