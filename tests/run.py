#!/usr/bin/env python3
"""Run the whole test suite: ``python3 tests/run.py`` (extra arguments go to pytest).

Installs what the tests need into .venv, makes sure RabbitMQ (and, for the PostgreSQL leg,
PostgreSQL) answers and that Chromium is installed for the browser tests, then runs pytest
on SQLite (everything, with lint, type check, docs build and migrations check) and the
database-bound tests again on PostgreSQL.

CARROT_TEST_DJANGO (a requirement such as ``django>=6.0,<6.1``) and CARROT_VENV (another
virtualenv folder) run the suite against another Django. CARROT_SQLITE_LEG=rest leaves the
PostgreSQL leg's tests out of the SQLite leg, so that each test runs once (CI's second
Django).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.bootstrap import (  # noqa: E402
    ROOT,
    ensure_chromium,
    ensure_postgresql,
    ensure_rabbitmq,
    say,
    venv_python,
)

POSTGRESQL_LEG = ['tests/test_publish.py', 'tests/test_worker.py', 'tests/test_database.py',
                  'tests/test_registry.py', 'tests/test_schedules.py', 'tests/test_scheduler.py',
                  'tests/test_monitor.py', 'tests/test_monitor_api.py', 'tests/test_outage.py',
                  'tests/test_delivery.py', 'tests/test_outbox.py', 'tests/test_retries.py',
                  'tests/test_delays.py', 'tests/test_deadletters.py', 'tests/test_prune.py',
                  'tests/test_task_backend.py', 'tests/test_health.py', 'tests/test_overview.py',
                  'tests/test_monitor_queues.py', 'tests/test_monitor_schedules.py',
                  'tests/test_together.py']


def main() -> int:
    django = os.environ.get('CARROT_TEST_DJANGO')
    python = venv_python([ROOT / 'tests' / 'requirements.txt'], [django] if django else [])
    ensure_rabbitmq()
    ensure_chromium()
    pytest = [str(python), '-m', 'pytest', *sys.argv[1:]]

    rest = os.environ.get('CARROT_SQLITE_LEG') == 'rest' and not sys.argv[1:]
    say('Tests on SQLite' + (' (those the PostgreSQL leg does not run)' if rest else ''))
    leave_out = [f'--ignore={path}' for path in POSTGRESQL_LEG] if rest else []
    code = subprocess.run([*pytest, *leave_out], cwd=ROOT,
                          env={**os.environ, 'CARROT_TEST_DB': 'sqlite'}).returncode
    if code != 0:
        return code
    if sys.argv[1:]:
        return 0  # a chosen subset: one leg is enough
    if not ensure_postgresql():
        if os.environ.get('CARROT_REQUIRE_POSTGRESQL') or rest:  # rest: they would run nowhere
            print('PostgreSQL is not answering on 127.0.0.1:5432.', file=sys.stderr)
            return 1
        say('PostgreSQL is not answering on 127.0.0.1:5432: skipping the PostgreSQL leg')
        return 0
    say('Database-bound tests on PostgreSQL')
    return subprocess.run(
        [*pytest, *POSTGRESQL_LEG], cwd=ROOT,
        env={**os.environ, 'CARROT_TEST_DB': 'postgresql'},
    ).returncode


if __name__ == '__main__':
    sys.exit(main())
