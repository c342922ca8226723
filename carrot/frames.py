"""AMQP frames carrot encodes and decodes itself: a Basic.Publish with its content and a
Basic.Ack out, a Basic.Deliver with its content in.

amqpstorm builds a pamqp object for the method, the properties and each body frame, validates
them and marshals them one field at a time; on the publishing path that was a quarter of
the publisher's CPU. A task message uses a handful of properties, so they are encoded here
in one pass; each frame is byte for byte what pamqp marshals for it (a test compares them).
Bodies are split so that every frame, header and end byte included, fits ``frame_max``.
What this encoder does not handle (a timestamp, nested header tables, a value pamqp would
refuse) returns None: the caller then lets amqpstorm encode, or refuse, it.

A delivery is decoded the same way, into a dict of its method's fields and one of its
properties equal to what pamqp's objects give; what the decoder does not handle (a
timestamp, a header that is a nested table, an array or a float) returns None, and pamqp
decodes that frame.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_END = b'\xce'
FRAME_END_BYTE = 0xCE
FRAME_HEARTBEAT = 8
# A frame's type, channel and size, and its end byte, around the payload.
FRAME_OVERHEAD = 8
BASIC_CLASS = 60
BASIC_PUBLISH = 40
BASIC_ACK = 80

_FRAME_START = struct.Struct('>BHI')
_PUBLISH_START = struct.Struct('>HHH')  # class, method, reserved ticket
_HEADER_START = struct.Struct('>HHQH')  # class, weight, body size, property flags
_LONG = struct.Struct('>I')
_ACK = struct.Struct('>BHIHHQBc')  # a whole frame: start, class, method, tag, bits, end

# Basic properties in the order (and with the flag bits) AMQP 0-9-1 lays them out.
_SHORT_STRING, _OCTET, _TABLE = 's', 'o', 't'
_PROPERTIES: tuple[tuple[str, int, str], ...] = (
    ('content_type', 1 << 15, _SHORT_STRING),
    ('content_encoding', 1 << 14, _SHORT_STRING),
    ('headers', 1 << 13, _TABLE),
    ('delivery_mode', 1 << 12, _OCTET),
    ('priority', 1 << 11, _OCTET),
    ('correlation_id', 1 << 10, _SHORT_STRING),
    ('reply_to', 1 << 9, _SHORT_STRING),
    ('expiration', 1 << 8, _SHORT_STRING),
    ('message_id', 1 << 7, _SHORT_STRING),
    ('message_type', 1 << 5, _SHORT_STRING),
    ('user_id', 1 << 4, _SHORT_STRING),
    ('app_id', 1 << 3, _SHORT_STRING),
)
_KNOWN = frozenset(name for name, _, _ in _PROPERTIES)
# pamqp's rules for an exchange name (AMQP's exchange-name domain).
EXCHANGE_NAME = re.compile(r'[a-zA-Z0-9-_.:@#,/+ ]{0,127}')
MAX_EXCHANGE_NAME = 127
MAX_SHORT_STRING = 255  # bytes of UTF-8: a routing key, a string property
_DELIVERY_MODES = (1, 2)


class _Unsupported(Exception):
    """A value this encoder leaves to pamqp."""


def publish_frames(
    channel_id: int, exchange: str, routing_key: str, body: bytes,
    properties: Mapping[str, Any], mandatory: bool, frame_max: int,
) -> bytes | None:
    """Method, header and body frames of a publish, ready for the socket.

    None when a property is one this encoder does not handle; amqpstorm then does it.
    """
    if not _KNOWN.issuperset(properties) or not EXCHANGE_NAME.fullmatch(exchange) \
            or properties.get('delivery_mode') not in (None, *_DELIVERY_MODES):
        return None
    try:
        payload = (_PUBLISH_START.pack(BASIC_CLASS, BASIC_PUBLISH, 0) + _short_string(exchange)
                   + _short_string(routing_key) + (b'\x01' if mandatory else b'\x00'))
        flags, encoded = _properties(properties)
    except _Unsupported:
        return None
    parts = [_frame(FRAME_METHOD, channel_id, payload),
             _frame(FRAME_HEADER, channel_id,
                    _HEADER_START.pack(BASIC_CLASS, 0, len(body), flags) + encoded)]
    chunk = frame_max - FRAME_OVERHEAD
    for start in range(0, len(body), chunk):
        parts.append(_frame(FRAME_BODY, channel_id, body[start:start + chunk]))
    return b''.join(parts)


def ack_frame(channel_id: int, delivery_tag: int) -> bytes:
    """The Basic.Ack frame of one delivery."""
    return _ACK.pack(FRAME_METHOD, channel_id, 13, BASIC_CLASS, BASIC_ACK, delivery_tag, 0,
                     FRAME_END)


def _frame(kind: int, channel_id: int, payload: bytes) -> bytes:
    return _FRAME_START.pack(kind, channel_id, len(payload)) + payload + FRAME_END


def _properties(properties: Mapping[str, Any]) -> tuple[int, bytes]:
    flags = 0
    parts = []
    for name, flag, kind in _PROPERTIES:
        value = properties.get(name)
        if value is None or value == '':  # pamqp leaves these out too
            continue
        flags |= flag
        if kind == _SHORT_STRING:
            parts.append(_short_string(value))
        elif kind == _OCTET:
            if type(value) is not int or not 0 <= value <= 255:
                raise _Unsupported(name)
            parts.append(bytes((value,)))
        else:
            parts.append(_table(value))
    return flags, b''.join(parts)


def _short_string(value: Any) -> bytes:
    if not isinstance(value, str):
        raise _Unsupported(value)
    encoded = value.encode()
    if len(encoded) > MAX_SHORT_STRING:
        raise _Unsupported(value)  # pamqp raises the error that says so
    return bytes((len(encoded),)) + encoded


def _table(table: Any) -> bytes:
    """A flat field table of strings, integers, booleans and None, sorted as pamqp sorts."""
    if not isinstance(table, dict):
        raise _Unsupported(table)
    parts = []
    for key, value in sorted(table.items()):
        if not isinstance(key, str) or len(key.encode()) > 128:
            raise _Unsupported(key)
        parts.append(_short_string(key))
        parts.append(_table_value(value))
    encoded = b''.join(parts)
    return _LONG.pack(len(encoded)) + encoded


def _table_value(value: Any) -> bytes:
    if value is None:
        return b'V'
    if isinstance(value, bool):
        return b't\x01' if value else b't\x00'
    if isinstance(value, int):
        if -128 <= value <= 127:
            return b'b' + struct.pack('>b', value)
        if -32768 <= value <= 32767:
            return b's' + struct.pack('>h', value)
        if 0 <= value <= 65535:
            return b'u' + struct.pack('>H', value)
        if -2147483648 <= value <= 2147483647:
            return b'I' + struct.pack('>i', value)
        raise _Unsupported(value)  # 64-bit: pamqp's codes for those are left to it
    if isinstance(value, str):
        encoded = value.encode()
        return b'S' + _LONG.pack(len(encoded)) + encoded
    raise _Unsupported(value)


# -- decoding a delivery ---------------------------------------------------------------

BASIC_DELIVER = 60
_DELIVER_START = struct.Struct('>HH')  # class, method
_TAG = struct.Struct('>QB')  # delivery tag, redelivered bit
_BODY_SIZE = struct.Struct('>QH')  # after class and weight: body size, property flags
_SIGNED = {ord('b'): struct.Struct('>b'), ord('B'): struct.Struct('>B'),
           ord('s'): struct.Struct('>h'), ord('u'): struct.Struct('>H'),
           ord('I'): struct.Struct('>i'), ord('i'): struct.Struct('>I'),
           ord('l'): struct.Struct('>q'), ord('L'): struct.Struct('>q')}
_TIMESTAMP_FLAG = 1 << 6
_CLUSTER_ID_FLAG = 1 << 2
_CONTINUATION_FLAG = 1
# Every property unset, in pamqp's order: what its decoded Basic.Properties gives as a dict.
_UNSET: dict[str, Any] = {
    'content_type': None, 'content_encoding': None, 'headers': None, 'delivery_mode': None,
    'priority': None, 'correlation_id': None, 'reply_to': None, 'expiration': None,
    'message_id': None, 'timestamp': None, 'message_type': None, 'user_id': None,
    'app_id': None, 'cluster_id': ''}


@dataclass(slots=True)
class Deliver:
    """A Basic.Deliver frame."""

    #: Its fields, by pamqp's names (``dict()`` of pamqp's Basic.Deliver).
    method: dict[str, Any]
    name: ClassVar[str] = 'Basic.Deliver'


@dataclass(slots=True)
class Header:
    """The content header frame of a delivery."""

    #: The size of the body the body frames after it carry.
    body_size: int
    #: The message's properties, by pamqp's names (``dict()`` of its Basic.Properties).
    properties: dict[str, Any]
    name: ClassVar[str] = 'ContentHeader'


@dataclass(slots=True)
class Body:
    """A content body frame."""

    #: Its part of the message's body.
    value: bytes
    name: ClassVar[str] = 'ContentBody'


def decode_deliver(data: bytes, start: int, end: int) -> dict[str, Any] | None:
    """The fields of the Basic.Deliver in ``data[start:end]``; None for another method."""
    if end - start < 4 or _DELIVER_START.unpack_from(data, start) != (BASIC_CLASS,
                                                                       BASIC_DELIVER):
        return None
    try:
        at, consumer_tag = _short_str(data, start + 4)
        delivery_tag, bits = _TAG.unpack_from(data, at)
        at, exchange = _short_str(data, at + 9)
        at, routing_key = _short_str(data, at)
    except (struct.error, IndexError, UnicodeDecodeError, _Unsupported):
        return None
    if at != end:
        return None
    return {'consumer_tag': consumer_tag, 'delivery_tag': delivery_tag,
            'redelivered': bool(bits & 1), 'exchange': exchange, 'routing_key': routing_key}


def body_size_of(data: bytes, start: int) -> int:
    """The body size a content header frame's payload at ``start`` announces."""
    return int(_BODY_SIZE.unpack_from(data, start + 4)[0])


def decode_properties(data: bytes, start: int, end: int) -> dict[str, Any] | None:
    """The properties of the content header in ``data[start:end]``, as pamqp gives them;
    None for what this decoder leaves to pamqp (a timestamp, a cluster id, a header of
    another type)."""
    try:
        flags = _BODY_SIZE.unpack_from(data, start + 4)[1]
        if flags & (_TIMESTAMP_FLAG | _CLUSTER_ID_FLAG | _CONTINUATION_FLAG):
            return None
        properties = dict(_UNSET)
        at = start + 14
        for name, flag, kind in _PROPERTIES:
            if not flags & flag:
                continue
            if kind == _SHORT_STRING:
                at, properties[name] = _short_str(data, at)
            elif kind == _OCTET:
                properties[name] = data[at]
                at += 1
            else:
                at, properties[name] = _decode_table(data, at)
    except (struct.error, IndexError, UnicodeDecodeError, _Unsupported):
        return None
    return properties if at == end else None


def _short_str(data: bytes, at: int) -> tuple[int, str]:
    length = data[at]
    end = at + 1 + length
    if end > len(data):
        raise _Unsupported('short string past the end')
    return end, data[at + 1:end].decode('utf-8')


def _decode_table(data: bytes, at: int) -> tuple[int, dict[str, Any]]:
    """A flat field table (the types carrot and most clients send); nested tables, arrays,
    timestamps and floats raise _Unsupported."""
    (length,) = _LONG.unpack_from(data, at)
    at += 4
    end = at + length
    table: dict[str, Any] = {}
    while at < end:
        at, key = _short_str(data, at)
        kind = data[at]
        at += 1
        if kind == 83:  # 'S'
            (size,) = _LONG.unpack_from(data, at)
            raw = data[at + 4:at + 4 + size]
            at += 4 + size
            try:
                table[key] = raw.decode('utf-8')
            except UnicodeDecodeError:
                table[key] = raw  # as pamqp gives it
        elif kind == 116:  # 't'
            table[key] = bool(data[at])
            at += 1
        elif kind == 86:  # 'V'
            table[key] = None
        elif (number := _SIGNED.get(kind)) is not None:
            (table[key],) = number.unpack_from(data, at)
            at += number.size
        else:
            raise _Unsupported(kind)
    if at != end:
        raise _Unsupported('field table length')
    return end, table


def frame_start(data: bytes, at: int) -> tuple[int, int, int]:
    """The type, channel and payload size of the frame at ``data[at]``."""
    kind, channel_id, size = _FRAME_START.unpack_from(data, at)
    return int(kind), int(channel_id), int(size)
