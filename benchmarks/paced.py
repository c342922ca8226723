"""A worker's CPU at a fixed arrival rate: ``python3 benchmarks/paced.py [options]``.

The end-to-end workload of ``run.py`` publishes as fast as one caller can, so the rate the
worker sees (and with it the size of the recorder's batches and its CPU per task) moves
with the publisher and with the machine's load. This publishes from one caller at a fixed
rate instead (``--rate``, 300 tasks a second by default, a sleep between calls), to a
freshly started worker each repeat, and prints the worker's CPU per 1,000 no-op tasks, from
the first call until the last task is counted, and the median over the repeats: run
interleaved with another version of the code, it compares two versions of carrot's worker.

``--compare`` runs carrot, carrot untracked, Celery and Dramatiq at the same rate instead,
interleaved (each repeat of each system in a process of its own), and prints their medians
and carrot's ratios: the worker CPU targets, with every worker fed the same rate (in
``run.py``'s workload (a) each system's one caller publishes at its own speed, the peers'
several times faster than carrot's). ``run.py``'s workload (h) is one such run per system.

Options: ``--rate`` (tasks/s), ``--tasks`` (3,000), ``--repeat`` (3), ``--system`` (carrot,
carrot_untracked, celery or dramatiq; ``--untracked`` is ``--system carrot_untracked``),
``--compare``, ``--idle SECONDS`` (publish nothing: the idle
worker's CPU in % of a core over that many seconds, as workload (f) of ``run.py`` samples
it), ``--sleeping`` (publish nothing at a rate: 2,000 tasks of 50 ms published first, and
the seconds the worker takes from the first start until the last ends, as workload (c) of
``run.py`` times it), ``--rows`` (carrot on PostgreSQL: also the MessageLog rows inserted
and updated and the bytes of WAL written, a task, as PostgreSQL counted them from the first
call until the worker stopped, so that every confirm, start and end is in).
``BENCH_DB=sqlite`` as for ``run.py``.
"""

from __future__ import annotations

import os
import sys

if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bootstrap import into_bench_venv

    into_bench_venv(__file__)

import argparse  # noqa: E402
import importlib  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import carrot_adapter  # noqa: E402
import carrot_untracked_adapter  # noqa: E402
from common import Adapter, BenchError, Worker, kill_all_started, wait_until  # noqa: E402
from workloads import (  # noqa: E402
    READY_TIMEOUT,
    SETTLE_SECONDS,
    _fresh,
    drain_sleeping,
    idle_cpu,
    log,
    paced_in_subprocess,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rate', type=float, default=300.0, help='tasks a second')
    parser.add_argument('--tasks', type=int, default=3000, help='no-op tasks per repeat')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--system', choices=SYSTEMS,
                        help='the system whose worker is measured (default: carrot)')
    parser.add_argument('--untracked', action='store_true',
                        help="the queue with 'tracked': False (--system carrot_untracked)")
    instead = parser.add_mutually_exclusive_group()
    instead.add_argument('--compare', action='store_true',
                         help='every system at the same rate, interleaved, and the ratios')
    instead.add_argument('--idle', type=float, metavar='SECONDS',
                         help="publish nothing: the idle worker's CPU over SECONDS")
    instead.add_argument('--sleeping', action='store_true',
                         help='the time to drain 2,000 tasks of 50 ms published first')
    parser.add_argument('--rows', action='store_true',
                        help='carrot on PostgreSQL: also the rows inserted and updated and '
                             'the bytes of WAL a task')
    args = parser.parse_args()
    if args.untracked:
        if args.system not in (None, 'carrot_untracked'):
            parser.error('--untracked is --system carrot_untracked: give one or the other')
        args.system = 'carrot_untracked'
    if args.compare and args.system is not None:
        parser.error('--compare runs every system: leave out --system and --untracked')
    args.system = args.system or 'carrot'
    if args.rows and (args.system != 'carrot' or args.compare or args.idle is not None
                      or args.sleeping or os.environ.get('BENCH_DB') == 'sqlite'):
        parser.error('--rows counts the rows of tracked carrot tasks at a rate, in '
                     "PostgreSQL's statistics: leave out --system, --compare, --idle, "
                     '--sleeping and BENCH_DB=sqlite')
    return args


SYSTEMS = ('carrot', 'carrot_untracked', 'celery', 'dramatiq')
# carrot's ratios that --compare prints: (system, peer).
RATIOS = (('carrot', 'celery'), ('carrot', 'dramatiq'), ('carrot_untracked', 'dramatiq'))


def one_run(adapter: Adapter, publish: Callable[[], None], rate: float, count: int,
            tag: str, finish: Callable[[], None] | None, rows: bool = False,
            ) -> tuple[float, RowWork | None]:
    """Worker CPU in ms per 1,000 tasks for ``count`` tasks published at ``rate``, and with
    ``rows`` (carrot on PostgreSQL) what a task cost MessageLog."""
    _fresh(adapter)
    carrot = carrot_adapter.ADAPTER if rows else None
    with Worker(adapter.worker_spec(), f'{adapter.name}-paced-{tag}') as worker:
        worker.wait_ready(READY_TIMEOUT)
        time.sleep(SETTLE_SECONDS)
        work_before = carrot.row_work() if carrot is not None else None
        cpu_before = worker.cpu_seconds()
        started = time.monotonic()
        for number in range(count):
            publish()
            pause = started + (number + 1) / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        wait_until(lambda: adapter.done_count() >= count, 60 + count / 50,
                   adapter.poll_interval, f'{count} paced no-op tasks',
                   on_tick=worker.check_alive)
        per_thousand = 1e6 * (worker.cpu_seconds() - cpu_before) / count
    if finish is not None:
        finish()  # carrot's: every confirm recorded, before the next repeat's clean-up
    log(f'  {adapter.name}: {count} tasks at {rate:,.0f}/s, worker CPU '
        f'{per_thousand:,.0f} ms per 1,000')
    work = None
    if carrot is not None and work_before is not None:
        time.sleep(carrot_adapter.STATS_FLUSH_SECONDS)  # the publisher's idle connections
        work_after = carrot.row_work()
        assert work_after is not None
        inserted, updated, wal = (after - before for before, after
                                  in zip(work_before, work_after, strict=True))
        work = RowWork(inserted=inserted / count, updated=updated / count, wal_bytes=wal / count)
        log(f'  {adapter.name}: {work}')
    return per_thousand, work


@dataclass(frozen=True, kw_only=True)
class RowWork:
    """What a task cost MessageLog, as PostgreSQL counted it."""

    #: Rows inserted a task (1.0: the PUBLISHED row).
    inserted: float
    #: Row updates a task: starts, ends, confirms.
    updated: float
    #: Bytes of WAL written a task (the whole cluster's, which only the benchmark uses).
    wal_bytes: float

    def __str__(self) -> str:
        return (f'{self.inserted:.2f} row(s) inserted, {self.updated:.2f} updated and '
                f'{self.wal_bytes:,.0f} bytes of WAL a task')


def idle_run(adapter: Adapter, seconds: float, tag: str) -> float:
    """The idle worker's CPU, in % of a core, over ``seconds``."""
    _fresh(adapter)
    with Worker(adapter.worker_spec(), f'{adapter.name}-idle-{tag}') as worker:
        worker.wait_ready(READY_TIMEOUT)
        time.sleep(SETTLE_SECONDS)
        idle = idle_cpu(adapter, worker, seconds)
    log(f'  {adapter.name}: idle for {seconds:.0f} s, worker CPU {idle:.2f}% of a core')
    return idle


def first_start_to_last_end(adapter: Adapter, tag: str) -> float:
    """Workload (c) of ``run.py``: seconds from the first start of 2,000 x 50 ms to the last
    end."""
    seconds = drain_sleeping(adapter, f'paced{tag}').get('sleep_first')
    if seconds is None:
        raise BenchError('no first start was stamped (tasks.sleep50 stamps it in Redis): '
                         'is Redis answering on 127.0.0.1:6379?')
    return float(seconds)


def compare(args: argparse.Namespace) -> int:
    """Each repeat runs every system once, in that order, each in a paced.py of its own."""
    figures: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    for _ in range(args.repeat):
        for name in SYSTEMS:
            figures[name].append(paced_in_subprocess(name, args.rate, args.tasks))
            log(f'  {name}: {figures[name][-1]:,.0f} ms per 1,000')
    medians = {name: statistics.median(runs) for name, runs in figures.items()}
    print(f'worker CPU per 1,000 no-op tasks at {args.rate:,.0f} tasks/s from one caller, '
          f'medians of {args.repeat}:')
    for name, runs in figures.items():
        print(f'  {name}: {medians[name]:,.0f} ms (runs: '
              f'{", ".join(f"{run:,.0f}" for run in runs)})')
    for name, peer in RATIOS:
        print(f'  {name} / {peer}: {medians[name] / medians[peer]:.2f}x')
    return 0


def _terminate(signum: int, _frame: Any) -> None:
    # SIGTERM (run.py stopping this run) as an exception, so that the worker is stopped.
    raise SystemExit(128 + signum)


def main() -> int:
    args = parse_args()
    if args.compare:
        return compare(args)
    signal.signal(signal.SIGTERM, _terminate)
    if args.system == 'carrot_untracked':
        os.environ.update(carrot_untracked_adapter.ENV)  # its queue, before Django starts
    module: ModuleType = importlib.import_module(f'{args.system}_adapter')
    adapter: Adapter = module.ADAPTER
    adapter.prepare()
    publish = module.make_publisher('noop', False)  # the peers' default; carrot confirms
    finish: Callable[[], None] | None = getattr(module, 'finish_publishing', None)
    works: list[RowWork] = []
    try:
        if args.idle is not None:
            figures = [idle_run(adapter, args.idle, str(repeat))
                       for repeat in range(args.repeat)]
        elif args.sleeping:
            figures = [first_start_to_last_end(adapter, str(repeat))
                       for repeat in range(args.repeat)]
        else:
            runs = [one_run(adapter, publish, args.rate, args.tasks, str(repeat), finish,
                            args.rows) for repeat in range(args.repeat)]
            figures = [cpu for cpu, _ in runs]
            works = [work for _, work in runs if work is not None]
    finally:
        adapter.close()
        kill_all_started()
    if args.idle is not None:
        what, unit, form = f'{adapter.name} idle: worker CPU', '% of a core', '.2f'
    elif args.sleeping:
        what, unit, form = f'{adapter.name}: 2,000 x 50 ms from the first start', 's', '.2f'
    else:
        what = f'{adapter.name} at {args.rate:,.0f} tasks/s: worker CPU per 1,000 tasks'
        unit, form = 'ms', ',.0f'
        if works:  # before the median line, which run.py's workload (h) reads last
            median = RowWork(**{name: statistics.median(getattr(w, name) for w in works)
                                for name in ('inserted', 'updated', 'wal_bytes')})
            print(f'{adapter.name} at {args.rate:,.0f} tasks/s, MessageLog: median {median} '
                  f'(runs: updated {", ".join(f"{w.updated:.2f}" for w in works)}; WAL '
                  f'{", ".join(f"{w.wal_bytes:,.0f}" for w in works)})')
    print(f'{what}, median {statistics.median(figures):{form}} {unit} (runs: '
          f'{", ".join(f"{figure:{form}}" for figure in figures)})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
