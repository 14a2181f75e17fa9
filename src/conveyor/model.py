"""Plain data types shared by every layer.

They are msgspec Structs so the store can persist them and the HTTP layer can
serialize them without hand-written codecs. Nothing here does I/O.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from conveyor.errors import InvalidArgument, InvalidName

Durability = Literal["fsync", "os", "none"]
ExchangeType = Literal["direct", "fanout", "topic", "headers"]
Overflow = Literal["reject-new", "drop-oldest"]
#: Why a message was dead-lettered. The names are RabbitMQ's, so x-death reads the same.
DeathReason = Literal["rejected", "expired", "maxlen", "delivery_limit"]

EXCHANGE_TYPES: tuple[str, ...] = ("direct", "fanout", "topic", "headers")
DEFAULT_EXCHANGE = ""

MAX_NAME_LENGTH = 255
# Dots and colons are allowed because SQS FIFO names end in ".fifo" and AMQP names such
# as "celery.pidbox" or "amq.gen-..." use them; slashes and control characters are not,
# so no name can ever be read as a path or collide with internal objects.
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-.:@]+$")


def check_name(name: object, what: str = "queue") -> str:
    """Return ``name`` if it is a valid queue or exchange name, else raise InvalidName."""
    if not isinstance(name, str):
        raise InvalidName(f"{what} name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidName(f"{what} name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"{what} name is {len(name)} characters; the limit is {MAX_NAME_LENGTH}")
    if not _NAME_RE.match(name):
        raise InvalidName(
            f"{what} name {name!r} has characters outside letters, digits and _ - . : @"
        )
    return name


class Properties(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Standard message properties (AMQP basic properties and their kin)."""

    content_type: str | None = None
    content_encoding: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    message_id: str | None = None
    timestamp: int | None = None
    type: str | None = None
    app_id: str | None = None
    user_id: str | None = None
    expiration: str | None = None
    delivery_mode: int | None = None
    cluster_id: str | None = None


PROPERTY_NAMES: tuple[str, ...] = tuple(Properties.__struct_fields__)


class Death(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One dead-lettering event, as RabbitMQ's x-death records it."""

    reason: str
    queue: str
    time: float
    count: int = 1
    exchange: str = ""
    routing_keys: list[str] = msgspec.field(default_factory=list)


class NewMessage(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A message as a producer hands it to the broker."""

    body: bytes
    headers: dict[str, Any] = msgspec.field(default_factory=dict)
    properties: Properties = msgspec.field(default_factory=Properties)
    priority: int = 0
    delay: float | None = None
    ttl: float | None = None
    dedup_id: str | None = None
    group_id: str | None = None


class Meta(msgspec.Struct, omit_defaults=True, array_like=True):
    """What the store keeps beside the body in one blob (headers, properties, routing)."""

    headers: dict[str, Any] = msgspec.field(default_factory=dict)
    properties: Properties = msgspec.field(default_factory=Properties)
    exchange: str = ""
    routing_key: str = ""
    deaths: list[Death] = msgspec.field(default_factory=list)


class Delivery(msgspec.Struct, kw_only=True):
    """A leased (or peeked) message. ``receipt`` is None for a peek."""

    id: str
    queue: str
    body: bytes
    headers: dict[str, Any]
    properties: Properties
    priority: int
    sent_at: float
    receive_count: int
    first_received_at: float | None
    receipt: str | None
    group_id: str | None = None
    dedup_id: str | None = None
    exchange: str = ""
    routing_key: str = ""
    deaths: list[Death] = msgspec.field(default_factory=list)
    #: Monotonic per-queue sequence (the store id); SQS FIFO exposes it as SequenceNumber.
    sequence: int = 0


class QueueOptions(msgspec.Struct, omit_defaults=True, kw_only=True, forbid_unknown_fields=True):
    """Options fixed at creation (and changeable by update).

    Times are in seconds. ``dead_letter`` names a queue; ``dead_letter_exchange``
    (AMQP's x-dead-letter-exchange) routes dead letters through an exchange instead.
    """

    visibility_timeout: float = 30.0
    max_receives: int | None = None
    dead_letter: str | None = None
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    message_ttl: float | None = None
    max_length: int | None = None
    overflow: Overflow = "reject-new"
    max_priority: int = 9
    delay: float = 0.0
    dedup_window: float = 300.0
    fifo: bool = False
    expires: float | None = None
    max_message_size: int | None = None
    #: Free-form attributes a protocol wants kept with the queue (SQS tags, policy...).
    attributes: dict[str, str] = msgspec.field(default_factory=dict)

    def validate(self) -> QueueOptions:
        _range("visibility_timeout", self.visibility_timeout, 0, 12 * 3600)
        if self.max_receives is not None:
            _range("max_receives", self.max_receives, 1, 1_000_000)
        if self.dead_letter is not None:
            check_name(self.dead_letter, "dead-letter queue")
        if self.message_ttl is not None:
            _range("message_ttl", self.message_ttl, 0, 10 * 365 * 86400)
        if self.max_length is not None:
            _range("max_length", self.max_length, 0, 2**62)
        if self.overflow not in ("reject-new", "drop-oldest"):
            raise InvalidArgument("overflow must be 'reject-new' or 'drop-oldest'")
        _range("max_priority", self.max_priority, 0, 255)
        _range("delay", self.delay, 0, 365 * 86400)
        _range("dedup_window", self.dedup_window, 0, 365 * 86400)
        if self.expires is not None:
            _range("expires", self.expires, 0.001, 10 * 365 * 86400)
        if self.max_message_size is not None:
            _range("max_message_size", self.max_message_size, 1, 256 * 1024 * 1024)
        return self


def _range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number, got {type(value).__name__}")
    if value != value or not (low <= value <= high):  # value != value catches NaN
        raise InvalidArgument(f"{name} must be between {low} and {high}, got {value}")


def check_seconds(name: str, value: float | None, high: float) -> float | None:
    """Validate an optional duration argument (delay, ttl, timeout)."""
    if value is None:
        return None
    _range(name, value, 0, high)
    return float(value)


class QueueStats(msgspec.Struct, kw_only=True):
    ready: int
    in_flight: int
    delayed: int
    #: Messages this queue has sent to its dead-letter target since it was created.
    dead_lettered: int
    #: Age in seconds of the oldest message waiting (ready or delayed); 0 when empty.
    oldest_age: float
    sent_total: int
    received_total: int
    acked_total: int
    nacked_total: int
    expired_total: int
    consumers: int = 0


class QueueInfo(msgspec.Struct, kw_only=True):
    name: str
    options: QueueOptions
    created_at: float


class ExchangeInfo(msgspec.Struct, kw_only=True):
    name: str
    type: str
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)


class Binding(msgspec.Struct, kw_only=True, frozen=True):
    """exchange ``source`` -> queue or exchange ``destination``."""

    source: str
    destination: str
    destination_kind: Literal["queue", "exchange"] = "queue"
    routing_key: str = ""
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)

    def key(self) -> tuple[str, str, str, str, bytes]:
        return (
            self.source,
            self.destination_kind,
            self.destination,
            self.routing_key,
            msgspec.msgpack.encode(sorted(self.arguments.items())),
        )


class SendResult(msgspec.Struct, kw_only=True):
    id: str
    #: False when the dedup id was seen within the window and nothing was stored.
    stored: bool = True
    sequence: int = 0


class PublishResult(msgspec.Struct, kw_only=True):
    """How a publish through an exchange went: one id per queue that got a copy."""

    routed: int
    ids: dict[str, str] = msgspec.field(default_factory=dict)
    #: Queues that matched but refused the message (max_length with reject-new).
    rejected: list[str] = msgspec.field(default_factory=list)


class AckResult(msgspec.Struct, kw_only=True):
    """Per-receipt outcome of a batch ack/nack/extend: receipts that were not current."""

    ok: int
    failed: list[str] = msgspec.field(default_factory=list)
