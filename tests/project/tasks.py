"""Tasks the tests publish. The worker is monkey-patched, so time.sleep yields."""

from __future__ import annotations

import logging
import os
import time
from os import getcwd  # noqa: F401  (imported, not defined here: must not be runnable)
from typing import Any

logger = logging.getLogger('carrot.tests')


def add(a: int, b: int) -> int:
    return a + b


def noop() -> None:
    return None


def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {'args': list(args), 'kwargs': kwargs}


def fail(message: str = 'boom') -> None:
    raise ValueError(message)


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def log_lines(tag: str, count: int = 3, pause: float = 0.01) -> str:
    """Logs ``count`` lines tagged ``tag``, yielding between them so tasks interleave."""
    for index in range(count):
        logger.info('line %d of %s', index, tag)
        time.sleep(pause)
    return tag


def not_json() -> object:
    return object()


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError('this output cannot be printed')


def unprintable() -> object:
    """Returns what is neither JSON nor printable."""
    return _Unprintable()


def open_undecodable(fail: bool) -> str:
    """Logs (and raises with) a file name Python could not decode: it holds a lone surrogate."""
    name = b'caf\xe9.txt'.decode('utf-8', 'surrogateescape')
    logger.info('opening %s', name)
    if fail:
        raise FileNotFoundError(f'no such file: {name}')
    return name


def touch(path: str, seconds: float = 0.0) -> str:
    """Appends a line to ``path`` each time it runs (to count runs), after sleeping."""
    time.sleep(seconds)
    with open(path, 'a') as handle:
        handle.write(f'{os.getpid()}\n')
    return path


def record_run(path: str, tag: str, seconds: float = 0.0) -> str:
    """Sleeps, then appends ``tag`` to ``path``: a line each time it runs, to count the runs."""
    time.sleep(seconds)
    with open(path, 'a') as handle:
        handle.write(f'{tag}\n')
    return tag


class NotAFunction:
    pass


def use_database(name: str) -> int:
    """Reads and writes the database, as many real tasks do."""
    from carrot.models import ScheduledTask

    # Inactive: a table to write to, not schedules for the service's scheduler to run.
    ScheduledTask.objects.create(task_name=name, task='tests.project.tasks.noop', active=False)
    time.sleep(0.02)
    return ScheduledTask.objects.filter(task_name=name).count()


def compute(seconds: float) -> float:
    """Burns CPU without yielding, blocking the gevent hub."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return seconds


def exit_process() -> None:
    """Calls sys.exit(), which must fail the task, not stop the worker."""
    import sys

    sys.exit(3)


def nul_text() -> str:
    """Logs and returns text with NUL characters, which PostgreSQL refuses."""
    logger.info('before\x00after')
    return 'out\x00put'


# -- retries, time limits ----------------------------------------------------------------
# ``carrot.options`` and ``carrot.exceptions`` import neither Django nor gevent, so this
# module still imports before the worker monkey-patches.
from carrot.exceptions import Retry  # noqa: E402
from carrot.options import task_options  # noqa: E402


def _run_number(path: str) -> int:
    """Appends the time of this run to ``path``; which run this is, from 1."""
    with open(path, 'a') as handle:
        handle.write(f'{time.time()}\n')
    with open(path) as handle:
        return len(handle.read().splitlines())


def flaky(path: str, failures: int) -> int:
    """Fails its first ``failures`` runs, then returns the number of its run."""
    run = _run_number(path)
    if run <= failures:
        raise ConnectionError(f'run {run} of {failures} that fail')
    return run


@task_options(max_retries=2, retry_backoff=1.0, retry_backoff_max=1.5,
              on_retries_exhausted='tests.project.tasks.note_exhausted')
def always_fails(path: str) -> None:
    """Fails every run; retried twice, 0.5 to 1.5 s apart."""
    run = _run_number(path)
    raise ConnectionError(f'run {run} fails too')


def note_exhausted(message_id: str, error: BaseException) -> None:
    """``on_retries_exhausted`` of always_fails: writes where the test said."""
    with open(os.environ['CARROT_TEST_HOOK_FILE'], 'a') as handle:
        handle.write(f'{message_id} {type(error).__name__}\n')


@task_options(max_retries=1, retry_backoff=0.1,
              on_retries_exhausted='tests.project.tasks.report_when_let')
def fails_and_reports_late() -> None:
    """Fails twice (retried once at once); its hook waits before it reports."""
    raise ConnectionError('reported late')


def report_when_let(message_id: str, error: BaseException) -> None:
    """``on_retries_exhausted`` that waits (up to 60 s) for the file CARROT_TEST_HOOK_FILE
    names plus ``.gate``, then writes the message id to CARROT_TEST_HOOK_FILE."""
    hook = os.environ['CARROT_TEST_HOOK_FILE']
    deadline = time.monotonic() + 60
    while not os.path.exists(f'{hook}.gate') and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(hook, 'w') as handle:
        handle.write(message_id)


@task_options(max_retries=3, dont_retry_for=[KeyError])
def fails_for_good(path: str) -> None:
    """Raises an error its options never retry."""
    _run_number(path)
    raise KeyError('not worth retrying')


@task_options(max_retries=1)
def asks_for_retry(path: str, delay: float) -> int:
    """Asks to run again ``delay`` seconds later on its first run."""
    run = _run_number(path)
    if run == 1:
        raise Retry('not yet', delay=delay)
    return run


@task_options(time_limit=1)
def overruns(path: str, seconds: float) -> None:
    """Sleeps past its time limit of 1 s, unless stopped."""
    _run_number(path)
    time.sleep(seconds)
    with open(path, 'a') as handle:
        handle.write('not stopped\n')


def runs_at(path: str) -> int:
    """Notes the time it runs."""
    return _run_number(path)
