"""Benchmark carrot against Celery and Dramatiq on the same RabbitMQ, in the same run.

    python3 benchmarks/run.py [--quick] [--only carrot|celery|dramatiq] [--repeat 3]

Every system publishes with the same shapes (one caller, and 50 callers); see README.md for
the workloads. Prints a table of medians, carrot's ratio to each peer and the targets, and
writes benchmarks/last-report-<database>.md. BENCH_DB=sqlite runs carrot on SQLite.
"""

from __future__ import annotations

import os
import sys

if __name__ == '__main__':
    from bootstrap import into_bench_venv

    into_bench_venv(__file__)

import argparse  # noqa: E402
import importlib  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from typing import Any  # noqa: E402

from common import BENCH_DIR, LOG_DIR, Adapter, kill_all_started  # noqa: E402
from report import Results, environment_lines, write_report  # noqa: E402
from workloads import Config, clean, log, steps_for  # noqa: E402

SYSTEMS = ('carrot', 'carrot_untracked', 'celery', 'dramatiq')
# The machine is shared: another session may restart RabbitMQ under us. One retry per
# workload keeps such a blip from costing a whole data point.
ATTEMPTS = 2


def load_adapter(name: str) -> Adapter:
    adapter: Adapter = importlib.import_module(f'{name}_adapter').ADAPTER
    return adapter


def measure_system(adapter: Adapter, config: Config, tag: str, results: Results) -> None:
    """One repeat of every workload for one system; a failed workload is logged and retried
    once, then skipped."""
    for step in steps_for(adapter, config, tag):
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


def parse_args(argv: list[str]) -> Config:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true',
                        help='smaller workloads (1,000 tasks per flood, 2,000 in the backlog, '
                             '500 confirmed publishes, 5 s idle sample, 900 paced tasks)')
    parser.add_argument('--only', choices=SYSTEMS,
                        help='benchmark one system (the pika reference still runs)')
    parser.add_argument('--repeat', type=int, default=3,
                        help='runs of every workload; medians are reported (default 3)')
    parser.add_argument('--tasks', type=int,
                        help='no-op tasks per flood in (a) (default 5000, 1000 with --quick)')
    args = parser.parse_args(argv)
    return Config(
        e2e_tasks=args.tasks or (1000 if args.quick else 5000),
        backlog_tasks=2000 if args.quick else 10_000,
        idle_seconds=5.0 if args.quick else 10.0,
        confirm_publishes=500 if args.quick else 2000,
        paced_tasks=900 if args.quick else 3000,
        repeat=max(1, args.repeat),
        systems=(args.only,) if args.only else SYSTEMS,
    )


def _terminate(signum: int, _frame: Any) -> None:
    # Turn SIGTERM/SIGHUP into an exception so every finally: block (worker kills) runs.
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    config = parse_args(argv)
    database = 'sqlite' if os.environ.get('BENCH_DB') == 'sqlite' else 'postgresql'
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = time.monotonic()
    adapters = {name: load_adapter(name) for name in (*config.systems, 'pika')}
    results: Results = defaultdict(lambda: defaultdict(list))
    log(f'carrot on {database}; logs of workers and publishers: {LOG_DIR}')
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
    path = BENCH_DIR / f'last-report-{database}.md'
    text = write_report(path, results, config, env_lines, time.monotonic() - started, argv,
                        database)
    print()
    print(text)
    print(f'\nMarkdown report: {path}')
    failures = sum(len(m.get('_failures', [])) for m in results.values())
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
