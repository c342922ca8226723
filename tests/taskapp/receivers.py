"""Receivers of the task framework's signals that write what they saw to the file named by
CARROT_TEST_SIGNALS, one JSON line each (the worker runs in another process)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from carrot import _django_tasks as framework


def _write(signal: str, sender: type, task_result: Any, **_: Any) -> None:
    path = os.environ.get('CARROT_TEST_SIGNALS')
    if not path:
        return
    line = {'signal': signal, 'sender': f'{sender.__module__}.{sender.__qualname__}',
            'id': task_result.id, 'status': str(task_result.status),
            'exc_info': sys.exc_info()[0].__name__ if sys.exc_info()[0] else None,
            'pid': os.getpid()}
    with open(path, 'a') as file:
        file.write(json.dumps(line) + '\n')


def _enqueued(sender: type, task_result: Any, **kwargs: Any) -> None:
    _write('enqueued', sender, task_result)


def _started(sender: type, task_result: Any, **kwargs: Any) -> None:
    _write('started', sender, task_result)


def _finished(sender: type, task_result: Any, **kwargs: Any) -> None:
    _write('finished', sender, task_result)


framework.task_enqueued.connect(_enqueued, dispatch_uid='carrot-tests-enqueued')
framework.task_started.connect(_started, dispatch_uid='carrot-tests-started')
framework.task_finished.connect(_finished, dispatch_uid='carrot-tests-finished')
