"""The hand-encoded frames: byte for byte what pamqp (amqpstorm's encoder) writes."""

from __future__ import annotations

import datetime
import decimal
from typing import Any

import pytest
from pamqp import body as pamqp_body
from pamqp import commands, frame, header

from carrot import message
from carrot.frames import (
    FRAME_OVERHEAD,
    ack_frame,
    body_size_of,
    decode_deliver,
    decode_properties,
    frame_start,
    publish_frames,
)


def _pamqp_frames(channel_id: int, exchange: str, routing_key: str, body: bytes,
                  properties: dict[str, Any], mandatory: bool, frame_max: int) -> bytes:
    parts = [
        frame.marshal(commands.Basic.Publish(exchange=exchange, routing_key=routing_key,
                                             mandatory=mandatory), channel_id),
        frame.marshal(header.ContentHeader(body_size=len(body),
                                           properties=commands.Basic.Properties(**properties)),
                      channel_id),
    ]
    chunk = frame_max - FRAME_OVERHEAD
    parts += [frame.marshal(pamqp_body.ContentBody(body[start:start + chunk]), channel_id)
              for start in range(0, len(body), chunk)]
    return b''.join(parts)


TASK_BODY, TASK_PROPERTIES = message.encode(message.TaskMessage(
    task='myapp.tasks.send_mail', args=[1, 'two'], kwargs={'three': 3}, priority=5))


@pytest.mark.parametrize(('exchange', 'routing_key', 'body', 'properties', 'mandatory'), [
    ('', 'default', TASK_BODY, TASK_PROPERTIES, True),
    ('events', 'high', 'ünïcode'.encode() * 1000, {
        'headers': {'small': -5, 'short': 300, 'unsigned': 40000, 'long': -70000,
                    'yes': True, 'no': False, 'nothing': None, 'text': 'ü'},
        'correlation_id': 'c1', 'reply_to': 'replies', 'expiration': '60000',
        'user_id': 'guest', 'app_id': 'carrot', 'content_type': 'text/plain',
    }, False),
    ('', 'q', b'', {'headers': {}, 'message_id': ''}, False),  # empty values as pamqp has them
    ('', 'q', b'x' * 10_000, {}, True),  # several body frames
])
def test_frames_match_pamqps_encoding(exchange: str, routing_key: str, body: bytes,
                                      properties: dict[str, Any], mandatory: bool) -> None:
    frame_max = 4096
    ours = publish_frames(3, exchange, routing_key, body, properties, mandatory, frame_max)
    assert ours == _pamqp_frames(3, exchange, routing_key, body, properties, mandatory,
                                 frame_max)


@pytest.mark.parametrize('properties', [
    {'timestamp': 1700000000},  # not encoded here
    {'cluster_id': 'x'},
    {'headers': {'nested': {'table': 1}}},
    {'headers': {'big': 2**40}},
    {'headers': {'list': [1, 2]}},
    {'priority': 300},
    {'message_id': 'x' * 256},  # too long: pamqp says so
    {'delivery_mode': 3},  # neither 1 nor 2: pamqp refuses it
])
def test_properties_it_does_not_encode_are_left_to_amqpstorm(properties: dict[str, Any]) -> None:
    assert publish_frames(1, '', 'q', b'{}', properties, True, 131072) is None


@pytest.mark.parametrize('exchange', ['not allowed!', 'x' * 128])
def test_exchange_names_pamqp_refuses_are_left_to_it(exchange: str) -> None:
    assert publish_frames(1, exchange, 'q', b'{}', {}, True, 131072) is None


@pytest.mark.parametrize(('channel_id', 'delivery_tag'), [(1, 1), (100, 2**40), (65535, 7)])
def test_ack_frame_matches_pamqps(channel_id: int, delivery_tag: int) -> None:
    expected = frame.marshal(commands.Basic.Ack(delivery_tag=delivery_tag), channel_id)
    assert ack_frame(channel_id, delivery_tag) == expected


# -- decoding a delivery: the dicts pamqp's objects give, or None where pamqp must decode --

def _payload(marshalled: bytes) -> tuple[int, int]:
    """Where a marshalled frame's payload starts and ends."""
    size = frame_start(marshalled, 0)[2]
    return FRAME_OVERHEAD - 1, FRAME_OVERHEAD - 1 + size


@pytest.mark.parametrize(('consumer_tag', 'delivery_tag', 'redelivered', 'exchange', 'key'), [
    ('amq.ctag-abc', 1, False, '', 'default'),
    ('c', 2 ** 40, True, 'events', 'ünïcode'),
    ('', 7, False, 'x' * 127, 'k' * 255),
])
def test_a_basic_deliver_decodes_as_pamqp_decodes_it(consumer_tag: str, delivery_tag: int,
                                                     redelivered: bool, exchange: str,
                                                     key: str) -> None:
    marshalled = frame.marshal(commands.Basic.Deliver(consumer_tag, delivery_tag, redelivered,
                                                      exchange, key), 3)
    _, _, by_pamqp = frame.unmarshal(marshalled)
    assert decode_deliver(marshalled, *_payload(marshalled)) == dict(by_pamqp)


def test_other_methods_are_left_to_pamqp() -> None:
    for method in (commands.Basic.Ack(5), commands.Basic.ConsumeOk('tag'),
                   commands.Basic.Return(312, 'NO_ROUTE', '', 'q')):
        marshalled = frame.marshal(method, 1)
        assert decode_deliver(marshalled, *_payload(marshalled)) is None


def _header(properties: dict[str, Any], body_size: int = 10) -> bytes:
    return frame.marshal(header.ContentHeader(
        body_size=body_size, properties=commands.Basic.Properties(**properties)), 1)


@pytest.mark.parametrize('properties', [
    {},
    TASK_PROPERTIES,
    {'content_type': 'text/plain', 'content_encoding': 'utf-8', 'delivery_mode': 1,
     'priority': 9, 'correlation_id': 'c1', 'reply_to': 'replies', 'expiration': '60000',
     'message_id': 'ü', 'message_type': 'kind', 'user_id': 'guest', 'app_id': 'carrot'},
    {'headers': {'small': -5, 'short': 300, 'unsigned': 40000, 'long': -70000,
                 'longer': 2 ** 40, 'yes': True, 'no': False, 'nothing': None, 'text': 'ü',
                 'empty': ''}},
    {'headers': {}, 'message_id': ''},
])
def test_properties_decode_as_pamqp_decodes_them(properties: dict[str, Any]) -> None:
    marshalled = _header(properties, body_size=12345)
    _, _, by_pamqp = frame.unmarshal(marshalled)
    start, end = _payload(marshalled)
    assert decode_properties(marshalled, start, end) == dict(by_pamqp.properties)
    assert body_size_of(marshalled, start) == 12345


def test_every_integer_code_of_a_header_table_decodes_as_pamqp_decodes_it() -> None:
    """The codes other clients send (pamqp's encoder picks only some of them), and a text
    that is not UTF-8, which pamqp gives as bytes."""
    values = [(b'b', b'\xfb'), (b'B', b'\xfb'), (b's', b'\xff\x00'), (b'u', b'\xff\x00'),
              (b'I', b'\xff\xff\xff\x00'), (b'i', b'\xff\xff\xff\x00'),
              (b'l', b'\xff' * 7 + b'\x00'), (b'L', b'\xff' * 7 + b'\x00'),
              (b'S', b'\x00\x00\x00\x02\xff\xfe'), (b't', b'\x02'), (b'V', b'')]
    table = b''.join(bytes((1,)) + bytes((65 + n,)) + code + value
                     for n, (code, value) in enumerate(values))
    payload = (b'\x00\x3c\x00\x00' + (10).to_bytes(8, 'big') + b'\x20\x00'
               + len(table).to_bytes(4, 'big') + table)
    marshalled = frame_start_bytes(len(payload)) + payload + b'\xce'
    _, _, by_pamqp = frame.unmarshal(marshalled)
    decoded = decode_properties(marshalled, *_payload(marshalled))
    assert decoded is not None and decoded == dict(by_pamqp.properties)
    assert decoded['headers']['I'] == b'\xff\xfe'


@pytest.mark.parametrize('properties', [
    {'timestamp': datetime.datetime(2026, 12, 7, tzinfo=datetime.UTC)},
    {'headers': {'x-death': [{'count': 1, 'queue': 'q'}]}},
    {'headers': {'nested': {'a': 1}}},
    {'headers': {'ratio': 0.5}},
    {'headers': {'amount': decimal.Decimal('1.5')}},
])
def test_properties_the_decoder_does_not_handle_are_left_to_pamqp(
        properties: dict[str, Any]) -> None:
    marshalled = _header(properties)
    start, end = _payload(marshalled)
    assert decode_properties(marshalled, start, end) is None
    assert body_size_of(marshalled, start) == 10


def frame_start_bytes(size: int) -> bytes:
    """A content header frame's start on channel 1, for a payload of ``size`` bytes."""
    return b'\x02\x00\x01' + size.to_bytes(4, 'big')
