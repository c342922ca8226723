"""Publisher subprocess: publish tasks for one system and print one JSON line of timings.

    publisher.py SYSTEM bulk TASK COUNT [--concurrency N] [--confirm]
    publisher.py SYSTEM latency TASK COUNT [--concurrency N] [--confirm] [--warmup W]
    publisher.py carrot atomic TASK COUNT [--together]
        (COUNT calls in one transaction.atomic(); --together: inside publish_together())

With --gevent (the 50-caller shape) gevent patches everything before anything else is
imported; one caller runs unpatched for every system, as a management command or a web
request publishes.
"""

# Patch first: nothing may import socket/threading/ssl before this.
import sys

_GEVENT = '--gevent' in sys.argv
if _GEVENT:
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument('system',
                        choices=['carrot', 'carrot_untracked', 'celery', 'dramatiq', 'pika'])
    parser.add_argument('mode', choices=['bulk', 'latency', 'atomic'])
    parser.add_argument('task', choices=['noop', 'sleep50'])
    parser.add_argument('count', type=int)
    parser.add_argument('--concurrency', type=int, default=1)
    parser.add_argument('--confirm', action='store_true')
    parser.add_argument('--warmup', type=int, default=0)
    parser.add_argument('--gevent', action='store_true')
    parser.add_argument('--together', action='store_true')
    return parser.parse_args()


def run_calls(publish: Callable[[], None], count: int, concurrency: int) -> list[float]:
    """Call ``publish`` ``count`` times, ``concurrency`` at a time; per-call durations."""
    durations: list[float] = []

    def one() -> None:
        started = time.perf_counter()
        publish()
        durations.append(time.perf_counter() - started)

    if concurrency <= 1:
        for _ in range(count):
            one()
        return durations
    if not _GEVENT:
        raise SystemExit('--concurrency > 1 needs --gevent')
    import gevent

    # A fixed set of long-lived greenlets, not one greenlet per call: per-greenlet state
    # (Django's database connection, Dramatiq's channel) must be made once, not per message.
    remaining = iter(range(count))

    def caller() -> None:
        for _ in remaining:  # shared iterator: greenlets take turns, no locking needed
            one()

    callers = [gevent.spawn(caller) for _ in range(concurrency)]
    gevent.joinall(callers, raise_error=True)
    if len(durations) != count:
        raise RuntimeError(f'only {len(durations)} of {count} publishes succeeded')
    return durations


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(pct / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def _cpu_seconds() -> float:
    """CPU this process has used so far, all its threads, user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> dict[str, Any]:
    args = parse_args()
    adapter = importlib.import_module(f'{args.system}_adapter')
    # Everything slow and one-off (imports, Django set-up, connecting) happens here,
    # before the clock starts.
    publish = adapter.make_publisher(args.task, args.confirm)
    # Confirmed publishes: carrot's calls return before their confirms (its committed rows
    # keep the promise), so the clock runs on until every confirm is recorded.
    finish = getattr(adapter, 'finish_publishing', None) if args.confirm else None
    if args.warmup:
        run_calls(publish, args.warmup, 1)
    if args.mode == 'atomic':
        # The clock stops when the commit returns: carrot sends on commit and returns once
        # RabbitMQ has confirmed every message.
        with adapter.one_transaction(together=args.together):
            cpu0 = _cpu_seconds()
            t0 = time.time()
            durations = run_calls(publish, args.count, 1)
        t1 = time.time()
    else:
        cpu0 = _cpu_seconds()
        t0 = time.time()
        durations = run_calls(publish, args.count, args.concurrency)
        if finish is not None:
            finish()
        t1 = time.time()
    cpu = _cpu_seconds() - cpu0
    result: dict[str, Any] = {
        't0': t0, 't1': t1, 'count': args.count, 'seconds': t1 - t0,
        'rate': args.count / (t1 - t0), 'concurrency': args.concurrency, 'cpu_seconds': cpu,
    }
    if args.mode == 'latency':
        durations_ms = [d * 1000 for d in durations]
        result.update(
            p50_ms=percentile(durations_ms, 50), p99_ms=percentile(durations_ms, 99),
            max_ms=max(durations_ms),
        )
    return result


if __name__ == '__main__':
    try:
        output = main()
        code = 0
    except BaseException as exc:  # report anything, even SystemExit, as a JSON error
        traceback.print_exc()
        output = {'error': f'{type(exc).__name__}: {exc}'}
        code = 1
    print(json.dumps(output), flush=True)
    sys.exit(code)
