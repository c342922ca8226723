"""The one greenlet that writes task starts and ends to the database, in batches.

Consumers hand it a start before they run a task and an end after it, and go on; whatever
piles up while one batch is written goes in the next, so the cost per task falls as the load
rises, and the bookkeeping of starts and ends holds one database connection however many
consumers run. A start is held back for START_HOLD_SECONDS: a task that ends within that
time has its start and end written by one UPDATE, half the database work of a short task.

Once a batch of ends is committed the recorder settles each message: ack (the batch's acks
in one socket write a connection), or, when the database refuses the rows themselves, a
requeue. So the database is never on a consumer's critical path, and a message is still
never acknowledged before its end is recorded.

While the database is unreachable, a write something waits for (an end, whose message stays
unacknowledged; a start a consumer waits for) is retried until it is written, so a task
that ran is not handed back to run again; only the service's stop ends the wait. A start
nobody waits for gives up after RETRY_DELAYS, and its task's end is written with it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import gevent
from django.db import DataError, IntegrityError, connections
from django.db import Error as DatabaseFault
from gevent.event import AsyncResult, Event

from carrot import lifecycle
from carrot.amqp import acks_together
from carrot.models import MessageLog

logger = logging.getLogger('carrot.recorder')

BATCH_LIMIT = 500
# How long a start waits for its end before it is written on its own (in the next batch
# after that): a task shorter than this has its start and end written by one UPDATE.
START_HOLD_SECONDS = 0.2
# Between tries of a write the database did not take; a write retried until it is written
# goes on at the last delay.
RETRY_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)

# A round that would write fewer ends than GATHER_BELOW waits this long for more first: at
# a low rate of tasks each end would otherwise cost a round trip and a commit of its own.
END_GATHER_SECONDS = 0.004
GATHER_BELOW = 16

# How long stop() waits for the greenlet to die once its timeout has passed.
KILL_TIMEOUT_SECONDS = 5.0

Settle = Callable[[bool], None]
Written = TypeVar('Written')


class RecordingFailed(Exception):
    """The database refused the write, or was unreachable through every retry.

    ``bad_data``: it refused the rows themselves (not a lost connection), so writing them one
    by one isolates the bad one instead of failing the whole batch.
    """

    def __init__(self, reason: str, bad_data: bool = False) -> None:
        super().__init__(reason)
        self.bad_data = bad_data


@dataclass
class _StartJob:
    start: lifecycle.Start
    due: float  # time.monotonic() from which it is written even if its task is still running
    urgent: bool = False  # a consumer waits for it: retried until the database takes it
    result: AsyncResult = field(default_factory=AsyncResult)


@dataclass
class _FinishJob:
    started: AsyncResult  # of the task's _StartJob, written in an earlier or the same batch
    start: lifecycle.Start  # written with the end when ``started`` failed
    finish: lifecycle.Finish  # its pk is filled in from ``started``
    settle: Settle
    result: AsyncResult = field(default_factory=AsyncResult)


@dataclass
class _Ending:
    """A finish ready to write; ``start`` when its start is written with it."""

    job: _FinishJob
    finish: lifecycle.Finish
    start: _StartJob | None = None
    texts_dropped: bool = False

    def without_texts(self, error: RecordingFailed) -> _Ending | None:
        """This end with what the task returned, logged and raised replaced by a note.

        The last resort for an end the database refuses: the row still gets its status and
        the message its ack, instead of coming back (and running again) without end.
        None when the texts were dropped already.
        """
        if self.texts_dropped:
            return None
        note = (f'carrot could not store what this task returned, logged or raised, and '
                f'dropped it: {error}')
        failed = self.finish.status == MessageLog.FAILED
        finish = replace(self.finish, output=None, log=note, traceback=None,
                         exception=note if failed else None)
        return replace(self, finish=finish, texts_dropped=True)


class Recorder:
    def __init__(self) -> None:
        self._starts: list[_StartJob] = []
        self._finishes: list[_FinishJob] = []
        self._wakeup = Event()
        self._stopping = False
        self._healthy = True
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    @property
    def greenlet(self) -> gevent.Greenlet | None:
        """The greenlet that writes the rows, once started."""
        return self._greenlet

    def stop(self, timeout: float = 30.0) -> None:
        """Write and settle what is pending, then stop.

        Past ``timeout`` the greenlet is killed, retries and all: what it did not settle
        stays unacknowledged, and goes back to its queue when the service closes its links.
        """
        self._stopping = True
        self._wakeup.set()
        if self._greenlet is not None:
            self._greenlet.join(timeout)
            self._greenlet.kill(timeout=KILL_TIMEOUT_SECONDS)

    def record_start(self, start: lifecycle.Start, urgent: bool = False) -> AsyncResult:
        """Queue the IN_PROGRESS write; ``.get()`` on the result gives a lifecycle.Started.

        It is written in the first batch after START_HOLD_SECONDS, or with the task's end if
        that comes first; ``urgent`` (the caller will wait for it) in the next batch.
        """
        self._check_running()
        job = _StartJob(start, due=time.monotonic() + (0.0 if urgent else START_HOLD_SECONDS),
                        urgent=urgent)
        self._starts.append(job)
        if urgent or len(self._starts) == 1:
            self._wakeup.set()  # otherwise the recorder is already waiting for an earlier one
        return job.result

    def discard_start(self, started: AsyncResult) -> bool:
        """Drop a start still held back, for a message settled without an end.

        Written later, it would turn the row that message got (FAILED, say) IN_PROGRESS.
        False when it is no longer held: written already, or taken by the round being
        written, in which case the caller waits for ``started`` before writing the row.
        """
        before = len(self._starts)
        self._starts = [job for job in self._starts if job.result is not started]
        return len(self._starts) < before

    def record_finish(self, started: AsyncResult, finish: lifecycle.Finish,
                      settle: Settle, *, start: lifecycle.Start) -> AsyncResult:
        """Queue the end of a task; ``settle(recorded)`` is called once it is committed or not.

        ``start`` is what ``started`` was recorded from: the end is written with it if that
        write failed. ``.get()`` on the result waits for the commit (and raises
        RecordingFailed).
        """
        self._check_running()
        job = _FinishJob(started, start, finish, settle)
        self._finishes.append(job)
        self._wakeup.set()
        return job.result

    def _check_running(self) -> None:
        if self._greenlet is None or self._greenlet.dead:
            raise RecordingFailed('the recorder is not running')

    @property
    def healthy(self) -> bool:
        """False from a failed write until the next one that succeeds."""
        return self._healthy

    def _run(self) -> None:
        while True:
            self._wakeup.wait(self._until_next_start())
            self._wakeup.clear()
            self._gather()
            while self._finishes or self._until_next_start() == 0.0:
                try:
                    self._write_round()
                except Exception:  # a bug here must not stop every acknowledgement
                    logger.exception('The recorder failed a round; going on')
            if self._stopping:
                connections.close_all()
                return

    def _gather(self) -> None:
        """Let a round of few ends wait END_GATHER_SECONDS for more, unless a consumer
        waits for a start or the service is stopping."""
        deadline = time.monotonic() + END_GATHER_SECONDS
        while (0 < len(self._finishes) < GATHER_BELOW and not self._stopping
               and not any(job.urgent for job in self._starts)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.wait(remaining)
            self._wakeup.clear()

    def _until_next_start(self) -> float | None:
        """Seconds until the earliest queued start is due (0.0 when stopping); None if none."""
        if not self._starts:
            return None
        if self._stopping:
            return 0.0
        return max(0.0, min(job.due for job in self._starts) - time.monotonic())

    def _write_round(self) -> None:
        # Ends first: a redelivered message's start then sees its earlier run's end.
        finishes, self._finishes = self._finishes[:BATCH_LIMIT], self._finishes[BATCH_LIMIT:]
        # ... and an end left for a later round goes before a start of the same message.
        ending_later = {job.finish.message_id for job in self._finishes}
        # A task that ended while its start was still queued: one write records both.
        queued = {id(job.result): job for job in self._starts}
        together = {id(job): queued.pop(id(job.started)) for job in finishes
                    if id(job.started) in queued}
        now = time.monotonic()
        due: list[_StartJob] = []
        held: list[_StartJob] = []
        for job in self._starts:
            if id(job.result) not in queued:
                continue  # written with its end
            ready = ((job.due <= now or self._stopping)
                     and job.start.message_id not in ending_later)
            (due if ready and len(due) < BATCH_LIMIT else held).append(job)
        self._starts = held
        try:
            if finishes:
                self._write_finishes(finishes, together)
        except Exception:
            # Even after a fault above: an unanswered start would keep its end waiting. Not
            # after a kill (the service stopping): writing them would outlive it.
            if due:
                self._write_starts(due)
            raise
        if due:
            self._write_starts(due)

    def _write_starts(self, jobs: list[_StartJob]) -> None:
        try:
            results = self._with_retries(lambda: lifecycle.start_many([j.start for j in jobs]),
                                         until_written=any(job.urgent for job in jobs))
        except RecordingFailed as error:
            if error.bad_data and len(jobs) > 1:
                for job in jobs:
                    self._write_starts([job])
                return
            for job in jobs:
                job.result.set_exception(error)
            return
        for job, started in zip(jobs, results, strict=True):
            job.result.set(started)

    def _write_finishes(self, jobs: list[_FinishJob], together: dict[int, _StartJob]) -> None:
        ready: list[_Ending] = []
        waiting: list[_FinishJob] = []
        for job in jobs:
            start = together.get(id(job))
            if start is not None:
                ready.append(_Ending(job, replace(job.finish, start=start.start), start))
            elif not job.started.ready():
                waiting.append(job)  # its start is queued behind this round's
            elif job.started.successful():
                ready.append(_Ending(job, replace(job.finish, pk=job.started.value.pk)))
            else:
                # Its start was not recorded (the database was away longer than a start is
                # retried): the end carries it, so the task that ran is not run again.
                ready.append(_Ending(job, replace(job.finish, start=job.start)))
        self._finishes[:0] = waiting
        if ready:
            self._write_endings(ready)

    def _write_endings(self, endings: list[_Ending]) -> None:
        try:
            started = self._with_retries(
                lambda: lifecycle.finish_many([e.finish for e in endings]), until_written=True)
        except RecordingFailed as error:
            if error.bad_data and len(endings) > 1:
                for one in endings:
                    self._write_endings([one])
                return
            if error.bad_data and (stripped := endings[0].without_texts(error)) is not None:
                logger.error('The end of message %s could not be written (%s); writing it '
                             'without the task\'s output, log and error',
                             endings[0].finish.message_id, error)
                self._write_endings([stripped])
                return
            for ending in endings:
                if ending.start is not None:
                    ending.start.result.set_exception(error)
            self._settle([ending.job for ending in endings], error)
            return
        for ending in endings:
            if ending.start is not None:
                ending.start.result.set(started[ending.start.start.message_id])
        self._settle([ending.job for ending in endings], None)

    @staticmethod
    def _settle(jobs: list[_FinishJob], error: RecordingFailed | None) -> None:
        """Settle each job's message, the acks written together; then tell whoever waits
        (a consumer stopping keeps its channel open until its acks are written)."""
        with acks_together():
            for job in jobs:
                try:
                    job.settle(error is None)
                except Exception:
                    logger.exception('Settling message %s failed', job.finish.message_id)
        for job in jobs:
            if error is None:
                job.result.set(None)
            else:
                job.result.set_exception(error)

    def _with_retries(self, write: Callable[[], Written], until_written: bool = False) -> Written:
        """``write()``, tried again while the database fails; ``until_written``: for ever.

        Only faults of the rows themselves, and faults not of the database, end the retries
        of an ``until_written`` write; the service's stop ends them by killing the recorder.
        """
        for attempt in itertools.count():
            try:
                results = write()
            except (DataError, IntegrityError) as error:
                # The rows, not the connection: the same write would fail again.
                raise RecordingFailed(f'{type(error).__name__}: {error}', bad_data=True) from error
            except DatabaseFault as error:
                self._healthy = False
                # Reconnect on the next try, in case the connection itself broke.
                close_connection(lifecycle.database())
                if attempt >= len(RETRY_DELAYS) and not until_written:
                    raise RecordingFailed(f'{type(error).__name__}: {error}') from error
                delay = retry_delay(attempt)
                logger.warning('Writing task records failed (%s); retrying in %.1f s%s',
                               error, delay, ' (until the database takes them)'
                               if until_written and attempt == len(RETRY_DELAYS) else '')
                gevent.sleep(delay)
            except (TypeError, ValueError) as error:
                # The rows', not the database's (a driver that cannot encode a value, such
                # as a lone surrogate): retrying will not help, writing them one by one will.
                raise RecordingFailed(f'{type(error).__name__}: {error}', bad_data=True) from error
            except Exception as error:
                # Not the database's doing: retrying will not help, but the recorder must
                # live on, and the messages go back to their queue.
                logger.exception('Writing task records failed')
                raise RecordingFailed(f'{type(error).__name__}: {error}') from error
            else:
                self._healthy = True
                return results
        raise AssertionError('unreachable')


def retry_delay(attempt: int) -> float:
    """Seconds to wait after failed try number ``attempt`` (from 0) of a write."""
    return RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]


def close_connection(alias: str) -> None:
    """Close the connection to ``alias`` so the next query reconnects.

    Closing a connection the database already broke can fail too; that must not end the
    retries it is part of.
    """
    try:
        connections[alias].close()
    except Exception as error:
        logger.warning('Closing a broken database connection failed: %s', error)
