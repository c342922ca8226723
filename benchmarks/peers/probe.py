"""The peers' completion counter in Redis, made as cheap per task as it can be.

A Redis round trip costs ~90 us of CPU in a gevent worker: doing one per task would add a
third to Dramatiq's per-task cost and flatter carrot. So a finished task only bumps an
in-process counter, and one greenlet flushes it with INCRBY at most every FLUSH_DELAY
seconds while tasks are finishing (none runs while the worker is idle, so the idle-CPU
workload is untouched). The harness therefore sees a completion at most FLUSH_DELAY late.

Both peer workers run gevent-patched (celery -P gevent, dramatiq-gevent).
"""

from __future__ import annotations

import time

import gevent
import redis

FLUSH_DELAY = 0.005

_client = redis.Redis(host='127.0.0.1', port=6379)
_pending = 0
_flush_scheduled = False
_stamped = False


def done(system: str) -> None:
    """Count one finished task for ``system``."""
    global _pending, _flush_scheduled
    _pending += 1  # no yield between read and write: safe among greenlets
    if not _flush_scheduled:
        _flush_scheduled = True
        gevent.spawn_later(FLUSH_DELAY, _flush, system)


def _flush(system: str) -> None:
    global _pending, _flush_scheduled
    delta, _pending = _pending, 0
    _flush_scheduled = False  # tasks finishing during the INCRBY schedule the next flush
    _client.incrby(f'bench:{system}:done', delta)


def first_start(system: str) -> None:
    """Stamp when the first task started; once per process, so it costs one round trip."""
    global _stamped
    if not _stamped:
        _stamped = True
        _client.set(f'bench:{system}:first_start', repr(time.time()), nx=True)
