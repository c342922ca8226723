"""The report: medians per system, carrot's ratio to each peer, and the targets it is held to.

Ratios are only ever taken between figures of the same workload and the same publisher
shape. The table goes to stdout; the Markdown report, with the set-up and every single run,
to ``benchmarks/last-report-<database>.md``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import Adapter, median, redis_client
from workloads import (
    CONFIRM_WARMUP,
    MANY_CALLERS,
    PACED_RATE,
    SCHEDULES,
    SETTLE_SECONDS,
    SLEEP_TASKS,
    TRANSACTION_TASKS,
    Config,
)

PEERS = ('celery', 'dramatiq')

Results = dict[str, dict[str, list[float]]]  # system -> metric -> one value per repeat


@dataclass(frozen=True, kw_only=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int = 0


METRICS = (
    Metric(key='e2e1_rate', label='(a) no-op tasks end to end, one caller', unit='tasks/s',
           higher_is_better=True),
    Metric(key='e2e1_publish_rate', label='(a) its publishing phase, one caller',
           unit='msg/s', higher_is_better=True),
    Metric(key='e2e1_cpu', label='(a) worker CPU per 1,000 tasks, one caller', unit='ms',
           higher_is_better=False),
    Metric(key='e2e1_async_rate',
           label="(a) the same, CARROT['synchronous_commit'] False (opt-in)",
           unit='tasks/s', higher_is_better=True),
    Metric(key='e2e1_async_publish_rate', label='(a) its publishing phase', unit='msg/s',
           higher_is_better=True),
    Metric(key=f'e2e{MANY_CALLERS}_rate',
           label=f'(a) no-op tasks end to end, {MANY_CALLERS} callers', unit='tasks/s',
           higher_is_better=True),
    Metric(key=f'e2e{MANY_CALLERS}_publish_rate',
           label=f'(a) its publishing phase, {MANY_CALLERS} callers', unit='msg/s',
           higher_is_better=True),
    Metric(key=f'e2e{MANY_CALLERS}_cpu',
           label=f'(a) worker CPU per 1,000 tasks, {MANY_CALLERS} callers', unit='ms',
           higher_is_better=False),
    Metric(key='drain_rate', label='(b) no-op backlog drained', unit='tasks/s',
           higher_is_better=True),
    Metric(key='drain_cpu', label='(b) worker CPU per 1,000 tasks, draining', unit='ms',
           higher_is_better=False),
    Metric(key='sleep_first', label=f'(c) {SLEEP_TASKS:,} x 50 ms: first start -> last done',
           unit='s', higher_is_better=False, digits=2),
    Metric(key='sleep_spawn', label='(c) the same from the worker process spawn', unit='s',
           higher_is_better=False, digits=2),
    Metric(key='confirm_rate', label='(d) confirmed publishes, one caller', unit='msg/s',
           higher_is_better=True),
    Metric(key='confirm_p50', label='(d) one confirmed publish call, median', unit='ms',
           higher_is_better=False, digits=2),
    Metric(key='confirm_p99', label='(d) one confirmed publish call, p99', unit='ms',
           higher_is_better=False, digits=2),
    Metric(key='atomic_rate', label=f'(e) {TRANSACTION_TASKS:,} publishes in one transaction',
           unit='msg/s', higher_is_better=True),
    Metric(key='together_rate', label="(e') the same inside publish_together()",
           unit='msg/s', higher_is_better=True),
    Metric(key='idle_cpu', label='(f) idle worker, 100 consumers', unit='% of a core',
           higher_is_better=False, digits=2),
    Metric(key='rss_ready', label='(f) worker resident memory when ready', unit='MB',
           higher_is_better=False),
    Metric(key='rss_after', label='(f) the same after the floods of (a)', unit='MB',
           higher_is_better=False),
    Metric(key='scheduler_cpu', label=f'(g) idle service, {SCHEDULES:,} schedules',
           unit='% of a core', higher_is_better=False, digits=2),
    Metric(key='scheduler_statements', label='(g) its database statements', unit='per s',
           higher_is_better=False, digits=1),
    Metric(key='paced_cpu',
           label=f'(h) worker CPU per 1,000 tasks, one caller at {PACED_RATE:,.0f} tasks/s',
           unit='ms', higher_is_better=False),
)


def medians(results: Results) -> dict[str, dict[str, float | None]]:
    return {system: {metric.key: median(figures.get(metric.key, [])) for metric in METRICS}
            for system, figures in results.items()}


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True, kw_only=True)
class Target:
    """A goal for carrot, checked against this run's medians."""

    #: What is promised, as the issue states it.
    text: str
    #: carrot's figure and the bound it is held to, from the medians; None: not measured.
    measure: Callable[[dict[str, dict[str, float | None]]], tuple[float, float] | None]
    #: True: carrot's figure must be at least the bound; False: at most.
    at_least: bool
    #: How the two figures are shown (a ratio or a plain value).
    shown_as: str = 'ratio'
    #: Why it is not measured, when it is not.
    missing: str = ''
    #: Held on this database only (None: on every one).
    database: str | None = None


def _ratio(metric: str, peer: str, bound: float, system: str = 'carrot'
           ) -> Callable[[dict[str, dict[str, float | None]]], tuple[float, float] | None]:
    def measure(found: dict[str, dict[str, float | None]]) -> tuple[float, float] | None:
        mine = found.get(system, {}).get(metric)
        theirs = found.get(peer, {}).get(metric)
        if mine is None or not theirs:
            return None
        return mine / theirs, bound
    return measure


def _value(metric: str, bound: float
           ) -> Callable[[dict[str, dict[str, float | None]]], tuple[float, float] | None]:
    def measure(found: dict[str, dict[str, float | None]]) -> tuple[float, float] | None:
        mine = found.get('carrot', {}).get(metric)
        return None if mine is None else (mine, bound)
    return measure


def _transaction_against_celery(metric: str
                                ) -> Callable[[dict[str, dict[str, float | None]]],
                                              tuple[float, float] | None]:
    def measure(found: dict[str, dict[str, float | None]]) -> tuple[float, float] | None:
        mine = found.get('carrot', {}).get(metric)
        theirs = found.get('celery', {}).get('e2e1_publish_rate')
        return None if mine is None or not theirs else (mine / theirs, 3.0)
    return measure


def _growth(found: dict[str, dict[str, float | None]]) -> tuple[float, float] | None:
    before = found.get('carrot', {}).get('rss_ready')
    after = found.get('carrot', {}).get('rss_after')
    return None if before is None or after is None else (after - before, 5.0)


def _not_measured(_: dict[str, dict[str, float | None]]) -> None:
    return None


TARGETS = (
    Target(text='one caller, tracked no-op end to end: >= 1.0x Celery',
           measure=_ratio('e2e1_rate', 'celery', 1.0), at_least=True),
    Target(text=f'{MANY_CALLERS} callers each, end to end: >= 1.5x Celery',
           measure=_ratio(f'e2e{MANY_CALLERS}_rate', 'celery', 1.5), at_least=True),
    Target(text=f'{TRANSACTION_TASKS:,} in one transaction, confirmed at commit: >= 3x '
                "Celery's one-caller delay() rate",
           measure=_transaction_against_celery('atomic_rate'), at_least=True),
    Target(text="the same with publish_together() (e'): >= 3x Celery's one-caller delay() "
                'rate', measure=_transaction_against_celery('together_rate'), at_least=True),
    Target(text='one publish_message call outside a transaction: median <= 0.8 ms '
                '(PostgreSQL)', measure=_value('confirm_p50', 0.8), at_least=False,
           shown_as='ms', database='postgresql'),
    Target(text="worker CPU per 1,000 tasks end to end, one caller: <= Celery's",
           measure=_ratio('e2e1_cpu', 'celery', 1.0), at_least=False),
    Target(text=f"the same with every system's caller at {PACED_RATE:,.0f} tasks/s (h): "
                "<= Celery's", measure=_ratio('paced_cpu', 'celery', 1.0), at_least=False),
    Target(text=f"worker CPU per 1,000 tasks end to end, {MANY_CALLERS} callers: <= Celery's",
           measure=_ratio(f'e2e{MANY_CALLERS}_cpu', 'celery', 1.0), at_least=False),
    Target(text="worker CPU per 1,000 tasks draining a backlog: <= 0.5x Celery's",
           measure=_ratio('drain_cpu', 'celery', 0.5), at_least=False),
    Target(text="untracked tasks, worker CPU per 1,000 end to end, one caller: <= Dramatiq's",
           measure=_ratio('e2e1_cpu', 'dramatiq', 1.0, system='carrot_untracked'),
           at_least=False),
    Target(text=f"the same with every system's caller at {PACED_RATE:,.0f} tasks/s (h): "
                "<= Dramatiq's",
           measure=_ratio('paced_cpu', 'dramatiq', 1.0, system='carrot_untracked'),
           at_least=False),
    Target(text="untracked tasks, worker CPU per 1,000 draining a backlog: <= Dramatiq's",
           measure=_ratio('drain_cpu', 'dramatiq', 1.0, system='carrot_untracked'),
           at_least=False),
    Target(text=f'{SLEEP_TASKS:,} x 50 ms at concurrency 100: <= 1.03 s',
           measure=_value('sleep_first', 1.03), at_least=False, shown_as='s'),
    Target(text='worker with 100 consumers: <= 60 MB resident',
           measure=_value('rss_after', 60.0), at_least=False, shown_as='MB'),
    Target(text='resident memory flat over the floods of (a): grows <= 5 MB',
           measure=_growth, at_least=False, shown_as='MB'),
    Target(text='idle worker: < 1 % of a core', measure=_value('idle_cpu', 1.0),
           at_least=False, shown_as='%'),
    Target(text='scale plots: 1 and 2 workers, concurrency 1-500', measure=_not_measured,
           at_least=True, missing='drawn by benchmarks/scale.py, a run of its own'),
)


def target_rows(found: dict[str, dict[str, float | None]], database: str) -> list[list[str]]:
    rows = []
    for target in TARGETS:
        if target.database not in (None, database):
            continue
        measured = target.measure(found)
        if measured is None:
            rows.append([target.text, '-', target.missing or 'not measured in this run'])
            continue
        value, bound = measured
        met = value >= bound if target.at_least else value <= bound
        shown = f'{value:.2f}x' if target.shown_as == 'ratio' else f'{value:.2f} {target.shown_as}'
        rows.append([target.text, shown, 'met' if met else 'NOT met'])
    return rows


# --------------------------------------------------------------------------- tables


def fmt(value: float | None, digits: int) -> str:
    return '-' if value is None else f'{value:,.{digits}f}'


def table_rows(found: dict[str, dict[str, float | None]], columns: Sequence[str]
               ) -> list[list[str]]:
    rows = []
    for metric in METRICS:
        values = {name: found.get(name, {}).get(metric.key) for name in columns}
        if all(v is None for v in values.values()):
            continue
        better = 'higher' if metric.higher_is_better else 'lower'
        row = [f'{metric.label} [{metric.unit}, {better} is better]']
        row += [fmt(values[name], metric.digits) for name in columns]
        carrot = values.get('carrot')
        for peer in PEERS:
            theirs = values.get(peer)
            row.append('-' if carrot is None or not theirs else f'{carrot / theirs:.2f}x')
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


# --------------------------------------------------------------------------- set-up


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
            lines.append(f'- {name} publishing: {adapter.publish_description}')
        lines.append(f'- {name} confirmed publishing in (d): {adapter.confirm_description}')
    return lines


def raw_lines(results: Results) -> list[str]:
    lines = []
    for name, figures in results.items():
        for metric in METRICS:
            values = figures.get(metric.key)
            if values:
                shown = ', '.join(fmt(v, metric.digits) for v in values)
                lines.append(f'- {name} {metric.key}: {shown}')
        if figures.get('_failures'):
            lines.append(f'- {name}: {len(figures["_failures"])} workload run(s) FAILED (see log)')
    return lines


def workload_notes(config: Config) -> str:
    return (
        f'(a) {config.e2e_tasks:,} no-op tasks published to a running worker, first from one '
        f'caller, then from {MANY_CALLERS} greenlets of one gevent-patched process; time from '
        'the first publish call until the harness sees the last completion; worker CPU (all its '
        'processes) over that time. '
        f'(b) {config.backlog_tasks:,} no-op tasks published before the worker starts; rate and '
        'CPU from the first completion seen to the last (start-up excluded). '
        f'(c) {SLEEP_TASKS:,} tasks of time.sleep(0.05) published before the worker starts, '
        'concurrency 100, ideal 1.0 s. '
        f'(d) {config.confirm_publishes:,} sequential publishes after {CONFIRM_WARMUP} warm-up '
        'ones, confirms on for every system; pika is the raw-client reference. '
        f'(e) carrot only: {TRANSACTION_TASKS:,} publish_message calls in one '
        'transaction.atomic(), timed until the commit returns with every message confirmed; '
        "(e') the same calls inside publish_together() in that transaction, which writes their "
        'rows a few hundred to a statement when the block ends. '
        f'(f) worker CPU over {config.idle_seconds:.0f} s, {SETTLE_SECONDS:.0f} s after its ready '
        'line; resident memory of all its processes. '
        f'(g) carrot only: the service with its scheduler on and {SCHEDULES:,} one-day schedules, '
        'none due; CPU and the transactions PostgreSQL counted in its database. '
        f'(h) {config.paced_tasks:,} no-op tasks from one caller at {PACED_RATE:,.0f} a second '
        'for every system (a sleep between calls) to a freshly started worker: the same '
        'rate for each, where in (a) each caller publishes at its own speed.')


CARROT_DOES_MORE = (
    'What carrot does on every task that the peers, as they ship, do not: it writes a '
    'MessageLog row when the task is published (in the publisher, before the call returns), '
    'records its start and its end in that row, and has RabbitMQ confirm every publish (the '
    'call returns once the row is committed and the message written; the confirm is '
    'recorded on the row after, and a message not confirmed is sent again from it). Celery '
    'and Dramatiq publish without confirms by default (they are switched on for both in (d) '
    'only) and keep no record of a task. carrot_untracked is carrot with '
    "'tracked': False on its queue: no row unless a task fails, and each call waits for its "
    'confirm.')


def write_report(path: Path, results: Results, config: Config, env_lines: list[str],
                 elapsed: float, argv: list[str], database: str) -> str:
    found = medians(results)
    columns = [*config.systems, 'pika']
    header = ['workload', *columns, 'carrot/celery', 'carrot/dramatiq']
    rows = table_rows(found, columns)
    goals = target_rows(found, database)
    goal_header = ['target', 'carrot', 'verdict']
    text = '\n\n'.join([render_text(rows, header), render_text(goals, goal_header),
                        CARROT_DOES_MORE])
    markdown = '\n'.join([
        f'# carrot benchmark: last report ({database})',
        '',
        f'Generated {datetime.datetime.now().isoformat(timespec="seconds")} by '
        f'`python3 benchmarks/run.py {" ".join(argv)}` in {elapsed:.0f} s, carrot on '
        f'{database}. Medians of {config.repeat} run(s). Ratios are carrot / peer, always '
        'between the same workload and the same publisher shape.',
        '',
        render_markdown(rows, header),
        '',
        workload_notes(config),
        '',
        CARROT_DOES_MORE,
        '',
        '## Targets',
        '',
        render_markdown(goals, goal_header),
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
    path.write_text(markdown)
    return text
