"""The errors carrot raises, each with a message that says what to do."""

from __future__ import annotations

from carrot._values import MAX_SECONDS, is_seconds


class CarrotError(Exception):
    """Base class of carrot's errors."""


class CarrotConfigException(CarrotError):
    """``settings.CARROT`` is wrong; the message names the key. (Upstream's name, kept.)"""


class TaskNotRegistered(CarrotError):
    """The task path is not in a module listed in ``CARROT['task_modules']``."""


class TaskImportError(CarrotError):
    """A registered task path does not import, or does not name a function."""


class ArgumentsNotSerializable(CarrotError, TypeError):
    """The task's arguments cannot be encoded as JSON."""


class BrokerUnavailable(CarrotError):
    """RabbitMQ could not be reached, or did not confirm a publish."""


class MessageNotEncodable(CarrotError):
    """A message's exchange, routing key or properties cannot be encoded as AMQP frames."""


class BadMessage(CarrotError):
    """A delivered message cannot be decoded into a task call."""


class TimeLimitExceeded(BaseException):
    """Raised inside a task that ran past its ``time_limit``.

    A BaseException, as ``gevent.Timeout`` is, so that a task's own ``except Exception``
    does not swallow its stop.
    """


class Retry(Exception):
    """Raised by a task to be run again: ``raise Retry(delay=30)``, or without a delay for
    its retry backoff. It counts against ``max_retries``; once they are spent the task is
    FAILED with this error."""

    def __init__(self, reason: str = 'the task asked to be retried', *,
                 delay: float | None = None) -> None:
        super().__init__(reason)
        if delay is not None and not is_seconds(delay, positive=False):
            raise ValueError(f'Retry(delay=...) must be a number of seconds of 0 or more, at '
                             f'most {MAX_SECONDS} (ten years), not {delay!r}.')
        #: Seconds before the retry; None: the task's retry backoff.
        self.delay = delay


class TaskExpired(CarrotError):
    """A task reached a worker after its ``expires`` time; it was not run."""
