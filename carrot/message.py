"""The wire format, both directions, and nowhere else (dead letters' too).

Compatible with upstream django-carrot: the ``type`` header carries the dotted task path,
``message_id`` is the MessageLog uuid, and the JSON body is ``{"args": [...], "kwargs": {...}}``.
carrot adds an ``x-carrot-attempt`` header, which other producers may leave out, and
``x-carrot-tracked`` (true or false) when the call or the queue chose whether the task gets a
MessageLog row when it succeeds, and ``x-carrot-resent`` (true) on a copy sent again because
its first send was never confirmed: that copy runs only if no other has started the task.
A call's own task options travel as a JSON object in ``x-carrot-options``, and the time past
which the task is not run as an ISO 8601 text in ``x-carrot-expires``. ``x-carrot-published-at``
says when the message was sent (ISO 8601, UTC; a requeued dead letter's says when it was sent
back): the worker's rollups (``carrot.rollups``) measure each task's wait from it.
"""

from __future__ import annotations

import datetime
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from carrot import options as task_options
from carrot._values import is_whole_number
from carrot.exceptions import ArgumentsNotSerializable, BadMessage, CarrotConfigException
from carrot.frames import MAX_SHORT_STRING

TYPE_HEADER = 'type'
ATTEMPT_HEADER = 'x-carrot-attempt'
DEAD_REASON_HEADER = 'x-carrot-dead-reason'
DEAD_AT_HEADER = 'x-carrot-dead-at'
TRACKED_HEADER = 'x-carrot-tracked'
RESENT_HEADER = 'x-carrot-resent'
OPTIONS_HEADER = 'x-carrot-options'
EXPIRES_HEADER = 'x-carrot-expires'
PUBLISHED_HEADER = 'x-carrot-published-at'
CONTENT_TYPE = 'application/json'
MESSAGE_TYPE = 'django-carrot message'
PERSISTENT = 2
MAX_PRIORITY = 255
MAX_MESSAGE_ID = 200  # the longest message id carrot takes; MessageLog.uuid is this long


@dataclass(frozen=True)
class TaskMessage:
    """One task call as it travels through RabbitMQ."""

    task: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    priority: int = 0
    attempt: int = 1
    #: False: no MessageLog row unless the task fails; None: as its queue says.
    tracked: bool | None = None
    #: A copy sent again because the first send was not confirmed (``resent_properties``).
    resent: bool = False
    #: The task options the call gave (``carrot.options.CALL_OPTIONS``).
    options: dict[str, Any] = field(default_factory=dict)
    #: When the task stops being worth running (aware), if ever.
    expires_at: datetime.datetime | None = None


def check_priority(priority: object) -> None:
    """ValueError unless ``priority`` is a whole number RabbitMQ accepts."""
    if not is_whole_number(priority, 0, MAX_PRIORITY):
        raise ValueError(
            f'priority must be a whole number from 0 to {MAX_PRIORITY}, not {priority!r}.'
        )


def encode_arguments(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[str, str]:
    """``(args_json, kwargs_json)``, or ArgumentsNotSerializable naming the bad argument."""
    try:
        return json.dumps(list(args), allow_nan=False), json.dumps(dict(kwargs), allow_nan=False)
    except (TypeError, ValueError):
        pass
    # Encode one by one only to say which argument it was.
    for position, value in enumerate(args):
        _check_json(value, f'positional argument {position}')
    for name, value in kwargs.items():
        _check_json(value, f'keyword argument {name!r}')
    raise ArgumentsNotSerializable('The arguments cannot be sent as JSON.')


def _check_json(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ArgumentsNotSerializable(
            f'The {what} ({type(value).__name__}) cannot be sent as JSON: {error}. Pass plain '
            f'JSON values (str, int, float, bool, None, lists and dicts of them), for example '
            f'the id of a model instance rather than the instance.'
        ) from None


def encode(message: TaskMessage, arguments_json: tuple[str, str] | None = None,
           ) -> tuple[bytes, dict[str, Any]]:
    """The body and AMQP properties of ``message``.

    ``arguments_json``, when the caller has encoded the arguments already, saves doing it twice.
    """
    args_json, kwargs_json = arguments_json or (json.dumps(message.args),
                                                json.dumps(message.kwargs))
    body = f'{{"args": {args_json}, "kwargs": {kwargs_json}}}'.encode()
    headers: dict[str, Any] = {TYPE_HEADER: message.task, ATTEMPT_HEADER: message.attempt,
                               PUBLISHED_HEADER: _now()}
    if message.tracked is not None:
        headers[TRACKED_HEADER] = message.tracked
    if message.resent:
        headers[RESENT_HEADER] = True
    if message.options:
        headers[OPTIONS_HEADER] = json.dumps(message.options)
    if message.expires_at is not None:
        headers[EXPIRES_HEADER] = _aware(message.expires_at).isoformat()
    properties = {
        'headers': headers,
        'content_type': CONTENT_TYPE,
        'content_encoding': 'utf-8',
        'priority': message.priority,
        'message_id': message.message_id,
        'message_type': MESSAGE_TYPE,
        'delivery_mode': PERSISTENT,
    }
    return body, properties


def decode(body: bytes, properties: Mapping[str, Any]) -> TaskMessage:
    """The TaskMessage in a delivery; raises BadMessage saying what is wrong with it."""
    headers = _text_keys(properties.get('headers') or {})
    task = text(headers.get(TYPE_HEADER))
    if not task:
        raise BadMessage(
            f'The message has no {TYPE_HEADER!r} header naming the task to run; carrot '
            f'messages carry the dotted task path there.'
        )
    try:
        content = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError) as error:
        raise BadMessage(f'The message body is not JSON: {error}.') from None
    if not isinstance(content, dict):
        raise BadMessage(
            f'The message body is JSON {type(content).__name__}, not an object with '
            f'"args" and "kwargs".'
        )
    args = content.get('args', [])
    kwargs = content.get('kwargs', {})
    if not isinstance(args, list):
        raise BadMessage('The message body\'s "args" is not a list.')
    if not isinstance(kwargs, dict):
        raise BadMessage('The message body\'s "kwargs" is not an object.')
    attempt = headers.get(ATTEMPT_HEADER, 1)
    tracked = headers.get(TRACKED_HEADER)
    if tracked is not None and not isinstance(tracked, bool):
        raise BadMessage(f'The {TRACKED_HEADER!r} header is {tracked!r}; it must be true or '
                         f'false, or be left out for the queue\'s setting.')
    message_id = text(properties.get('message_id'))
    if len(message_id) > MAX_MESSAGE_ID:
        raise BadMessage(f'The message_id is {len(message_id)} characters long; carrot keeps '
                         f'at most {MAX_MESSAGE_ID}.')
    if '\x00' in message_id:
        raise BadMessage('The message_id holds a NUL character, which no database column '
                         'takes; give each message a printable id.')
    return TaskMessage(
        task=task,
        args=args,
        kwargs=kwargs,
        message_id=message_id or str(uuid.uuid4()),
        priority=properties.get('priority') or 0,
        attempt=attempt if isinstance(attempt, int) and attempt > 0 else 1,
        tracked=tracked,
        resent=headers.get(RESENT_HEADER) is True,
        options=_options_of(headers.get(OPTIONS_HEADER)),
        expires_at=_time_of(headers.get(EXPIRES_HEADER), EXPIRES_HEADER),
    )


def _options_of(header: Any) -> dict[str, Any]:
    if header is None:
        return {}
    try:
        given = json.loads(text(header))
    except (TypeError, ValueError):
        given = None
    if not isinstance(given, dict):
        raise BadMessage(f'The {OPTIONS_HEADER!r} header is not a JSON object of task options.')
    try:
        # The time limit is checked against CARROT['consumer_timeout'] when it is resolved.
        return task_options.validate(given, f'The {OPTIONS_HEADER!r} header', code_as='none',
                                     consumer_timeout=math.inf)
    except CarrotConfigException as error:
        raise BadMessage(str(error)) from None


def _time_of(header: Any, name: str) -> datetime.datetime | None:
    if header is None:
        return None
    try:
        at = datetime.datetime.fromisoformat(text(header))
    except (TypeError, ValueError):
        at = None
    if at is None or at.tzinfo is None:
        raise BadMessage(f'The {name!r} header is {header!r}, not an ISO 8601 time with its '
                         f'UTC offset.')
    return at


def resent_properties(properties: Mapping[str, Any]) -> dict[str, Any]:
    """``properties`` of a message for the copy sent again when its confirm did not come."""
    return {**properties, 'headers': {**(properties.get('headers') or {}), RESENT_HEADER: True}}


def body_of(received: Any) -> bytes:
    """The body of a received message as bytes (amqpstorm may hand over text)."""
    body = received.body
    return body if isinstance(body, bytes) else str(body).encode()


def message_id_of(properties: Mapping[str, Any]) -> str | None:
    """The message id of a delivery that may not decode, for linking it to a row.

    None when there is none, or when it cannot be stored (a NUL character).
    """
    message_id = text(properties.get('message_id'))
    return message_id if message_id and '\x00' not in message_id else None


def text(value: Any) -> str:
    """A header or property value as text (AMQP tables may carry bytes)."""
    if isinstance(value, bytes):
        return value.decode('utf-8', 'replace')
    return value if isinstance(value, str) else ''


def _text_keys(headers: Mapping[Any, Any]) -> dict[str, Any]:
    return {text(key) if isinstance(key, bytes) else key: value for key, value in headers.items()}


def dead_letter_properties(delivered: dict[str, Any], reason: str) -> dict[str, Any]:
    """The delivery's properties for the dead-letter queue, with the reason in a header.

    Kept as they came, but persistent, not expiring, not claiming another user id (RabbitMQ
    closes the channel of a publish whose user_id is not its own), and without the
    deprecated cluster_id, which amqpstorm refuses to send.
    """
    properties = dict(delivered)
    for dropped in ('expiration', 'user_id', 'cluster_id'):
        properties.pop(dropped, None)
    properties['delivery_mode'] = PERSISTENT
    headers = dict(properties.get('headers') or {})
    headers[DEAD_REASON_HEADER] = reason[:1000]
    headers[DEAD_AT_HEADER] = _now()
    properties['headers'] = headers
    return properties


def requeued_properties(dead: Mapping[str, Any]) -> dict[str, Any]:
    """The properties of a dead letter sent back to its queue: its dead-letter headers
    dropped, and its attempts counted afresh."""
    # Not marked re-sent either: that copy would run only if its row were still PUBLISHED.
    headers = {key: value for key, value in (dead.get('headers') or {}).items()
               if key not in (DEAD_REASON_HEADER, DEAD_AT_HEADER, RESENT_HEADER)}
    headers[ATTEMPT_HEADER] = 1
    headers[PUBLISHED_HEADER] = _now()  # its wait counts from now, not from its first send
    return {**dead, 'headers': headers}


def dead_at_of(properties: Mapping[str, Any]) -> datetime.datetime | None:
    """When a dead letter was dead-lettered; None when it does not say (or not clearly)."""
    try:
        return _time_of((properties.get('headers') or {}).get(DEAD_AT_HEADER), DEAD_AT_HEADER)
    except BadMessage:
        return None


def published_at_of(properties: Mapping[str, Any]) -> datetime.datetime | None:
    """When a message was sent, by its ``x-carrot-published-at``; None when it does not say
    (another producer's message, or one sent before carrot wrote the header) or not clearly."""
    header = (properties.get('headers') or {}).get(PUBLISHED_HEADER)
    if header is None:
        return None
    try:
        return _time_of(header, PUBLISHED_HEADER)
    except BadMessage:
        return None


def _aware(at: datetime.datetime) -> datetime.datetime:
    """``at`` with its UTC offset; a naive time (USE_TZ off) is local time, which Django sets
    to TIME_ZONE."""
    return at if at.tzinfo is not None else at.astimezone()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def minimal_dead_letter_properties(delivered: dict[str, Any], reason: str,
                        error: Exception) -> dict[str, Any]:
    """What identifies a message, as text, for one whose own properties cannot be sent."""
    headers = delivered.get('headers') or {}
    properties: dict[str, Any] = {
        'delivery_mode': PERSISTENT,
        'headers': {
            TYPE_HEADER: text(headers.get(TYPE_HEADER)),
            DEAD_REASON_HEADER: (
                f'{reason} (its properties could not be sent again, only these: '
                f'{type(error).__name__}: {error})')[:1000],
            DEAD_AT_HEADER: _now(),
        },
    }
    message_id = message_id_of(delivered)
    if message_id is not None and len(message_id.encode()) <= MAX_SHORT_STRING:
        properties['message_id'] = message_id
    return properties
