"""The carrot worker with a database that takes half a second per batch of task ends.

Started by a test in place of ``manage.py carrot`` to widen the window between a task's end
and its acknowledgement. Importing carrot.worker.main monkey-patches first, as usual.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tests.project.settings')

import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import django  # noqa: E402

from carrot.worker import main as worker_main  # noqa: E402  (patches before anything else)

django.setup()

from carrot import lifecycle  # noqa: E402

_finish_many = lifecycle.finish_many


def slow_finish_many(finishes: Sequence[lifecycle.Finish]) -> dict[str, lifecycle.Started]:
    time.sleep(0.5)
    return _finish_many(finishes)


lifecycle.finish_many = slow_finish_many

if __name__ == '__main__':
    sys.exit(worker_main.main(sys.argv[1:]))
