"""Frame building and the mapping between AMQP basic properties and conveyor's model.

pamqp decodes everything a client sends and encodes every method. Two things are done
here instead, on purpose:

* Field tables in message headers are encoded by :func:`encode_table`: pamqp writes a
  Python float as a 32-bit ``f`` (losing precision) and cannot write ``bytes``;
  clients (pika, py-amqp) write floats as ``d`` and bytes as ``x``, and so do we.
* Content frames are split at ``frame_max - 8`` by :func:`content_frames`.

Mapping (see docs/amqp.md): every basic property except ``headers`` and ``priority``
goes to :class:`conveyor.model.Properties` (``type`` is pamqp's ``message_type``;
``timestamp`` is epoch seconds); ``headers`` become message headers, ``priority`` the
message priority and ``expiration`` (milliseconds) also the message TTL.
"""

from __future__ import annotations

import datetime
import decimal
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from pamqp import commands, constants, frame
from pamqp.base import Frame

from conveyor.model import Death, Delivery, NewMessage, Properties

from .errors import PRECONDITION_FAILED, AmqpError

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD = constants.FRAME_METHOD
FRAME_HEADER = constants.FRAME_HEADER
FRAME_BODY = constants.FRAME_BODY
FRAME_HEARTBEAT = constants.FRAME_HEARTBEAT
FRAME_END = constants.FRAME_END
HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"

_FRAME_HEAD = struct.Struct(">BHI")
_CONTENT_HEAD = struct.Struct(">HHQ")
_U8 = struct.Struct(">B")
_I8 = struct.Struct(">b")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_U32 = struct.Struct(">I")
_F64 = struct.Struct(">d")
_U64 = struct.Struct(">Q")


# -- field tables -------------------------------------------------------------------


def encode_table(table: Mapping[str, Any]) -> bytes:
    """Encode a field table (with its 4-byte length prefix)."""
    parts: list[bytes] = []
    for key, value in table.items():
        raw_key = str(key).encode()
        if len(raw_key) > 255:
            raise ValueError(f"field table key {key!r} is longer than 255 bytes")
        parts.append(_U8.pack(len(raw_key)))
        parts.append(raw_key)
        parts.append(encode_value(value))
    payload = b"".join(parts)
    return _U32.pack(len(payload)) + payload


def encode_value(value: Any) -> bytes:
    """Encode one field value with its type tag, as RabbitMQ's clients do."""
    if value is None:
        return b"V"
    if isinstance(value, bool):
        return b"t\x01" if value else b"t\x00"
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return b"I" + _I32.pack(value)
        if -(2**63) <= value < 2**63:
            return b"l" + _I64.pack(value)
        raise ValueError(f"integer {value} does not fit in 64 bits")
    if isinstance(value, float):
        return b"d" + _F64.pack(value)
    if isinstance(value, str):
        raw = value.encode()
        return b"S" + _U32.pack(len(raw)) + raw
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return b"x" + _U32.pack(len(raw)) + raw
    if isinstance(value, Mapping):
        return b"F" + encode_table(value)
    if isinstance(value, list | tuple):
        items = b"".join(encode_value(item) for item in value)
        return b"A" + _U32.pack(len(items)) + items
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return b"T" + _U64.pack(int(value.timestamp()))
    if isinstance(value, decimal.Decimal):
        exponent = value.as_tuple().exponent
        if not isinstance(exponent, int):
            raise ValueError(f"decimal {value} is not finite")
        places = max(0, -exponent)
        return b"D" + _U8.pack(places) + _I32.pack(int(value.scaleb(places)))
    raise ValueError(f"cannot encode {type(value).__name__} in a field table")


def plain_value(value: Any) -> Any:
    """Turn a decoded field value into what conveyor stores (bytearray -> bytes)."""
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_value(v) for v in value]
    return value


class _Properties(commands.Basic.Properties):
    """Basic.Properties whose headers table is written by :func:`encode_table`."""

    def encode_property(self, name: str, value: Any) -> bytes:
        if name == "headers":
            return encode_table(value)
        return super().encode_property(name, value)


# -- frames ---------------------------------------------------------------------------


def method_frame(channel: int, method: Frame) -> bytes:
    return frame.marshal(method, channel)


# The two method frames sent per message are built here directly rather than through
# pamqp's generic marshalling, which was ~8% of the server's GIL time on a pika publish
# awaiting each confirm (py-spy). tests/test_amqp_codec.py checks them byte for byte
# against pamqp.
_BASIC_ACK = struct.Struct(">BHIHHQB")
_DELIVER_HEAD = struct.Struct(">BHIHHB")
_DELIVER_TAG = struct.Struct(">QBB")


def basic_ack_frame(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    """Basic.Ack (class 60, method 80) as a whole frame."""
    return _BASIC_ACK.pack(FRAME_METHOD, channel, 13, 60, 80, delivery_tag, multiple) + b"\xce"


def basic_deliver_frame(
    channel: int,
    consumer_tag: str,
    delivery_tag: int,
    redelivered: bool,
    exchange: str,
    routing_key: str,
) -> bytes:
    """Basic.Deliver (class 60, method 60) as a whole frame."""
    ct, ex, rk = consumer_tag.encode(), exchange.encode(), routing_key.encode()
    if len(ct) > 255 or len(ex) > 255 or len(rk) > 255:  # let pamqp report it
        return method_frame(
            channel,
            commands.Basic.Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key),
        )
    size = 4 + 1 + len(ct) + 8 + 1 + 1 + len(ex) + 1 + len(rk)
    return b"".join(
        (
            _DELIVER_HEAD.pack(FRAME_METHOD, channel, size, 60, 60, len(ct)),
            ct,
            _DELIVER_TAG.pack(delivery_tag, redelivered, len(ex)),
            ex,
            _U8.pack(len(rk)),
            rk,
            b"\xce",
        )
    )


def raw_frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_HEAD.pack(frame_type, channel, len(payload)) + payload + b"\xce"


def content_header_payload(properties: commands.Basic.Properties, body_size: int) -> bytes:
    """The payload of a content-header frame (class 60, weight 0, size, properties)."""
    return _CONTENT_HEAD.pack(60, 0, body_size) + properties.marshal()


def content_frames(channel: int, header_payload: bytes, body: bytes, frame_max: int) -> list[bytes]:
    """The header frame and as many body frames as ``frame_max`` needs (none if empty)."""
    frames = [raw_frame(FRAME_HEADER, channel, header_payload)]
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        frames.append(raw_frame(FRAME_BODY, channel, body[start : start + chunk]))
    return frames


def with_body_size(header_payload: bytes, body_size: int) -> bytes:
    """A raw content-header payload with its body size replaced."""
    return header_payload[:4] + _U64.pack(body_size) + header_payload[12:]


# -- properties <-> model -----------------------------------------------------------

_STRING_PROPERTIES = (
    "content_type",
    "content_encoding",
    "correlation_id",
    "reply_to",
    "message_id",
    "app_id",
    "user_id",
    "expiration",
    "cluster_id",
)


def parse_expiration(expiration: str) -> float:
    """Milliseconds as RabbitMQ accepts them (a non-negative integer) -> seconds."""
    if not expiration.isdigit() or not expiration.isascii():
        reason = "no_integer" if not expiration[:1].isdigit() else "leftover_chars"
        raise AmqpError(PRECONDITION_FAILED, f"invalid expiration '{expiration}': {reason}", 60, 40)
    return int(expiration) / 1000.0


def to_new_message(properties: commands.Basic.Properties, body: bytes) -> NewMessage:
    """A published message as conveyor's engine takes it."""
    props = Properties()
    for name in _STRING_PROPERTIES:
        value = getattr(properties, name)
        if value:
            setattr(props, name, value)
    if properties.message_type:
        props.type = properties.message_type
    if properties.delivery_mode is not None:
        props.delivery_mode = properties.delivery_mode
    if properties.timestamp is not None:
        props.timestamp = int(properties.timestamp.timestamp())
    msg = NewMessage(
        body=body,
        properties=props,
        priority=properties.priority or 0,
    )
    if properties.headers:
        msg.headers = plain_value(properties.headers)
    if props.expiration is not None:
        msg.ttl = parse_expiration(props.expiration)
    return msg


def death_table(death: Death) -> dict[str, Any]:
    """One x-death entry, in RabbitMQ's key order and types."""
    return {
        "count": death.count,
        "reason": death.reason,
        "queue": death.queue,
        "time": datetime.datetime.fromtimestamp(int(death.time), tz=datetime.UTC),
        "exchange": death.exchange,
        "routing-keys": list(death.routing_keys),
    }


def add_death_headers(headers: dict[str, Any], deaths: Sequence[Death]) -> None:
    """Render the engine's deaths as ``x-death`` (plus ``x-first-death-*``), as RabbitMQ
    3.10 does: one entry per (queue, reason), newest first, counting repeats.

    A publisher may republish a dead-lettered message with its x-death header; as in
    RabbitMQ the history continues from that header rather than starting again.
    """
    prior = headers.get("x-death")
    merged: list[dict[str, Any]] = (
        [dict(e) for e in prior if isinstance(e, dict)] if isinstance(prior, list) else []
    )
    for death in reversed(deaths):  # oldest first
        entry = death_table(death)
        for i, old in enumerate(merged):
            if old.get("queue") == death.queue and old.get("reason") == death.reason:
                count = old.get("count")
                entry["count"] = (count if isinstance(count, int) else 0) + death.count
                del merged[i]
                break
        merged.insert(0, entry)
    headers["x-death"] = merged
    first = deaths[-1]
    headers.setdefault("x-first-death-exchange", first.exchange)
    headers.setdefault("x-first-death-queue", first.queue)
    headers.setdefault("x-first-death-reason", first.reason)


def delivery_properties(delivery: Delivery) -> commands.Basic.Properties:
    """Basic properties to deliver a stored message with."""
    src = delivery.properties
    headers: dict[str, Any] | None = dict(delivery.headers) if delivery.headers else None
    if delivery.deaths:
        headers = headers or {}
        add_death_headers(headers, delivery.deaths)
    timestamp = None
    if src.timestamp is not None:
        timestamp = datetime.datetime.fromtimestamp(src.timestamp, tz=datetime.UTC)
    props = _Properties(
        content_type=src.content_type,
        content_encoding=src.content_encoding,
        headers=headers,
        delivery_mode=src.delivery_mode if src.delivery_mode in (1, 2) else None,
        priority=delivery.priority or None,
        correlation_id=src.correlation_id,
        reply_to=src.reply_to,
        expiration=src.expiration,
        message_id=src.message_id,
        timestamp=timestamp,
        message_type=src.type,
        user_id=src.user_id,
        app_id=src.app_id,
    )
    # cluster_id is deprecated and pamqp refuses to write it; it is carried, not sent.
    return props


def properties_payload(delivery: Delivery) -> bytes:
    """The content-header payload for delivering ``delivery``."""
    return content_header_payload(delivery_properties(delivery), len(delivery.body))
