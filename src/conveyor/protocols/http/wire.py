"""The JSON shapes of the native HTTP API, as msgspec Structs.

Requests forbid unknown fields, so a misspelt option is a 400 rather than silently
ignored. Each struct converts to and from the engine's model types; the server and the
remote client both use these, so the two sides cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from conveyor.errors import InvalidArgument
from conveyor.model import (
    AckResult,
    Binding,
    Death,
    Delivery,
    ExchangeInfo,
    NewMessage,
    Properties,
    PublishResult,
    QueueInfo,
    QueueOptions,
    QueueStats,
    SendResult,
)
from conveyor.protocols.http.codec import (
    BodyEncoding,
    decode_body,
    decode_headers,
    encode_body,
    encode_headers,
)

__all__ = [
    "AckResult",
    "BindIn",
    "BindingList",
    "DeletedOut",
    "ErrorDetail",
    "ErrorOut",
    "ExchangeIn",
    "ExchangeInfo",
    "ExchangeList",
    "ExtendBatchIn",
    "ExtendIn",
    "MessageIn",
    "MessageList",
    "MessageOut",
    "MovedOut",
    "NackBatchIn",
    "NackIn",
    "PublishBatchIn",
    "PublishBatchOut",
    "PublishIn",
    "PublishResult",
    "PurgedOut",
    "QueueInfo",
    "QueueList",
    "QueueOptions",
    "QueueStats",
    "ReceiptIn",
    "ReceiptsIn",
    "ReceiveIn",
    "RedriveIn",
    "SendBatchIn",
    "SendBatchOut",
    "SendResult",
    "binding_in",
    "binding_out",
    "exchange_in",
    "exchange_out",
]


class _In(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


# Not keyword-only, unlike the other requests: the remote client builds one per message
# of a batch, and positional construction costs about half as much (measured). The JSON
# shape is the same either way. Untracked by the garbage collector (``gc=False``): a
# batch holds hundreds of them at once, each triggering collections that scan the whole
# young heap, and they cannot be part of a cycle (they hold only decoded JSON values and
# Properties). (The docstring is the OpenAPI description.)
class MessageIn(_In, kw_only=False, gc=False):
    """A message to send. ``body`` is text, or base64 when ``body_encoding`` says so."""

    body: str
    body_encoding: BodyEncoding = "utf-8"
    headers: dict[str, Any] = msgspec.field(default_factory=dict)
    properties: Properties = msgspec.field(default_factory=Properties)
    priority: int = 0
    delay: float | None = None
    ttl: float | None = None
    dedup_id: str | None = None
    group_id: str | None = None

    def to_model(self) -> NewMessage:
        headers = self.headers
        return NewMessage(
            body=decode_body(self.body, self.body_encoding),
            # Most messages carry no headers: skip the per-value walk for them.
            headers=decode_headers(headers) if headers else {},
            properties=self.properties,
            priority=self.priority,
            delay=self.delay,
            ttl=self.ttl,
            dedup_id=self.dedup_id,
            group_id=self.group_id,
        )

    @classmethod
    def from_model(cls, msg: NewMessage) -> MessageIn:
        body, encoding = encode_body(msg.body)
        headers = msg.headers
        return cls(
            body,
            encoding,
            encode_headers(headers) if headers else {},
            msg.properties,
            msg.priority,
            msg.delay,
            msg.ttl,
            msg.dedup_id,
            msg.group_id,
        )


class PublishIn(MessageIn):
    """A message to publish through an exchange, with its routing key."""

    routing_key: str = ""

    @classmethod
    def from_model(cls, msg: NewMessage, routing_key: str = "") -> PublishIn:
        m = MessageIn.from_model(msg)
        return cls(**msgspec.structs.asdict(m), routing_key=routing_key)


class PublishBatchIn(_In):
    messages: list[PublishIn]


class SendBatchIn(_In):
    messages: list[MessageIn]


class ReceiveIn(_In):
    max_messages: int = 1
    #: Long-poll seconds: the call returns as soon as anything is ready.
    wait: float = 0.0
    visibility_timeout: float | None = None
    auto_ack: bool = False


class ReceiptIn(_In):
    receipt: str


class ReceiptsIn(_In):
    receipts: list[str]


class NackIn(_In):
    receipt: str
    delay: float = 0.0
    requeue: bool = True


class NackBatchIn(_In):
    receipts: list[str]
    delay: float = 0.0
    requeue: bool = True


class ExtendIn(_In):
    receipt: str
    timeout: float


class ExtendBatchIn(_In):
    receipts: list[str]
    timeout: float


class RedriveIn(_In):
    #: Target queue; by default each message goes back to the queue it died in.
    to: str | None = None
    max_messages: int | None = None


class ExchangeIn(_In):
    type: Literal["direct", "fanout", "topic", "headers"] = "direct"
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)

    def decoded_arguments(self) -> dict[str, Any]:
        return decode_headers(self.arguments)


class BindIn(_In):
    """Bind the exchange in the path to a queue or (exclusive) to another exchange."""

    queue: str | None = None
    exchange: str | None = None
    routing_key: str = ""
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)

    def destination(self) -> tuple[Literal["queue", "exchange"], str]:
        if (self.queue is None) == (self.exchange is None):
            raise InvalidArgument("give exactly one of 'queue' and 'exchange'")
        if self.queue is not None:
            return "queue", self.queue
        assert self.exchange is not None
        return "exchange", self.exchange

    def decoded_arguments(self) -> dict[str, Any] | None:
        return decode_headers(self.arguments) if self.arguments else None


# Not keyword-only: a receive builds one per delivery, and positional construction of
# these 17 fields costs a third of keyword construction (measured). Keep the field order
# in step with ``from_model``. Untracked by the garbage collector, as MessageIn and for
# the same reasons. (The docstring is the OpenAPI description.)
class MessageOut(msgspec.Struct, gc=False):
    """A received or peeked message. ``receipt`` is null for a peek."""

    id: str
    queue: str
    body: str
    body_encoding: BodyEncoding
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
    sequence: int = 0

    @classmethod
    def from_model(cls, d: Delivery) -> MessageOut:
        body, encoding = encode_body(d.body)
        headers = d.headers
        return cls(
            d.id,
            d.queue,
            body,
            encoding,
            # Most messages carry no headers: skip the per-value walk for them.
            encode_headers(headers) if headers else {},
            d.properties,
            d.priority,
            d.sent_at,
            d.receive_count,
            d.first_received_at,
            d.receipt,
            d.group_id,
            d.dedup_id,
            d.exchange,
            d.routing_key,
            d.deaths,
            d.sequence,
        )

    def to_model(self) -> Delivery:
        headers = self.headers
        # At most 15 keyword arguments: with 16, CPython packs them into a dict for the
        # call (CALL_FUNCTION_EX), several times slower; deaths is set after when present.
        d = Delivery(
            id=self.id,
            queue=self.queue,
            body=decode_body(self.body, self.body_encoding),
            headers=decode_headers(headers) if headers else {},
            properties=self.properties,
            priority=self.priority,
            sent_at=self.sent_at,
            receive_count=self.receive_count,
            first_received_at=self.first_received_at,
            receipt=self.receipt,
            group_id=self.group_id,
            dedup_id=self.dedup_id,
            exchange=self.exchange,
            routing_key=self.routing_key,
            sequence=self.sequence,
        )
        if self.deaths:
            d.deaths = self.deaths
        return d


class MessageList(msgspec.Struct, kw_only=True):
    messages: list[MessageOut]


class QueueList(msgspec.Struct, kw_only=True):
    queues: list[QueueInfo]


class ExchangeList(msgspec.Struct, kw_only=True):
    exchanges: list[ExchangeInfo]


class BindingList(msgspec.Struct, kw_only=True):
    bindings: list[Binding]


class SendBatchOut(msgspec.Struct, kw_only=True):
    results: list[SendResult]


class PublishBatchOut(msgspec.Struct, kw_only=True):
    results: list[PublishResult]


class DeletedOut(msgspec.Struct, kw_only=True):
    #: Messages removed with the queue.
    deleted: int


class PurgedOut(msgspec.Struct, kw_only=True):
    purged: int


class MovedOut(msgspec.Struct, kw_only=True):
    moved: int


class ErrorDetail(msgspec.Struct, kw_only=True):
    #: Stable machine code (conveyor.errors ``code``), e.g. ``queue_not_found``.
    code: str
    message: str


class ErrorOut(msgspec.Struct, kw_only=True):
    error: ErrorDetail


def exchange_out(info: ExchangeInfo) -> ExchangeInfo:
    """``info`` with bytes inside its arguments made JSON-safe."""
    if not info.arguments:
        return info
    return msgspec.structs.replace(info, arguments=encode_headers(info.arguments))


def binding_out(b: Binding) -> Binding:
    if not b.arguments:
        return b
    return msgspec.structs.replace(b, arguments=encode_headers(b.arguments))


def exchange_in(info: ExchangeInfo) -> ExchangeInfo:
    """Inverse of :func:`exchange_out` (for the remote client)."""
    if not info.arguments:
        return info
    return msgspec.structs.replace(info, arguments=decode_headers(info.arguments))


def binding_in(b: Binding) -> Binding:
    if not b.arguments:
        return b
    return msgspec.structs.replace(b, arguments=decode_headers(b.arguments))
