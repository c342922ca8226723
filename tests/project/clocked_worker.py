"""The carrot worker with a scheduler clock that starts at CARROT_TEST_CLOCK (ISO 8601).

Started by a test in place of ``manage.py carrot`` to reach a cron schedule's minute
without waiting for it: the clock starts at the given time and runs at the real rate.
Importing carrot.worker.main monkey-patches first, as usual.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tests.project.settings')

import time  # noqa: E402
from datetime import datetime, timedelta  # noqa: E402

import django  # noqa: E402

from carrot.worker import main as worker_main  # noqa: E402  (patches before anything else)

django.setup()

from carrot.worker import scheduler  # noqa: E402

START = datetime.fromisoformat(os.environ['CARROT_TEST_CLOCK'])
STARTED = time.monotonic()


def test_clock() -> datetime:
    return START + timedelta(seconds=time.monotonic() - STARTED)


scheduler.current_time = test_clock

if __name__ == '__main__':
    sys.exit(worker_main.main(sys.argv[1:]))
