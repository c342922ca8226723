"""How carrot scales: ``python3 benchmarks/scale.py [--tasks N] [--repeat N]``.

For 1 and 2 worker processes at a queue concurrency of 1, 10, 100 and 500, a publisher of
50 callers (50 greenlets, as in benchmarks/run.py) sends N no-op tasks (5,000) to the
running workers; measured from its first call until the N-th row is COMPLETED: the rate,
and the CPU (user + system) each component used over that time, per 1,000 tasks: the
workers, RabbitMQ (its ``beam.smp``), the publisher (its own count, from its first call
until every confirm is recorded) and PostgreSQL (every server process; on SQLite the
database's work is inside the worker and the publisher). From the CPU it estimates what a
fleet needs. Prints a table, writes ``benchmarks/last-scale-<database>.md`` and draws
``docs/_static/scale/throughput.svg`` and ``cpu.svg`` (matplotlib).
"""

from __future__ import annotations

import sys

if __name__ == '__main__':
    from bootstrap import into_bench_venv

    into_bench_venv(__file__)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402

from carrot_adapter import ADAPTER, _using_sqlite  # noqa: E402
from common import BENCH_DIR, Publisher, Worker, kill_all_started, wait_until  # noqa: E402
from workloads import _fresh, _watch, log, publisher_args  # noqa: E402

PROCESSES = (1, 2)
CONCURRENCIES = (1, 10, 100, 500)
CALLERS = 50
COMPONENTS = ('worker', 'broker', 'publisher', 'database')
PLOTS = BENCH_DIR.parent / 'docs' / '_static' / 'scale'
#: The rate a fleet is sized for in the report.
FLEET_RATE = 10_000


@dataclass(frozen=True, kw_only=True)
class Run:
    """One measurement of one set-up."""

    #: Worker processes, each with ``concurrency`` consumers.
    processes: int
    #: The queue's concurrency (consumers per worker process).
    concurrency: int
    #: Tasks per second, first publish call to the last COMPLETED row.
    rate: float
    #: CPU per 1,000 tasks, in ms, by component (COMPONENTS; database None on SQLite).
    cpu: dict[str, float | None]


def _cpu_of(processes: list[psutil.Process]) -> float:
    """User + system CPU of ``processes`` and of the children they have reaped."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def _named(names: tuple[str, ...]) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(['name']) if p.info['name'] in names]


def _broker_cpu() -> float:
    return _cpu_of(_named(('beam.smp',)))


def _database_cpu() -> float | None:
    """Every PostgreSQL process's CPU; the postmaster's children times hold those that ended."""
    if _using_sqlite():
        return None
    return _cpu_of(_named(('postgres', 'postmaster')))


def _workers(processes: int, concurrency: int) -> list[Worker]:
    spec = ADAPTER.worker_spec()
    spec.env = {**spec.env, 'BENCH_CARROT_CONCURRENCY': str(concurrency)}
    return [Worker(spec, f'scale-worker-{processes}x{concurrency}-{index}')
            for index in range(processes)]


def measure(processes: int, concurrency: int, tasks: int) -> Run:
    _fresh(ADAPTER)
    workers = _workers(processes, concurrency)
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready(60)
        time.sleep(1)  # let the consumers settle
        before = {'worker': sum(w.cpu_seconds() for w in workers), 'broker': _broker_cpu(),
                  'database': _database_cpu()}
        publisher = Publisher([*publisher_args(ADAPTER, 'bulk', 'noop', tasks, CALLERS),
                               '--confirm'], f'scale-publish-{processes}x{concurrency}')
        try:
            done_at = wait_until(lambda: ADAPTER.done_count() >= tasks, 120 + tasks / 20,
                                 ADAPTER.poll_interval, f'{tasks} no-op tasks',
                                 on_tick=_watch(workers[0], publisher))
            after = {'worker': sum(w.cpu_seconds() for w in workers),
                     'broker': _broker_cpu(), 'database': _database_cpu()}
            published = publisher.result(timeout=60)
        finally:
            publisher.kill()
    finally:
        for worker in workers:
            worker.stop()
    per_thousand = 1e6 / tasks
    cpu: dict[str, float | None] = {}
    for component in ('worker', 'broker', 'database'):
        start, end = before[component], after[component]
        cpu[component] = None if start is None or end is None else (end - start) * per_thousand
    cpu['publisher'] = published['cpu_seconds'] * per_thousand
    run = Run(processes=processes, concurrency=concurrency,
              rate=tasks / (done_at - published['t0']), cpu=cpu)
    log(f'  {processes} x {concurrency}: {run.rate:,.0f} tasks/s, CPU per 1,000 (ms): '
        + ', '.join(f'{k} {_ms(v)}' for k, v in cpu.items()))
    return run


def _ms(value: float | None) -> str:
    return '–' if value is None else f'{value:,.0f}'


def medians(runs: list[Run]) -> list[Run]:
    """One Run per set-up: the median of each figure over the repeats."""
    chosen = []
    for processes in PROCESSES:
        for concurrency in CONCURRENCIES:
            same = [r for r in runs if (r.processes, r.concurrency) == (processes, concurrency)]
            if not same:
                continue
            cpu: dict[str, float | None] = {}
            for component in COMPONENTS:
                values = [r.cpu[component] for r in same]
                known = [v for v in values if v is not None]
                cpu[component] = statistics.median(known) if known else None
            chosen.append(Run(processes=processes, concurrency=concurrency,
                              rate=statistics.median(r.rate for r in same), cpu=cpu))
    return chosen


def table(runs: list[Run]) -> list[str]:
    lines = ['| worker processes × concurrency | tasks/s | worker | RabbitMQ | publisher | '
             'database | all |', '|---|---|---|---|---|---|---|']
    for run in runs:
        total = sum(v for v in run.cpu.values() if v is not None)
        lines.append(f'| {run.processes} × {run.concurrency} | {run.rate:,.0f} | '
                     + ' | '.join(_ms(run.cpu[c]) for c in COMPONENTS) + f' | {total:,.0f} |')
    return lines


def fleet(runs: list[Run]) -> list[str]:
    """What FLEET_RATE tasks a second need, from the one-process, concurrency-100 CPU."""
    base = next((r for r in runs if (r.processes, r.concurrency) == (1, 100)), None)
    if base is None:
        return []
    lines = [f'From 1 worker process at concurrency 100 (CPU per 1,000 tasks; a core is '
             f'1,000 ms of CPU a second), {FLEET_RATE:,} no-op tasks a second need:', '']
    for component in COMPONENTS:
        value = base.cpu[component]
        if value is None:
            continue
        lines.append(f'- {component}: {value:,.0f} ms per 1,000 tasks, so '
                     f'{value * FLEET_RATE / 1e6:.1f} cores (one core: '
                     f'{1e6 / value:,.0f} tasks/s)')
    return lines


def plot(runs: list[Run], folder: Path) -> None:
    import matplotlib

    matplotlib.use('svg')
    import matplotlib.pyplot as plt

    matplotlib.rcParams['svg.hashsalt'] = 'carrot-scale'  # the same file for the same data
    folder.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(6, 3.6))
    for processes in PROCESSES:
        mine = [r for r in runs if r.processes == processes]
        axes.plot([r.concurrency for r in mine], [r.rate for r in mine], marker='o',
                  label=f'{processes} worker process{"es" if processes > 1 else ""}')
    axes.set_xscale('log')
    axes.set_xticks(CONCURRENCIES, [str(c) for c in CONCURRENCIES])
    axes.set_xlabel('concurrency (consumers per worker process)')
    axes.set_ylabel('no-op tasks/s, end to end')
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(folder / 'throughput.svg', metadata={'Date': None})
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(7, 3.8))
    labels = [f'{r.processes}×{r.concurrency}' for r in runs]
    bottom = [0.0] * len(runs)
    for component in COMPONENTS:
        values = [r.cpu[component] or 0.0 for r in runs]
        axes.bar(labels, values, bottom=bottom, label=component)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes.set_xlabel('worker processes × concurrency')
    axes.set_ylabel('CPU ms per 1,000 tasks')
    axes.grid(axis='y', alpha=0.3)
    axes.legend(fontsize='small')
    figure.tight_layout()
    figure.savefig(folder / 'cpu.svg', metadata={'Date': None})
    plt.close(figure)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--tasks', type=int, default=5000, help='tasks per set-up (5,000)')
    parser.add_argument('--repeat', type=int, default=1, help='runs of each set-up (1)')
    parser.add_argument('--no-plots', action='store_true', help='do not redraw the plots')
    args = parser.parse_args(argv)
    ADAPTER.prepare()
    database = 'sqlite' if _using_sqlite() else 'postgresql'
    runs: list[Run] = []
    try:
        for repeat in range(args.repeat):
            log(f'repeat {repeat + 1} of {args.repeat}, {args.tasks:,} tasks per set-up')
            for processes in PROCESSES:
                for concurrency in CONCURRENCIES:
                    runs.append(measure(processes, concurrency, args.tasks))
    finally:
        kill_all_started()
        ADAPTER.close()
    chosen = medians(runs)
    lines = [f'# carrot at scale ({database}, {time.strftime("%Y-%m-%d %H:%M")})', '',
             f'`python3 benchmarks/scale.py --tasks {args.tasks} --repeat {args.repeat}`: '
             f'{args.tasks:,} no-op tasks from {CALLERS} callers, CPU in ms per 1,000 tasks, '
             f'medians of {args.repeat}.', '', *table(chosen), '', *fleet(chosen)]
    report = BENCH_DIR / f'last-scale-{database}.md'
    report.write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    if not args.no_plots:
        plot(chosen, PLOTS)
        print(f'\nplots: {PLOTS}/throughput.svg, {PLOTS}/cpu.svg; report: {report}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
