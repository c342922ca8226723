"""This process as carrot's rows name it."""

from __future__ import annotations

import os
import socket

_cached: list[object] = [0, '']  # (pid, id): a forked daemon has a pid of its own


def worker_id() -> str:
    """This process as the rows it starts and ends name it: ``host:pid`` (the host name cut
    so that the whole fits MessageLog.worker's 200 characters)."""
    pid = os.getpid()
    if _cached[0] != pid:
        _cached[:] = [pid, f'{socket.gethostname()[:180]}:{pid}']
    return str(_cached[1])
