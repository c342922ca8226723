"""The wire format: upstream-compatible both ways, and clear errors on bad input."""

from __future__ import annotations

import json

import pytest

from carrot import message
from carrot.exceptions import ArgumentsNotSerializable, BadMessage


def test_encode_writes_upstream_header_id_and_body() -> None:
    body, properties = message.encode(message.TaskMessage(
        task='app.tasks.f', args=[1, 'a'], kwargs={'k': True}, message_id='id-1', priority=3,
    ))
    assert json.loads(body) == {'args': [1, 'a'], 'kwargs': {'k': True}}
    assert properties['headers']['type'] == 'app.tasks.f'
    assert properties['message_id'] == 'id-1'
    assert properties['priority'] == 3
    assert properties['delivery_mode'] == 2
    assert properties['content_type'] == 'application/json'


def test_decode_round_trips() -> None:
    original = message.TaskMessage(task='a.b', args=[1], kwargs={'x': [1, 2]}, priority=2)
    body, properties = message.encode(original)
    assert message.decode(body, properties) == original


def test_decode_accepts_upstream_body_without_empty_keys_and_bytes_headers() -> None:
    decoded = message.decode(b'{"kwargs": {"a": 1}}',
                             {'headers': {b'type': b'a.b'}, 'message_id': b'm'})
    assert (decoded.task, decoded.args, decoded.kwargs, decoded.message_id, decoded.attempt) == \
        ('a.b', [], {'a': 1}, 'm', 1)


def test_decode_gives_an_id_to_a_message_without_one() -> None:
    assert message.decode(b'{}', {'headers': {'type': 'a.b'}}).message_id


@pytest.mark.parametrize(('body', 'properties', 'reason'), [
    (b'{}', {}, "no 'type' header"),
    (b'not json', {'headers': {'type': 'a.b'}}, 'not JSON'),
    (b'\xff\xfe', {'headers': {'type': 'a.b'}}, 'not JSON'),
    (b'[1, 2]', {'headers': {'type': 'a.b'}}, 'JSON list'),
    (b'{"args": {"a": 1}}', {'headers': {'type': 'a.b'}}, '"args" is not a list'),
    (b'{"kwargs": [1]}', {'headers': {'type': 'a.b'}}, '"kwargs" is not an object'),
])
def test_decode_says_what_is_wrong(body: bytes, properties: dict[str, object],
                                   reason: str) -> None:
    with pytest.raises(BadMessage, match=reason):
        message.decode(body, properties)


def test_arguments_that_are_not_json_name_the_argument() -> None:
    with pytest.raises(ArgumentsNotSerializable, match='positional argument 1'):
        message.encode_arguments([1, object()], {})
    with pytest.raises(ArgumentsNotSerializable, match="keyword argument 'when'"):
        message.encode_arguments([], {'when': {1, 2}})
    with pytest.raises(ArgumentsNotSerializable, match='keyword argument'):
        message.encode_arguments([], {'x': float('nan')})
