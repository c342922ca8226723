"""The README's first command: the demo runs tasks end to end and stops cleanly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Broker

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo_queue(broker: Broker) -> Iterator[str]:
    broker.created.append('carrot_demo')  # deleted after the test
    yield 'carrot_demo'


def test_the_demo_publishes_runs_shows_and_stops(demo_queue: str) -> None:
    env = {k: v for k, v in os.environ.items()
           if k != 'DJANGO_SETTINGS_MODULE' and not k.startswith('CARROT_TEST_')}
    result = subprocess.run([sys.executable, str(ROOT / 'examples' / 'demo' / 'run.py')],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert 'demo.tasks.add     COMPLETED  5' in out
    assert '"Good morning, Ada!"' in out and 'log: greeting Ada' in out
    assert 'FAILED     ZeroDivisionError: division by zero' in out
    assert 'demo.tasks.add x10 COMPLETED: 10 of 10' in out
    assert 'service exited with status 0' in out
    runs = re.search(r"scheduled task 'every-second': (\d+) runs so far, (\d+) COMPLETED", out)
    assert runs and int(runs[2]) >= 2, out
