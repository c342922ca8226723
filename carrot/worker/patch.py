"""Monkey-patching, which must come before Django, the database driver and ssl load.

Patched late, a library that captured the unpatched ``socket``, ``ssl`` or ``threading``
blocks the whole gevent hub (and gevent warns with MonkeyPatchWarning), so the worker runs
this as the first thing in a fresh interpreter.
"""

from __future__ import annotations

import sys
import warnings

# Modules that must not be imported yet when patching happens.
MUST_COME_AFTER = ('django', 'ssl', 'psycopg', 'psycopg2', 'MySQLdb', 'sqlite3', 'amqpstorm')
PATCHED = ('socket', 'ssl', 'threading', 'time', 'select')
# A task that computes this long without yielding stalls every other task and the broker
# heartbeats; gevent's monitor thread notices and the service logs a warning.
MAX_BLOCKING_SECONDS = 1.0


def patch_all() -> list[str]:
    """Monkey-patch with gevent; the list of modules that were (wrongly) imported before."""
    early = [name for name in MUST_COME_AFTER if name in sys.modules]
    import gevent
    from gevent import monkey

    gevent.config.monitor_thread = True
    gevent.config.max_blocking_time = MAX_BLOCKING_SECONDS
    # carrot watches blocking only; gevent would warn that it cannot watch memory without
    # psutil, which carrot does not need.
    warnings.filterwarnings('ignore', message='Unable to monitor memory usage')
    monkey.patch_all()
    return early


def patched_modules() -> dict[str, bool]:
    """Which of the modules that matter are patched now."""
    from gevent import monkey

    return {name: bool(monkey.is_module_patched(name)) for name in PATCHED}
