"""The one greenlet that writes task starts and ends to the database, in batches.

Consumers hand it their writes and wait for them to be committed before they run the task
or acknowledge the message. Whatever piles up while one batch is written goes in the next,
so the cost per task falls as the load rises, and carrot holds one database connection for
its own bookkeeping however many consumers run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gevent
from django.db import DatabaseError, connections
from gevent.event import AsyncResult, Event

from carrot import lifecycle

logger = logging.getLogger('carrot.recorder')

BATCH_LIMIT = 500
RETRY_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)


class RecordingFailed(Exception):
    """The database refused the write after every retry."""


@dataclass
class _Job:
    kind: str  # 'start' or 'finish'
    item: Any
    result: AsyncResult = field(default_factory=AsyncResult)


class Recorder:
    def __init__(self) -> None:
        self._pending: list[_Job] = []
        self._wakeup = Event()
        self._stopping = False
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is pending, then stop."""
        self._stopping = True
        self._wakeup.set()
        if self._greenlet is not None:
            self._greenlet.join(timeout)
            self._greenlet.kill()

    def record_start(self, start: lifecycle.Start) -> lifecycle.Started:
        """Mark a message IN_PROGRESS (creating its row if needed); waits for the commit."""
        return self._submit('start', start)  # type: ignore[no-any-return]

    def record_finish(self, finish: lifecycle.Finish) -> None:
        """Write how a task ended; waits for the commit."""
        self._submit('finish', finish)

    def _submit(self, kind: str, item: Any) -> Any:
        if self._greenlet is None or self._greenlet.dead:
            raise RecordingFailed('the recorder is not running')
        job = _Job(kind, item)
        self._pending.append(job)
        self._wakeup.set()
        return job.result.get()

    def _run(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch, self._pending = self._pending[:BATCH_LIMIT], self._pending[BATCH_LIMIT:]
                self._write(batch)
            if self._stopping:
                connections.close_all()
                return

    def _write(self, batch: list[_Job]) -> None:
        starts = [job for job in batch if job.kind == 'start']
        finishes = [job for job in batch if job.kind == 'finish']
        for jobs, write in ((starts, lifecycle.start_many), (finishes, lifecycle.finish_many)):
            if jobs:
                self._write_with_retries(jobs, write)

    def _write_with_retries(
        self, jobs: list[_Job], write: Callable[[Sequence[Any]], Any]
    ) -> None:
        items = [job.item for job in jobs]
        for delay in (*RETRY_DELAYS, None):
            try:
                results = write(items)
            except DatabaseError as error:
                # Reconnect on the next try, in case the connection itself broke.
                connections[lifecycle.database()].close()
                if delay is None:
                    failure = RecordingFailed(f'{type(error).__name__}: {error}')
                    for job in jobs:
                        job.result.set_exception(failure)
                    return
                logger.warning('Writing %d task record(s) failed (%s); retrying in %.1f s',
                               len(jobs), error, delay)
                gevent.sleep(delay)
            else:
                for index, job in enumerate(jobs):
                    job.result.set(results[index] if results is not None else None)
                return
