"""The hand-encoded frames: byte for byte what pamqp (amqpstorm's encoder) writes."""

from __future__ import annotations

from typing import Any

import pytest
from pamqp import body as pamqp_body
from pamqp import commands, frame, header

from carrot import message
from carrot.frames import FRAME_OVERHEAD, ack_frame, publish_frames


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
