"""The carrot side of the benchmark: the same two tasks the peers run."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

try:
    import redis
except ImportError:  # the first-start stamp is optional; carrot itself needs no Redis
    redis = None

FIRST_START_KEY = 'bench:carrot:first_start'
_probe = redis.Redis(host='127.0.0.1', port=6379) if redis is not None else None
_stamped = False


def noop() -> None:
    """Does nothing: completion is observed through the MessageLog row (COMPLETED)."""


def sleep50() -> None:
    _stamp_first_start()
    time.sleep(0.05)  # the worker is gevent-patched: this yields


def counted_noop() -> None:
    """The untracked run's no-op: it leaves no row, so it reports through the peers' own
    completion counter, at the same cost to the worker as theirs."""
    _peers_probe().done('carrot_untracked')


def counted_sleep50() -> None:
    probe = _peers_probe()
    probe.first_start('carrot_untracked')
    time.sleep(0.05)
    probe.done('carrot_untracked')


@functools.cache
def _peers_probe() -> Any:
    """peers/probe.py, imported on first use (the tracked run needs no Redis counter)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'peers'))
    import probe

    return probe


def _stamp_first_start() -> None:
    """The first-start stamp the peers' sleep50 writes too (peers/probe.py), and like them
    once per worker process, so it costs one Redis round trip per run, not one per task."""
    global _stamped
    if _probe is None or _stamped:
        return
    _stamped = True
    try:
        _probe.set(FIRST_START_KEY, repr(time.time()), nx=True)
    except redis.RedisError:
        pass
