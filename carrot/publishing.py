"""Publishing a task: validate it, write its PUBLISHED row, send its message.

``publish_message`` validates everything before it writes or sends anything, writes the
PUBLISHED row, and sends the message: at once, or when the surrounding transaction commits.
A task with a countdown or an eta gets a DELAYED row instead, which the carrot service sends
when its time comes (``carrot.delays``).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings as django_settings
from django.db import transaction
from django.utils import timezone

from carrot import conf, frames, lifecycle, message, oncommit, outbox, registry, together
from carrot import options as task_options
from carrot._text import column_length
from carrot._values import MAX_SECONDS, is_seconds
from carrot.broker import Outgoing, get_publisher
from carrot.exceptions import CarrotConfigException
from carrot.models import MessageLog
from carrot.together import publish_together

__all__ = ['Message', 'create_message', 'get_host_from_name', 'publish_message',
           'publish_together', 'validate_task']

TaskRef = Callable[..., Any] | str



def get_host_from_name(name: str | None) -> conf.Broker:
    """The broker of queue ``name``; the default broker when ``name`` is empty."""
    settings = conf.get_settings()
    if not name:
        return settings.default_broker
    return settings.queue(name).broker


def validate_task(task: TaskRef) -> str:
    """The dotted path of ``task`` (a function or a path), checked to be a runnable task."""
    path = registry.task_path(task)
    registry.resolve(path)
    return path


@dataclass(frozen=True)
class Message:
    """A task message ready to publish (upstream's ``create_message`` result)."""

    queue: conf.Queue
    task_message: message.TaskMessage
    exchange: str
    routing_key: str
    args_json: str
    kwargs_json: str
    #: When a delayed task is sent to its queue (None: now).
    run_after: datetime.datetime | None = None

    @property
    def task(self) -> str:
        return self.task_message.task

    @property
    def uuid(self) -> str:
        return self.task_message.message_id

    @property
    def tracked(self) -> bool:
        """Whether the task gets its row before it runs (False: only if it fails).

        A delayed task is tracked: its row is what holds it until its time comes."""
        if self.run_after is not None:
            return True
        chosen = self.task_message.tracked
        return self.queue.tracked if chosen is None else chosen

    def publish(self) -> MessageLog:
        """Write the PUBLISHED row and send the message (on commit, inside a transaction).

        Outside a transaction, a tracked message to its queue returns once its row is
        committed and its frames are written: ``carrot.outbox`` sees to the confirm. An
        untracked message writes no row (the MessageLog returned is not saved) and waits
        for its confirm, as does one to another exchange or routing key, whose errors
        (unroutable, no such exchange) the caller must see.

        Inside ``publish_together()`` a tracked message to its queue keeps its row to be
        written with the others when the block ends (``carrot.together``).

        Raises TransactionManagementError, writing nothing, when autocommit is off outside
        ``atomic()``: carrot cannot know when such a transaction commits, and a message sent
        before its row is committed could run a task whose row is then rolled back.
        """
        alias = lifecycle.database()
        connection = transaction.get_connection(alias)
        in_transaction = connection.in_atomic_block
        if not in_transaction and not connection.get_autocommit():
            raise transaction.TransactionManagementError(
                f'publish_message cannot be used with autocommit turned off outside '
                f'transaction.atomic() (database {alias!r}): carrot sends a message once '
                f'its row is committed, and cannot see when such a transaction commits. '
                f'Publish inside transaction.atomic(), or with autocommit on.'
            )
        group = together.open_on(connection) if in_transaction else None
        if group is not None and group.takes(connection):
            if self.keepable:
                return group.keep(self, lifecycle.published_values(**self._row_fields()))
            group.write()  # first the rows kept before this one: the calls' order holds
        log = self.record()
        if self.run_after is not None:
            return log  # sent by the carrot service when its time comes
        if in_transaction:
            oncommit.send_on_commit(self, log, alias)
        elif self.tracked and not self.exchange and self.routing_key == self.queue.name:
            # Its committed row keeps the promise: no waiting for the broker's confirm.
            outbox.get_outbox().send(alias, log, self.outgoing())
        else:
            try:
                self.send()
            except BaseException:
                if log.pk is not None:
                    lifecycle.discard_unpublished(log)
                raise
            if log.pk is not None:
                outbox.get_outbox().confirmed([(alias, log.uuid)])
        return log

    @property
    def keepable(self) -> bool:
        """Whether ``publish_together`` may keep its row to write with others: tracked, sent
        now to its queue, with no options of its own and no expiry."""
        return (self.tracked and self.run_after is None and not self.exchange
                and self.routing_key == self.queue.name and not self.task_message.options
                and self.task_message.expires_at is None)

    def record(self) -> MessageLog:
        """Write the PUBLISHED row of this message, without sending it.

        An untracked message's row is not written: the instance is returned unsaved. A
        delayed one's row says DELAYED.
        """
        fields = self._row_fields()
        if not self.tracked:
            return lifecycle.unsaved_published(**fields)
        fields.update(options=self.task_message.options or None,
                      expires_at=self.task_message.expires_at)
        if self.run_after is not None:
            return lifecycle.record_delayed(**fields, run_after=self.run_after)
        return lifecycle.record_published(**fields)

    def _row_fields(self) -> dict[str, Any]:
        return dict(message_id=self.uuid, task=self.task, args_json=self.args_json,
                    kwargs_json=self.kwargs_json, queue=self.queue.name,
                    exchange=self.exchange, routing_key=self.routing_key,
                    priority=self.task_message.priority)

    def send(self) -> None:
        """Send the message to RabbitMQ and wait for the broker's confirm."""
        get_publisher().send_outgoing(self.queue.broker, self.outgoing())

    def outgoing(self) -> Outgoing:
        """The message as the publisher sends it (to ``queue.broker``)."""
        body, properties = message.encode(self.task_message, (self.args_json, self.kwargs_json))
        return Outgoing(body, properties, self.routing_key, self.exchange, self.queue)


def check_destination(exchange: object, routing_key: object) -> None:
    """CarrotConfigException unless RabbitMQ can be sent, and MessageLog can keep, both names."""
    if not isinstance(exchange, str) or not frames.EXCHANGE_NAME.fullmatch(exchange):
        problem = (f'is {len(exchange)} characters long' if isinstance(exchange, str)
                   and len(exchange) > frames.MAX_EXCHANGE_NAME else 'is not a valid name')
        raise CarrotConfigException(
            f'The exchange {_shown(exchange)} {problem}: AMQP allows at most '
            f'{frames.MAX_EXCHANGE_NAME} letters, digits, spaces and "-_.:@#,/+". Pass the '
            f'name of an existing exchange, or leave exchange empty for the default one.'
        )
    if not isinstance(routing_key, str):
        raise CarrotConfigException(
            f'The routing_key must be a string, not {type(routing_key).__name__}.')
    try:
        size = len(routing_key.encode())
    except UnicodeEncodeError:
        raise CarrotConfigException(
            f'The routing_key {_shown(routing_key)} is not valid Unicode text (it holds a lone '
            f'surrogate). Pass a routing_key that can be encoded as UTF-8.'
        ) from None
    longest = column_length('routing_key')
    if size > frames.MAX_SHORT_STRING or len(routing_key) > longest:
        raise CarrotConfigException(
            f'The routing_key {_shown(routing_key)} is {len(routing_key)} characters '
            f'({size} bytes of UTF-8) long: AMQP carries at most {frames.MAX_SHORT_STRING} '
            f'bytes, and MessageLog keeps at most {longest} characters. Pass a '
            f'shorter routing_key.'
        )


def _shown(value: object) -> str:
    """``value`` for an error message, cut short when it is long."""
    text = repr(value)
    return text if len(text) <= 60 else f'{text[:57]}...'


def create_message(
    task: TaskRef,
    priority: int = 0,
    task_args: tuple[Any, ...] | list[Any] = (),
    queue: str | None = None,
    exchange: str = '',
    routing_key: str | None = None,
    task_kwargs: dict[str, Any] | None = None,
    tracked: bool | None = None,
    *,
    options: dict[str, Any] | None = None,
    countdown: float | None = None,
    eta: datetime.datetime | None = None,
) -> Message:
    """A validated Message, not yet published.

    Raises TaskNotRegistered, TaskImportError, CarrotConfigException (unknown queue, an
    exchange or routing key AMQP cannot carry, a bad option, countdown or eta),
    ArgumentsNotSerializable or ValueError (bad priority) before anything is written or sent.

    ``tracked=False`` writes no MessageLog row for the task unless it fails; None takes the
    queue's ``tracked`` setting (True unless set). ``options`` are the call's own task
    options (``carrot.options.CALL_OPTIONS``); ``countdown`` (seconds) or ``eta`` (a
    datetime, aware under ``USE_TZ``) delay the task: one in the past runs now.
    """
    if tracked is not None and not isinstance(tracked, bool):
        raise CarrotConfigException(f'tracked must be True, False or None, not {tracked!r}.')
    path = registry.task_path(task)
    function = registry.resolve(path)  # what validate_task checks, its function kept
    settings = conf.get_settings()
    target = settings.queue(queue)
    call_options = task_options.validate(options or {}, 'publish_message', code_as='none',
                                         consumer_timeout=settings.consumer_timeout)
    resolved = task_options.resolve(function, target.name, call_options)
    now = timezone.now()
    run_after = _run_after(countdown, eta, now)
    expires_at = (now + datetime.timedelta(seconds=resolved.expires)
                  if resolved.expires is not None else None)
    message.check_priority(priority)
    exchange = exchange or ''
    routing_key = routing_key or target.name
    check_destination(exchange, routing_key)
    args = list(task_args)
    kwargs = dict(task_kwargs or {})
    args_json, kwargs_json = message.encode_arguments(args, kwargs)
    return Message(
        queue=target,
        task_message=message.TaskMessage(task=path, args=args, kwargs=kwargs, priority=priority,
                                         tracked=_tracked_header(tracked, target),
                                         options=call_options, expires_at=expires_at),
        exchange=exchange,
        routing_key=routing_key,
        args_json=args_json,
        kwargs_json=kwargs_json,
        run_after=run_after,
    )


def _run_after(countdown: Any, eta: Any, now: datetime.datetime) -> datetime.datetime | None:
    """When a task with this countdown or eta runs; None: now (an eta past runs now)."""
    if countdown is not None and eta is not None:
        raise CarrotConfigException('Pass countdown or eta, not both.')
    if countdown is not None:
        if not is_seconds(countdown, positive=False):
            raise CarrotConfigException(
                f'countdown must be a number of seconds of 0 or more, at most {MAX_SECONDS} '
                f'(ten years), not {countdown!r}.')
        return now + datetime.timedelta(seconds=countdown) if countdown > 0 else None
    if eta is None:
        return None
    if not isinstance(eta, datetime.datetime):
        raise CarrotConfigException(f'eta must be a datetime, not {type(eta).__name__}.')
    if django_settings.USE_TZ and timezone.is_naive(eta):
        raise CarrotConfigException(
            f'eta {eta.isoformat()} is a naive datetime, and USE_TZ is on: say which time '
            f'zone it is in (django.utils.timezone.make_aware, or datetime.now(tz=...)).')
    if not django_settings.USE_TZ and timezone.is_aware(eta):
        eta = timezone.make_naive(eta)
    return eta if eta > now else None


def publish_message(
    task: TaskRef,
    *task_args: Any,
    priority: int = 0,
    queue: str | None = None,
    exchange: str = '',
    routing_key: str | None = None,
    tracked: bool | None = None,
    max_retries: int | None = None,
    retry_backoff: float | None = None,
    retry_backoff_max: float | None = None,
    time_limit: float | None = None,
    expires: float | None = None,
    countdown: float | None = None,
    eta: datetime.datetime | None = None,
    **task_kwargs: Any,
) -> MessageLog:
    """Publish a task; its MessageLog row (status PUBLISHED) is returned.

    ``task`` is a function or its dotted path, in a module listed in
    ``CARROT['task_modules']``. Inside ``transaction.atomic()`` the message is sent when the
    transaction commits. Raises BrokerUnavailable, leaving no PUBLISHED row, when RabbitMQ
    cannot be reached. ``tracked=False``: no row unless the task fails (the MessageLog
    returned is then not saved); None: as the queue's ``tracked`` setting says.

    ``max_retries``, ``retry_backoff``, ``retry_backoff_max``, ``time_limit`` and
    ``expires`` set this call's task options (``carrot.options``); ``countdown`` (seconds)
    or ``eta`` (a datetime) delay it: its row says DELAYED until then. These names, and
    ``priority``, ``queue``, ``exchange``, ``routing_key`` and ``tracked``, are carrot's, not
    the task's keyword arguments.
    """
    given = dict(max_retries=max_retries, retry_backoff=retry_backoff,
                 retry_backoff_max=retry_backoff_max, time_limit=time_limit, expires=expires)
    return create_message(
        task, priority=priority, task_args=task_args, queue=queue, exchange=exchange,
        routing_key=routing_key, task_kwargs=task_kwargs, tracked=tracked,
        options={name: value for name, value in given.items() if value is not None},
        countdown=countdown, eta=eta,
    ).publish()


def _tracked_header(tracked: bool | None, queue: conf.Queue) -> bool | None:
    """What the message says about tracking: nothing when it is tracked as its queue is,
    so a worker of upstream's format sees the message it always saw."""
    resolved = queue.tracked if tracked is None else tracked
    return None if resolved and queue.tracked else resolved
