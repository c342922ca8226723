"""Run a benchmark script in .venv-bench, with the peers installed and the servers answering.

So that ``python3 benchmarks/run.py`` (or ``scale.py``) is the one command, on a fresh
machine too. ``CARROT_BENCH_VENV`` names another virtualenv folder;
``CARROT_BENCH_NO_BOOTSTRAP=1`` runs the script where it is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def into_bench_venv(script: str) -> None:
    """Re-run ``script`` in .venv-bench once RabbitMQ, Redis and PostgreSQL answer."""
    if os.environ.get('CARROT_BENCH_NO_BOOTSTRAP'):
        return
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests.bootstrap import ensure_postgresql, ensure_rabbitmq, ensure_redis, venv_python

    folder = Path(os.environ.get('CARROT_BENCH_VENV', root / '.venv-bench'))
    python = venv_python([root / 'benchmarks' / 'requirements.txt'], folder=folder)
    ensure_rabbitmq()
    if not ensure_redis():
        sys.exit('Redis is not answering on 127.0.0.1:6379 (the peers count completions there).')
    if not ensure_postgresql():
        sys.exit('PostgreSQL is not answering on 127.0.0.1:5432 (carrot records tasks there; '
                 'BENCH_DB=sqlite uses a SQLite file instead).')
    if Path(sys.prefix).resolve() != folder.resolve():
        os.execv(str(python), [str(python), script, *sys.argv[1:]])
