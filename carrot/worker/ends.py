"""What a task's end becomes: COMPLETED; DELAYED until its retry; or FAILED, and then
dead-lettered when its retries ran out or its time limit stopped it.

The decision between retrying and failing is made here, from the task's options
(``carrot.options``), and nowhere else.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from carrot import lifecycle, message
from carrot import options as task_options
from carrot.exceptions import Retry, TaskExpired, TimeLimitExceeded
from carrot.worker.executor import Outcome


@dataclass(frozen=True)
class End:
    """The end to record, and what becomes of the message once it is recorded."""

    finish: lifecycle.Finish
    #: The reason to dead-letter the message with, once its end is recorded (else: ack).
    dead_letter: str | None = None
    #: The last retry failed.
    exhausted: bool = False


def end_of(message_id: str, outcome: Outcome, options: task_options.TaskOptions | None,
            attempt: int) -> End:
    """COMPLETED; DELAYED until its retry; or FAILED, dead-lettered when the retries ran out
    or the time limit stopped it."""
    error = outcome.exception
    if error is None:
        return End(lifecycle.completed(message_id, output=outcome.output, log=outcome.log,
                                        at=outcome.ended_at))
    text = outcome.exception_text or ''
    if options is not None and options.retries(error, attempt):
        delay = (error.delay if isinstance(error, Retry) and error.delay is not None
                 else options.backoff(attempt))
        return End(lifecycle.retrying(
            message_id, exception=text, traceback=outcome.traceback, log=outcome.log,
            attempt=attempt, at=outcome.ended_at,
            run_after=outcome.ended_at + datetime.timedelta(seconds=delay)))
    retries = options is not None and options.max_retries > 0
    # Ran out of retries: an error it would have retried, had any been left.
    exhausted = (options is not None and retries and attempt > options.max_retries
                 and options.retryable(error, attempt))
    if exhausted:
        text = f'{text} (retries exhausted: this was attempt {attempt})'
    failed = lifecycle.failed(message_id, exception=text, traceback=outcome.traceback,
                              log=outcome.log, at=outcome.ended_at,
                              attempt=attempt if retries else None)
    dead = exhausted or isinstance(error, TimeLimitExceeded)
    return End(failed, dead_letter=text if dead else None, exhausted=exhausted)


def expired_outcome(task_message: message.TaskMessage) -> Outcome | None:
    """The outcome of a task past its expiry, which is not run; None when it may run."""
    expires_at = task_message.expires_at  # aware, as decoded, whether USE_TZ is on or not
    if expires_at is None or datetime.datetime.now(datetime.UTC) < expires_at:
        return None
    return Outcome(output=None, log='', exception=TaskExpired(
        f'the task expired at {expires_at.isoformat()} (its expires option) before it ran, '
        f'and was not run'))
