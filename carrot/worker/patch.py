"""Monkey-patching, which must come before Django, the database driver and ssl load.

Patched late, a library that captured the unpatched ``socket``, ``ssl`` or ``threading``
blocks the whole gevent hub (and gevent warns with MonkeyPatchWarning), so the worker runs
this as the first thing in a fresh interpreter.
"""

from __future__ import annotations

import sys

# Modules that must not be imported yet when patching happens.
MUST_COME_AFTER = ('django', 'ssl', 'psycopg', 'psycopg2', 'MySQLdb', 'sqlite3', 'amqpstorm')
PATCHED = ('socket', 'ssl', 'threading', 'time', 'select')


def patch_all() -> list[str]:
    """Monkey-patch with gevent; the list of modules that were (wrongly) imported before."""
    early = [name for name in MUST_COME_AFTER if name in sys.modules]
    from gevent import monkey

    monkey.patch_all()
    return early


def patched_modules() -> dict[str, bool]:
    """Which of the modules that matter are patched now."""
    from gevent import monkey

    return {name: bool(monkey.is_module_patched(name)) for name in PATCHED}
