"""The AMQP 0-9-1 listener: sockets <-> :mod:`conveyor.protocols.amqp` <-> Broker calls.

One :class:`_Connection` per socket (an asyncio.Protocol). Frames are parsed by the
sans-I/O :class:`ServerConnection`; the events it returns are handled in order by
one task per connection. Semantics (routing, TTL, priority, dead-lettering, leases)
are the engine's; this module only translates.

* Publishes are gathered per channel and handed to ``Broker.publish_batch`` as tasks
  (tasks start in creation order, so the store sees messages in publish order);
  confirms and Basic.Return go out in sequence order once each batch commits. Any
  other method on that channel waits for the channel's publishes first.
* A consumer is a task looping over ``Broker.receive`` (a long poll) with as many
  messages as its credit allows (``Basic.Qos`` per consumer and per channel). Leases
  are long (``consumer_lease``, RabbitMQ's 30-minute consumer timeout); everything
  unacked goes back to its queue (``nack(requeue=True)``) when the channel closes.
* Acks arriving together are sent as one ``ack_batch`` per queue.
* AMQP-only queue facts (durable, exclusive, auto-delete, the declared arguments)
  live in ``QueueOptions.attributes`` under ``amqp.*`` keys, so a redeclare is
  compared the way RabbitMQ compares it.
* Virtual hosts are this adapter's business (the engine has one namespace): see
  :class:`Vhost`. Every name a client sends is mapped to the engine's name at the
  handler's entry, and every name sent back is mapped back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import secrets
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
import msgspec.structs
from pamqp import commands
from pamqp.base import Frame

from conveyor import errors
from conveyor.broker import Broker
from conveyor.broker.broker import STANDARD_EXCHANGES
from conveyor.model import (
    Death,
    Delivery,
    NewMessage,
    PublishResult,
    QueueInfo,
    QueueOptions,
)
from conveyor.protocols.amqp import codec
from conveyor.protocols.amqp.connection import (
    ChannelClosed,
    ChannelOpened,
    ConnectionClosed,
    ConnectionOpened,
    ConnectionTerminated,
    Event,
    MessageReceived,
    MethodReceived,
    ServerConnection,
    State,
)
from conveyor.protocols.amqp.errors import (
    ACCESS_REFUSED,
    COMMAND_INVALID,
    CONNECTION_FORCED,
    INTERNAL_ERROR,
    NO_ROUTE,
    NOT_ALLOWED,
    NOT_FOUND,
    NOT_IMPLEMENTED,
    PRECONDITION_FAILED,
    RESOURCE_LOCKED,
    AmqpError,
)

log = logging.getLogger("conveyor.server.amqp")

try:  # the package version, advertised in Connection.Start
    from importlib.metadata import version as _pkg_version

    VERSION = _pkg_version("conveyor-mq")
except Exception:  # pragma: no cover - running from a source tree
    VERSION = "0.1.0"

#: RabbitMQ's default consumer timeout; an unacked delivery is held this long.
DEFAULT_CONSUMER_LEASE = 1800.0
#: How long one consumer long poll waits before polling again.
CONSUMER_POLL = 30.0
#: Messages leased per receive when credit is unlimited.
MAX_RECEIVE = 250
#: Publishes in one publish_batch call.
MAX_PUBLISH_BATCH = 500
#: Unconfirmed publishes per connection before reading pauses (TCP back-pressure).
MAX_PENDING_PUBLISHES = 20_000
#: Unconfirmed publishes on the whole server that raise the "memory" alarm (publishing
#: connections get Connection.Blocked); it clears below half of this.
PUBLISH_HIGH_WATER = 100_000
#: While the store reports StoreFull, a held publish batch is retried this often.
STORE_FULL_RETRY = 1.0
VHOST = "/"

_ATTR_DURABLE = "amqp.durable"
_ATTR_EXCLUSIVE = "amqp.exclusive"
_ATTR_AUTO_DELETE = "amqp.auto_delete"
_ATTR_ARGUMENTS = "amqp.arguments"

_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.decode


# -- virtual hosts ----------------------------------------------------------------------

#: Vhost names other than "/": what the engine's names allow, minus "@" (the separator).
VHOST_NAME_RE = re.compile(r"^[A-Za-z0-9_\-.:]{1,64}$")
#: In a vhost other than "/", the default exchange is a direct exchange of this name
#: (prefixed) to which every queue of the vhost is bound by its name.
DEFAULT_ALIAS = "amq.default"


def check_vhost_name(name: str) -> str:
    """``name`` if it can be a vhost, else ValueError (the message says why)."""
    if name == "/" or VHOST_NAME_RE.match(name):
        return name
    raise ValueError(
        f"vhost name {name!r} must be '/' or 1 to 64 characters of letters, digits and _ - . :"
    )


class Vhost:
    """One virtual host: how its AMQP names map to the engine's names.

    ``/`` maps every name to itself, so what AMQP clients see on ``/`` is what the
    native API and SQS see. Any other vhost ``v`` prefixes its queue and exchange names
    with ``@v@`` (vhost names have no "@", so the prefix ends at the second "@"). On
    ``/``, AMQP names starting with "@" are refused or invisible, so no ``/`` client
    can reach another vhost's objects. Each vhost has its own ``amq.*`` exchanges, and
    its default exchange is the direct exchange ``@v@amq.default`` with every queue of
    the vhost bound to it by its name: publishes to "" and dead letters routed through
    "" (with their original routing keys) stay inside the vhost.
    """

    __slots__ = ("default", "name", "prefix", "root")

    def __init__(self, name: str) -> None:
        self.name = check_vhost_name(name)
        self.root = name == "/"
        self.prefix = "" if self.root else f"@{name}@"
        #: The engine exchange that is this vhost's default exchange ("" on "/").
        self.default = "" if self.root else self.prefix + DEFAULT_ALIAS

    def hidden(self, name: str) -> bool:
        """Whether an AMQP queue name is outside what this vhost may name."""
        return self.root and name.startswith("@")

    def hidden_exchange(self, name: str) -> bool:
        return (self.root and name.startswith("@")) or name == DEFAULT_ALIAS

    def queue(self, name: str) -> str:
        """The engine's name of AMQP queue ``name`` (check :meth:`hidden` first)."""
        return self.prefix + name if self.prefix else name

    def exchange(self, name: str) -> str:
        if not self.prefix:
            return name
        return self.default if name == "" else self.prefix + name

    def local(self, internal: str) -> str:
        """The AMQP name of engine queue or exchange ``internal``."""
        if self.prefix and internal.startswith(self.prefix):
            return internal[len(self.prefix) :]
        return internal

    def local_exchange(self, internal: str) -> str:
        return "" if internal == self.default else self.local(internal)

    def text(self, message: str) -> str:
        """An engine error message with this vhost's prefix taken out of its names."""
        return message.replace(self.prefix, "") if self.prefix else message

    def delivered(self, d: Delivery) -> Delivery:
        """``d`` with the names a client sees (exchange, routing key, x-death)."""
        if not self.prefix:
            return d

        def key(exchange: str, k: str) -> str:
            # A routing key through the engine's own default exchange is a queue name
            # (native sends, requeued auto-ack deliveries).
            return self.local(k) if exchange == "" else k

        deaths = [
            Death(
                reason=x.reason,
                queue=self.local(x.queue),
                time=x.time,
                count=x.count,
                exchange=self.local_exchange(x.exchange),
                routing_keys=[key(x.exchange, k) for k in x.routing_keys],
            )
            for x in d.deaths
        ]
        return msgspec.structs.replace(
            d,
            exchange=self.local_exchange(d.exchange),
            routing_key=key(d.exchange, d.routing_key),
            deaths=deaths,
        )


ROOT = Vhost("/")


def _q_missing(name: str, vhost: str = VHOST) -> AmqpError:
    return AmqpError(NOT_FOUND, f"no queue '{name}' in vhost '{vhost}'")


def _x_missing(name: str, vhost: str = VHOST) -> AmqpError:
    return AmqpError(NOT_FOUND, f"no exchange '{name}' in vhost '{vhost}'")


def _locked(name: str, vhost: str = VHOST) -> AmqpError:
    return AmqpError(
        RESOURCE_LOCKED,
        f"cannot obtain exclusive access to locked queue '{name}' in vhost '{vhost}'. It "
        "could be originally declared on another connection or the exclusive property "
        "value does not match that of the original declaration.",
    )


def translate(
    exc: errors.ConveyorError, *, queue: str = "", exchange: str = "", vhost: Vhost = ROOT
) -> AmqpError:
    """Engine errors in AMQP's terms (the one boundary for this adapter). ``queue`` and
    ``exchange`` are AMQP names; engine texts lose ``vhost``'s prefix."""
    if isinstance(exc, errors.QueueNotFound):
        return _q_missing(queue or "?", vhost.name)
    if isinstance(exc, errors.ExchangeNotFound):
        return _x_missing(exchange or "?", vhost.name)
    if isinstance(exc, errors.ClosedError):
        return AmqpError(
            CONNECTION_FORCED, "broker forced connection closure with reason 'shutdown'"
        )
    text = vhost.text(exc.message or exc.code)
    if isinstance(exc, errors.StoreError):
        return AmqpError(INTERNAL_ERROR, text or "store failure")
    if isinstance(exc, errors.InvalidArgument | errors.Conflict | errors.QueueFull):
        return AmqpError(PRECONDITION_FAILED, text)
    return AmqpError(INTERNAL_ERROR, text)


# -- queue arguments ------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "signedint" if -(2**31) <= value < 2**31 else "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str | bytes):
        return "longstr"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "void"


def _describe(value: Any) -> str:
    if value is None:
        return "none"
    shown = value.decode(errors="replace") if isinstance(value, bytes) else value
    if isinstance(value, bool):
        shown = "true" if value else "false"
    return f"the value '{shown}' of type '{_type_name(value)}'"


_QUEUE_ARGS = (
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-priority",
    "x-delivery-limit",
    "x-queue-type",
    "x-queue-mode",
    "x-queue-master-locator",
    "x-single-active-consumer",
)


def _plain_args(arguments: dict[str, Any] | None) -> dict[str, Any]:
    """The declared arguments RabbitMQ compares on redeclare, JSON-safe."""
    out: dict[str, Any] = {}
    for key, value in sorted((arguments or {}).items()):
        if key not in _QUEUE_ARGS:
            continue
        if isinstance(value, bytes | bytearray):
            value = bytes(value).decode(errors="replace")
        out[key] = value
    return out


def queue_options(name: str, arguments: dict[str, Any] | None, vhost: str = VHOST) -> QueueOptions:
    """QueueOptions for AMQP queue arguments (RabbitMQ's names and units). The
    dead-letter exchange is the AMQP name (the caller maps it into its vhost)."""
    args = arguments or {}
    opts = QueueOptions(max_priority=0, visibility_timeout=30.0)

    def bad(key: str, why: str) -> AmqpError:
        return AmqpError(
            PRECONDITION_FAILED,
            f"invalid arg '{key}' for queue '{name}' in vhost '{vhost}': {why}",
            50,
            10,
        )

    def integer(key: str, low: int, high: int = 2**63) -> int | None:
        value = args.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(key, f"{{unacceptable_type,{_type_name(value)}}}")
        if value < low:
            raise bad(
                key, f"{{value_negative,{value}}}" if value < 0 else f"{{value_zero,{value}}}"
            )
        if value > high:
            raise bad(key, f"{{value_too_large,{value},{high}}}")
        return value

    ttl = integer("x-message-ttl", 0)
    if ttl is not None:
        opts.message_ttl = ttl / 1000.0
    expires = integer("x-expires", 1)
    if expires is not None:
        opts.expires = expires / 1000.0
    max_length = integer("x-max-length", 0)
    if max_length is not None:
        opts.max_length = max_length
        opts.overflow = "drop-oldest"  # RabbitMQ's default overflow is drop-head
    priority = integer("x-max-priority", 0, 255)
    if priority is not None:
        opts.max_priority = priority
    limit = integer("x-delivery-limit", 0)
    if limit is not None:
        opts.max_receives = min(limit + 1, 1_000_000)
    overflow = _text(args.get("x-overflow"))
    if overflow is not None:
        if overflow == "drop-head":
            opts.overflow = "drop-oldest"
        elif overflow in ("reject-publish", "reject-publish-dlx"):
            opts.overflow = "reject-new"
        else:
            raise bad("x-overflow", f'{{unknown_overflow,<<"{overflow}">>}}')
    dlx = _text(args.get("x-dead-letter-exchange"))
    if dlx is not None:
        opts.dead_letter_exchange = dlx
        dlk = _text(args.get("x-dead-letter-routing-key"))
        if dlk is not None:
            opts.dead_letter_routing_key = dlk
    elif "x-dead-letter-routing-key" in args:
        raise bad("x-dead-letter-routing-key", "{missing_dlx,none}")
    kind = _text(args.get("x-queue-type"))
    if kind is not None and kind not in ("classic", "quorum"):
        raise bad("x-queue-type", f'{{unsupported_queue_type,<<"{kind}">>}}')
    return opts


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode(errors="replace")
    return str(value)


# -- per-connection state -------------------------------------------------------------


@dataclass(eq=False)
class _Unacked:
    queue: str
    receipt: str | None
    consumer: _Consumer | None


@dataclass(eq=False)
class _Consumer:
    tag: str
    queue: str
    channel: _Channel
    connection: _Connection
    no_ack: bool
    prefetch: int
    exclusive: bool
    unacked: int = 0
    cancelled: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Batch:
    exchange: str  # the AMQP name
    target: str  # the engine's name
    items: list[tuple[NewMessage, str]] = field(default_factory=list)
    events: list[MessageReceived] = field(default_factory=list)
    #: Confirm sequence numbers (empty when the channel is not in confirm mode).
    seqs: list[int] = field(default_factory=list)
    outcome: list[tuple[bool, bool]] | None = None  # per message: (ack, returned)


@dataclass(eq=False)
class _Channel:
    number: int
    prefetch: int = 0  # for consumers created from now on (Basic.Qos global=false)
    global_prefetch: int = 0
    unacked: dict[int, _Unacked] = field(default_factory=dict)
    next_tag: int = 1
    consumers: dict[str, _Consumer] = field(default_factory=dict)
    confirm: bool = False
    next_seq: int = 1
    tx: bool = False
    tx_publishes: list[MessageReceived] = field(default_factory=list)
    tx_acks: list[Frame] = field(default_factory=list)
    batch: _Batch | None = None
    inflight: deque[_Batch] = field(default_factory=deque)
    publish_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: Acks, nacks and rejects on their way to the store (later methods wait for them).
    ack_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    pending_acks: dict[str, list[str]] = field(default_factory=dict)
    last_queue: str = ""
    active: bool = True  # Channel.Flow
    closed: bool = False
    credit: asyncio.Event = field(default_factory=asyncio.Event)

    def global_credit(self) -> int | None:
        if not self.global_prefetch:
            return None
        used = sum(1 for u in self.unacked.values() if u.consumer is not None)
        return max(0, self.global_prefetch - used)


class _Connection(asyncio.Protocol):
    def __init__(self, server: AmqpServer) -> None:
        self.server = server
        self.broker = server.broker
        self.transport: asyncio.Transport | None = None
        self.conn: ServerConnection | None = None
        self.events: deque[Event] = deque()
        self.wake = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.channels: dict[int, _Channel] = {}
        self.task: asyncio.Task[None] | None = None
        self.heartbeat_handle: asyncio.TimerHandle | None = None
        self.closed = False
        self.peer_loopback = False
        self.pending_publishes = 0
        self.reading_paused = False
        #: Has published (RabbitMQ blocks publishing connections only).
        self.publisher = False
        #: Blocked by a resource alarm: not reading, Connection.Blocked sent.
        self.blocked = False
        #: Engine names of the exclusive queues this connection declared.
        self.exclusive_queues: set[str] = set()
        #: The vhost opened (``/`` until Connection.Open).
        self.vh = ROOT
        #: Work of closed channels that Close-Ok must wait for (requeues, publishes).
        self.cleanup_tasks: set[asyncio.Task[None]] = set()
        self.name = "?"

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only look like them.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else ""
        self.name = f"{host}:{peer[1]}" if isinstance(peer, tuple) else "?"
        try:
            self.peer_loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            self.peer_loopback = isinstance(peer, str)  # a Unix socket is local
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = ServerConnection(
            authenticate=self._authenticate,
            open_refusal=self.server.open_refusal,
            product="conveyor",
            version=VERSION,
            frame_max=self.server.frame_max,
            channel_max=self.server.channel_max,
            heartbeat=self.server.heartbeat,
            max_message_size=self.server.max_message_size,
        )
        self.server.connections.add(self)
        self.task = asyncio.get_running_loop().create_task(self._run(), name="amqp-connection")
        self.heartbeat_handle = asyncio.get_running_loop().call_later(
            self.server.handshake_timeout, self._handshake_timeout
        )

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self.closed:
            return
        events = conn.receive_data(data)
        if events:
            self.events.extend(events)
            self.wake.set()
            if len(self.events) > 5000:
                self._pause_reading()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.heartbeat_handle is not None:
            self.heartbeat_handle.cancel()
        self.writable.set()
        self.wake.set()
        self._teardown()
        self.server.connections.discard(self)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # -- helpers --------------------------------------------------------------------------

    def _authenticate(self, user: str, password: str) -> bool:
        return self.server.authenticate(user, password, self.peer_loopback)

    def _flush(self) -> None:
        if self.conn is None or self.transport is None:
            return
        data = self.conn.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        if (
            self.reading_paused
            and not self.blocked
            and self.transport is not None
            and len(self.events) < 1000
            and self.pending_publishes < MAX_PENDING_PUBLISHES // 2
        ):
            self.reading_paused = False
            self.transport.resume_reading()

    def _handshake_timeout(self) -> None:
        if self.conn is not None and self.conn.state is not State.OPEN and not self.closed:
            log.info("amqp %s: handshake timed out", self.name)
            self._abort()

    def _heartbeat(self) -> None:
        conn = self.conn
        if conn is None or self.closed:
            return
        if not conn.heartbeat_tick(monitor=not self.reading_paused):
            log.info(
                "amqp %s: missed heartbeats from client, timeout: %ss", self.name, conn.heartbeat
            )
            self._abort()
            return
        self._flush()
        self.heartbeat_handle = asyncio.get_running_loop().call_later(
            conn.heartbeat / 2, self._heartbeat
        )

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def block(self) -> None:
        """A resource alarm is on and this connection publishes: stop reading from it
        and tell it (Connection.Blocked, for clients with the capability)."""
        if self.blocked or self.closed or self.conn is None or self.conn.state is not State.OPEN:
            return
        self.blocked = True
        if self.conn.client_capability("connection.blocked"):
            self.conn.send_method(0, commands.Connection.Blocked(self.server.alarm_reason()))
            self._flush()
        self._pause_reading()

    def unblock(self) -> None:
        if not self.blocked:
            return
        self.blocked = False
        if self.closed or self.conn is None:
            return
        if self.conn.state is State.OPEN and self.conn.client_capability("connection.blocked"):
            self.conn.send_method(0, commands.Connection.Unblocked())
            self._flush()
        self._maybe_resume_reading()

    def _close_transport_later(self) -> None:
        """After Connection.Close: wait briefly for Close-Ok, then hang up."""
        loop = asyncio.get_running_loop()

        def hang_up() -> None:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

        loop.call_later(1.0, hang_up)

    # -- the event loop of this connection -----------------------------------------------

    async def _run(self) -> None:
        try:
            while not self.closed:
                if not self.events:
                    self._flush_publishes()
                    self._flush_acks()
                    self._flush()
                    self._maybe_resume_reading()
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                event = self.events.popleft()
                try:
                    await self._handle(event)
                except AmqpError as error:
                    self._fail(event, error)
                self._flush()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("amqp %s: connection task failed", self.name)
            if self.conn is not None:
                self.conn.close(INTERNAL_ERROR, "INTERNAL_ERROR - internal error")
                self._flush()
            self._teardown()
            self._close_transport_later()

    def _fail(self, event: Event, error: AmqpError) -> None:
        conn = self.conn
        assert conn is not None
        channel = getattr(event, "channel", 0)
        method = getattr(event, "method", None)
        if method is not None:
            error.for_method(method.index >> 16, method.index & 0xFFFF)
        if error.hard or channel == 0:
            log.info("amqp %s: closing connection: %s", self.name, error.reply_text)
            conn.fail(error)
            self._flush()
            self._teardown()
            self._close_transport_later()
        else:
            ch = self.channels.get(channel)
            if ch is not None:
                self._drop_channel(ch)
            conn.close_channel(
                channel, error.code, error.reply_text, error.class_id, error.method_id
            )

    async def _handle(self, event: Event) -> None:
        if isinstance(event, MessageReceived):
            ch = self.channels.get(event.channel)
            if ch is not None:
                self._on_publish(ch, event)
        elif isinstance(event, MethodReceived):
            if event.channel == 0:
                await self._connection_method(event.method)
                return
            ch = self.channels.get(event.channel)
            if ch is None:
                return
            method = event.method
            if isinstance(method, commands.Basic.Ack | commands.Basic.Nack | commands.Basic.Reject):
                self._on_ack(ch, method)
                return
            await self._settle_publishes(ch)
            if ch.closed:
                return
            handler = _HANDLERS.get(type(method))
            if handler is None:
                raise AmqpError(NOT_IMPLEMENTED, f"method {method.name} is not implemented")
            await handler(self, ch, method)
        elif isinstance(event, ChannelOpened):
            self.channels[event.channel] = _Channel(event.channel)
        elif isinstance(event, ChannelClosed):
            ch = self.channels.get(event.channel)
            if ch is not None:
                self._drop_channel(ch)
            if event.by_peer and self.conn is not None:
                # As in RabbitMQ, Close-Ok means the channel's unacked messages are back.
                await self._drain_all()
                self.conn.send_channel_close_ok(event.channel)
        elif isinstance(event, ConnectionOpened):
            self.vh = self.server.vhosts.get(event.vhost, ROOT)
            if self.heartbeat_handle is not None:
                self.heartbeat_handle.cancel()
                self.heartbeat_handle = None
            assert self.conn is not None
            if self.conn.heartbeat > 0:
                self.heartbeat_handle = asyncio.get_running_loop().call_later(
                    self.conn.heartbeat / 2, self._heartbeat
                )
        elif isinstance(event, ConnectionClosed):
            self._teardown()
            if event.by_peer and self.conn is not None:
                # Acks and publishes already received are applied before Close-Ok.
                await self._drain_all()
                self.conn.send_connection_close_ok()
                self._flush()
                if self.transport is not None:
                    self.transport.close()
            else:
                self._flush()
                self._close_transport_later()
            self.closed = True
        elif isinstance(event, ConnectionTerminated):
            self._flush()
            self._teardown()
            if self.transport is not None:
                self.transport.close()
            self.closed = True

    async def _connection_method(self, method: Frame) -> None:
        assert self.conn is not None
        if isinstance(method, commands.Connection.UpdateSecret):
            self.conn.send_method(0, commands.Connection.UpdateSecretOk())
        # Blocked/Unblocked from a client are meaningless to a server; ignore them.

    # -- teardown -------------------------------------------------------------------------

    def _drop_channel(self, ch: _Channel) -> None:
        """Forget a channel: stop its consumers, requeue what it left unacked."""
        if ch.closed:
            return
        ch.closed = True
        self.channels.pop(ch.number, None)
        self._flush_publishes_of(ch)
        for consumer in list(ch.consumers.values()):
            self._cancel_consumer(consumer)
        self._flush_acks_of(ch)
        requeue: dict[str, list[str]] = {}
        for item in ch.unacked.values():
            if item.receipt is not None:
                requeue.setdefault(item.queue, []).append(item.receipt)
        ch.unacked.clear()
        for queue, receipts in requeue.items():
            self._spawn_ack(ch, self._nack(queue, receipts, True))
        self.cleanup_tasks.update(ch.publish_tasks, ch.ack_tasks)
        ch.credit.set()

    def _teardown(self) -> None:
        for ch in list(self.channels.values()):
            self._drop_channel(ch)
        for queue in list(self.exclusive_queues):
            self.exclusive_queues.discard(queue)
            self.server.exclusive_owner.pop(queue, None)
            self.server.spawn(self.server.delete_queue_quietly(queue))

    async def _drain_all(self) -> None:
        tasks = [t for t in self.cleanup_tasks if not t.done()]
        self.cleanup_tasks.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _nack(self, queue: str, receipts: list[str], requeue: bool) -> None:
        with contextlib.suppress(errors.ConveyorError):
            await self.broker.nack_batch(queue, receipts, requeue=requeue)

    # -- publishing -----------------------------------------------------------------------

    def _on_publish(self, ch: _Channel, event: MessageReceived) -> None:
        if ch.tx:
            ch.tx_publishes.append(event)
            return
        props = event.properties
        if props.user_id and props.user_id != (self.conn.user if self.conn else ""):
            raise AmqpError(
                PRECONDITION_FAILED,
                f"user_id property set to '{props.user_id}' but authenticated user was "
                f"'{self.conn.user if self.conn else ''}'",
                60,
                40,
            )
        msg = codec.to_new_message(props, event.body)
        exchange = event.method.exchange
        key = event.method.routing_key
        vh = self.vh
        if vh.root and exchange == "" and key.startswith("@"):
            key = "/"  # another vhost's queue: routed nowhere (no queue is named "/")
        self.publisher = True
        if self.server.alarms:
            self.block()
        batch = ch.batch
        if batch is not None and (
            batch.exchange != exchange or len(batch.items) >= MAX_PUBLISH_BATCH
        ):
            self._flush_publishes_of(ch)
            batch = None
        if batch is None:
            target = "/" if vh.hidden_exchange(exchange) else vh.exchange(exchange)
            batch = ch.batch = _Batch(exchange, target)
        batch.items.append((msg, key))
        batch.events.append(event)
        if ch.confirm:
            batch.seqs.append(ch.next_seq)
            ch.next_seq += 1
        self.pending_publishes += 1
        self.server.publishes_added(1)
        if self.pending_publishes > MAX_PENDING_PUBLISHES:
            self._pause_reading()

    def _flush_publishes(self) -> None:
        for ch in self.channels.values():
            self._flush_publishes_of(ch)

    def _flush_publishes_of(self, ch: _Channel) -> None:
        batch = ch.batch
        if batch is None:
            return
        ch.batch = None
        ch.inflight.append(batch)
        task = asyncio.get_running_loop().create_task(self._publish(ch, batch))
        ch.publish_tasks.add(task)
        task.add_done_callback(ch.publish_tasks.discard)

    async def _publish(self, ch: _Channel, batch: _Batch) -> None:
        error: AmqpError | None = None
        results: list[PublishResult] = []
        try:
            if batch.exchange:
                try:
                    info = await self.broker.get_exchange(batch.target)
                except errors.InvalidName:
                    raise _x_missing(batch.exchange, self.vh.name) from None
                if info.internal:
                    raise AmqpError(
                        ACCESS_REFUSED,
                        f"cannot publish to internal exchange '{batch.exchange}' in vhost "
                        f"'{self.vh.name}'",
                        60,
                        40,
                    )
            results = await self._publish_held(ch, batch)
        except AmqpError as exc:
            error = exc
        except errors.ConveyorError as exc:
            error = translate(exc, exchange=batch.exchange, vhost=self.vh).for_method(60, 40)
        except Exception as exc:
            log.exception("amqp %s: publish failed", self.name)
            error = AmqpError(INTERNAL_ERROR, f"publish failed: {exc}", 60, 40)
        finally:
            self.pending_publishes -= len(batch.items)
            self.server.publishes_removed(len(batch.items))
        if error is not None:
            batch.outcome = [(False, False)] * len(batch.items)
            self._settle_confirms(ch)
            if not ch.closed and self.conn is not None:
                self._drop_channel(ch)
                self.conn.close_channel(
                    ch.number, error.code, error.reply_text, error.class_id, error.method_id
                )
            self._flush()
            self._maybe_resume_reading()
            return
        outcome: list[tuple[bool, bool]] = []
        for event, result in zip(batch.events, results, strict=True):
            returned = False
            if result.routed == 0 and not result.rejected and event.method.mandatory:
                returned = True
            outcome.append((not result.rejected, returned))
        batch.outcome = outcome
        self._settle_confirms(ch)
        self._flush()
        self._maybe_resume_reading()

    async def _publish_held(self, ch: _Channel, batch: _Batch) -> list[PublishResult]:
        """publish_batch; while the store is full, raise the "disk" alarm (publishers
        are blocked) and hold the batch, unconfirmed, retrying until it is stored."""
        server = self.server
        held = False
        while True:
            try:
                results = await self.broker.publish_batch(batch.target, batch.items)
            except errors.StoreFull as exc:
                if ch.closed or self.closed:
                    raise
                if "disk" not in server.alarms:
                    log.warning("amqp: store full (%s); blocking publishers", exc.message)
                held = True
                server.raise_alarm("disk")
                await asyncio.sleep(server.store_full_retry)
                continue
            if held:
                server.clear_alarm("disk")  # there is room again
            return results

    def _settle_confirms(self, ch: _Channel) -> None:
        """Send Returns and confirms for finished batches, in publish order."""
        conn = self.conn
        while ch.inflight and ch.inflight[0].outcome is not None:
            batch = ch.inflight.popleft()
            assert batch.outcome is not None
            if ch.closed or conn is None:
                continue
            ack_upto = 0
            for i, (ok, returned) in enumerate(batch.outcome):
                if returned:
                    event = batch.events[i]
                    conn.send_content(
                        ch.number,
                        commands.Basic.Return(
                            NO_ROUTE, "NO_ROUTE", event.method.exchange, event.method.routing_key
                        ),
                        codec.with_body_size(event.header, len(event.body)),
                        event.body,
                    )
                if not batch.seqs:
                    continue
                seq = batch.seqs[i]
                if ok:
                    ack_upto = seq
                else:
                    if ack_upto:
                        conn.send_raw(codec.basic_ack_frame(ch.number, ack_upto, True))
                        ack_upto = 0
                    conn.send_method(ch.number, commands.Basic.Nack(seq, False, False))
            if ack_upto:
                conn.send_raw(codec.basic_ack_frame(ch.number, ack_upto, True))

    async def _settle_publishes(self, ch: _Channel) -> None:
        """Wait until every publish and ack received on ``ch`` so far is stored."""
        self._flush_publishes_of(ch)
        self._flush_acks_of(ch)
        if ch.publish_tasks or ch.ack_tasks:
            await asyncio.gather(*ch.publish_tasks, *ch.ack_tasks, return_exceptions=True)

    def _spawn_ack(self, ch: _Channel, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        ch.ack_tasks.add(task)
        task.add_done_callback(ch.ack_tasks.discard)
        self.server.spawn(task)

    # -- acks -------------------------------------------------------------------------------

    def _on_ack(self, ch: _Channel, method: Frame) -> None:
        if ch.tx:
            ch.tx_acks.append(method)
            return
        self._apply_ack(ch, method)

    def _apply_ack(self, ch: _Channel, method: Any) -> None:
        tag: int = method.delivery_tag
        multiple = bool(getattr(method, "multiple", False))
        if isinstance(method, commands.Basic.Ack):
            requeue: bool | None = None
        else:
            requeue = bool(method.requeue)
        if multiple:
            tags = [t for t in ch.unacked if t <= tag] if tag else list(ch.unacked)
        elif tag in ch.unacked:
            tags = [tag]
        else:
            raise AmqpError(PRECONDITION_FAILED, f"unknown delivery tag {tag}")
        groups: dict[str, list[str]] = {}
        for t in tags:
            item = ch.unacked.pop(t)
            if item.consumer is not None:
                item.consumer.unacked -= 1
                item.consumer.wake.set()
            if item.receipt is not None:
                groups.setdefault(item.queue, []).append(item.receipt)
        if requeue is None:
            for queue, receipts in groups.items():
                ch.pending_acks.setdefault(queue, []).extend(receipts)
        else:
            self._flush_acks_of(ch)
            for queue, receipts in groups.items():
                self._spawn_ack(ch, self._nack(queue, receipts, requeue))
        if ch.global_prefetch:
            for consumer in ch.consumers.values():
                consumer.wake.set()

    def _flush_acks(self) -> None:
        for ch in self.channels.values():
            self._flush_acks_of(ch)

    def _flush_acks_of(self, ch: _Channel) -> None:
        if not ch.pending_acks:
            return
        pending, ch.pending_acks = ch.pending_acks, {}
        for queue, receipts in pending.items():
            self._spawn_ack(ch, self._ack(queue, receipts))

    async def _ack(self, queue: str, receipts: list[str]) -> None:
        try:
            result = await self.broker.ack_batch(queue, receipts, relaxed=True)
        except errors.ConveyorError as exc:
            log.debug("amqp %s: ack on %s failed: %s", self.name, queue, exc)
            return
        if result.failed:
            log.debug("amqp %s: %d stale acks on %s", self.name, len(result.failed), queue)

    # -- delivering -------------------------------------------------------------------------

    def _deliver(self, ch: _Channel, consumer: _Consumer | None, d: Delivery, tag_name: str) -> int:
        conn = self.conn
        assert conn is not None
        tag = ch.next_tag
        ch.next_tag += 1
        redelivered = d.receive_count > 1
        if d.receipt is not None:
            ch.unacked[tag] = _Unacked(d.queue, d.receipt, consumer)
            if consumer is not None:
                consumer.unacked += 1
        d = self.vh.delivered(d)
        if consumer is not None:
            deliver = codec.basic_deliver_frame(
                ch.number, tag_name, tag, redelivered, d.exchange, d.routing_key
            )
            conn.send_content_frame(ch.number, deliver, codec.properties_payload(d), d.body)
        else:
            method = commands.Basic.GetOk(tag, redelivered, d.exchange, d.routing_key, 0)
            conn.send_content(ch.number, method, codec.properties_payload(d), d.body)
        return tag

    async def _consume_loop(self, consumer: _Consumer) -> None:
        ch = consumer.channel
        broker = self.broker
        lease = self.server.consumer_lease
        try:
            while not consumer.cancelled and not self.closed:
                credit = MAX_RECEIVE
                if not consumer.no_ack:
                    if consumer.prefetch:
                        credit = min(credit, consumer.prefetch - consumer.unacked)
                    glob = ch.global_credit()
                    if glob is not None:
                        credit = min(credit, glob)
                if credit <= 0 or not ch.active or not self.writable.is_set():
                    if not self.writable.is_set():
                        await self.writable.wait()
                    else:
                        consumer.wake.clear()
                        await consumer.wake.wait()
                    continue
                try:
                    got = await broker.receive(
                        consumer.queue,
                        credit,
                        wait=CONSUMER_POLL,
                        visibility_timeout=None if consumer.no_ack else lease,
                        auto_ack=consumer.no_ack,
                        consumer=True,
                        session=True,
                    )
                except errors.QueueNotFound:
                    self._server_cancel(consumer)
                    return
                except errors.ClosedError:
                    return
                if not got:
                    continue
                if consumer.cancelled or ch.closed or self.closed:
                    await self._give_back(consumer, got)
                    return
                for d in got:
                    self._deliver(ch, consumer, d, consumer.tag)
                self._flush()
        except asyncio.CancelledError:
            raise
        except errors.ConveyorError as exc:
            log.warning("amqp %s: consumer %s stopped: %s", self.name, consumer.tag, exc)
            self._server_cancel(consumer)
        except Exception:
            log.exception("amqp %s: consumer %s failed", self.name, consumer.tag)
            self._server_cancel(consumer)

    async def _give_back(self, consumer: _Consumer, got: list[Delivery]) -> None:
        """Deliveries leased after the consumer went away go back to the queue."""
        receipts = [d.receipt for d in got if d.receipt is not None]
        if receipts:
            await self._nack(consumer.queue, receipts, True)
        elif got:  # auto-ack leases are already deleted: put them back as new messages
            msgs = [_requeued(d) for d in got]
            with contextlib.suppress(errors.ConveyorError):
                await self.broker.send_batch(consumer.queue, msgs)

    def _cancel_consumer(self, consumer: _Consumer) -> None:
        if consumer.cancelled:
            return
        consumer.cancelled = True
        consumer.wake.set()
        consumer.channel.consumers.pop(consumer.tag, None)
        self.server.consumer_removed(consumer)
        _stop_task(consumer.task, consumer.no_ack)

    def _server_cancel(self, consumer: _Consumer) -> None:
        """The queue went away: tell the client (consumer_cancel_notify)."""
        if consumer.cancelled:
            return
        self._cancel_consumer(consumer)
        conn = self.conn
        ch = consumer.channel
        if conn is not None and not ch.closed and conn.client_capability("consumer_cancel_notify"):
            conn.send_method(ch.number, commands.Basic.Cancel(consumer.tag, True))
            self._flush()


def _stop_task(task: asyncio.Task[None] | None, no_ack: bool) -> None:
    """Cancel a consumer's task (its long poll would otherwise linger and take messages
    meant for others).

    ``Broker.receive`` is cancel-safe: a lease taken while it is cancelled is released
    again. An auto-ack receive (``no_ack``) deletes what it takes, so that cannot be
    undone: such a task is not cancelled inside the lease. No task is cancelled inside
    ``_give_back`` (which returns leased messages to the queue). Else the check repeats.
    """
    if task is None or task.done():
        return
    busy = ("_give_back", "_lease_safely", "_lease") if no_ack else ("_give_back",)
    if _running(task, busy):
        asyncio.get_running_loop().call_later(0.001, _stop_task, task, no_ack)
    else:
        task.cancel()


def _running(task: asyncio.Task[None], names: tuple[str, ...]) -> bool:
    """Whether the task is suspended inside a coroutine function named in ``names``."""
    obj: Any = task.get_coro()
    while obj is not None:
        code = getattr(obj, "cr_code", None)
        if code is not None and code.co_name in names:
            return True
        obj = getattr(obj, "cr_await", None)
    return False


def _requeued(d: Delivery) -> NewMessage:
    return NewMessage(body=d.body, headers=d.headers, properties=d.properties, priority=d.priority)


# -- method handlers (one per AMQP method) -----------------------------------------------

Handler = Callable[[_Connection, _Channel, Any], Awaitable[None]]
_HANDLERS: dict[type[Frame], Handler] = {}


def _handles(*kinds: type[Frame]) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for kind in kinds:
            _HANDLERS[kind] = fn
        return fn

    return register


def _reply(c: _Connection, ch: _Channel, method: Frame, nowait: bool = False) -> None:
    if not nowait and c.conn is not None:
        c.conn.send_method(ch.number, method)


@_handles(commands.Channel.Flow)
async def _channel_flow(c: _Connection, ch: _Channel, m: commands.Channel.Flow) -> None:
    ch.active = bool(m.active)
    for consumer in ch.consumers.values():
        consumer.wake.set()
    _reply(c, ch, commands.Channel.FlowOk(ch.active))


@_handles(commands.Channel.FlowOk)
async def _channel_flow_ok(c: _Connection, ch: _Channel, m: commands.Channel.FlowOk) -> None:
    return None


# exchanges


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_exchange_name(name: str, passive: bool) -> None:
    if not passive and name.startswith("amq."):
        raise AmqpError(ACCESS_REFUSED, f"exchange name '{name}' contains reserved prefix 'amq.*'")


def _reserved(kind: str, name: str, method: tuple[int, int] = (0, 0)) -> AmqpError:
    """A name starting with "@" on ``/`` (the prefix of other vhosts' objects)."""
    return AmqpError(ACCESS_REFUSED, f"{kind} name '{name}' contains reserved prefix '@'", *method)


async def _get_exchange(c: _Connection, name: str) -> Any:
    """The engine's ExchangeInfo of AMQP exchange ``name`` (404 when missing)."""
    vh = c.vh
    if vh.hidden_exchange(name):
        raise _x_missing(name, vh.name)
    try:
        return await c.broker.get_exchange(vh.exchange(name))
    except (errors.ExchangeNotFound, errors.InvalidName):
        raise _x_missing(name, vh.name) from None


@_handles(commands.Exchange.Declare)
async def _exchange_declare(c: _Connection, ch: _Channel, m: commands.Exchange.Declare) -> None:
    name = m.exchange
    vh = c.vh
    if name == "":
        raise AmqpError(ACCESS_REFUSED, "operation not permitted on the default exchange")
    broker = c.broker
    if m.passive:
        await _get_exchange(c, name)
        _reply(c, ch, commands.Exchange.DeclareOk(), m.nowait)
        return
    if m.exchange_type not in ("direct", "fanout", "topic", "headers"):
        raise AmqpError(COMMAND_INVALID, f"unknown exchange type '{m.exchange_type}'")
    if vh.hidden_exchange(name) and not name.startswith("amq."):
        raise _reserved("exchange", name)
    try:
        existing = None if vh.hidden_exchange(name) else await _get_exchange(c, name)
    except AmqpError:
        existing = None
    if existing is not None:
        for arg, have, want in (
            ("type", existing.type, m.exchange_type),
            ("durable", existing.durable, bool(m.durable)),
            ("auto_delete", existing.auto_delete, bool(m.auto_delete)),
            ("internal", existing.internal, bool(m.internal)),
        ):
            if have != want:
                raise AmqpError(
                    PRECONDITION_FAILED,
                    f"inequivalent arg '{arg}' for exchange '{name}' in vhost '{vh.name}': "
                    f"received '{_shown(want)}' but current is '{_shown(have)}'",
                )
        _reply(c, ch, commands.Exchange.DeclareOk(), m.nowait)
        return
    _check_exchange_name(name, False)
    try:
        await broker.declare_exchange(
            vh.exchange(name),
            m.exchange_type,
            durable=bool(m.durable),
            auto_delete=bool(m.auto_delete),
            internal=bool(m.internal),
            arguments=codec.plain_value(dict(m.arguments or {})),
        )
    except errors.ConveyorError as exc:
        raise translate(exc, exchange=name, vhost=vh) from None
    _reply(c, ch, commands.Exchange.DeclareOk(), m.nowait)


@_handles(commands.Exchange.Delete)
async def _exchange_delete(c: _Connection, ch: _Channel, m: commands.Exchange.Delete) -> None:
    name = m.exchange
    vh = c.vh
    if name == "" or name.startswith("amq."):
        raise AmqpError(
            ACCESS_REFUSED,
            f"operation not permitted on exchange '{name}'"
            if name
            else "operation not permitted on the default exchange",
        )
    if vh.hidden_exchange(name):
        _reply(c, ch, commands.Exchange.DeleteOk(), m.nowait)  # as a missing one
        return
    try:
        await c.broker.delete_exchange(vh.exchange(name), if_unused=bool(m.if_unused))
    except (errors.ExchangeNotFound, errors.InvalidName):
        pass  # RabbitMQ: deleting a missing exchange succeeds
    except errors.Conflict:
        raise AmqpError(
            PRECONDITION_FAILED, f"exchange '{name}' in vhost '{vh.name}' in use"
        ) from None
    _reply(c, ch, commands.Exchange.DeleteOk(), m.nowait)


async def _check_bind_source(c: _Connection, name: str) -> None:
    if name == "":
        raise AmqpError(ACCESS_REFUSED, "operation not permitted on the default exchange")
    await _get_exchange(c, name)


@_handles(commands.Exchange.Bind, commands.Exchange.Unbind)
async def _exchange_bind(c: _Connection, ch: _Channel, m: Any) -> None:
    bind = isinstance(m, commands.Exchange.Bind)
    vh = c.vh
    await _check_bind_source(c, m.source)
    if m.destination == "":
        raise AmqpError(ACCESS_REFUSED, "operation not permitted on the default exchange")
    try:
        await _get_exchange(c, m.destination)
    except AmqpError:
        if bind:
            raise
        _reply(c, ch, commands.Exchange.UnbindOk(), m.nowait)
        return
    args = codec.plain_value(dict(m.arguments or {}))
    source, destination = vh.exchange(m.source), vh.exchange(m.destination)
    try:
        if bind:
            await c.broker.bind_exchange(source, destination, m.routing_key, args)
        else:
            with contextlib.suppress(errors.ExchangeNotFound):
                await c.broker.unbind_exchange(source, destination, m.routing_key, args)
    except errors.ConveyorError as exc:
        raise translate(exc, exchange=m.source, vhost=vh) from None
    _reply(c, ch, commands.Exchange.BindOk() if bind else commands.Exchange.UnbindOk(), m.nowait)


# queues


def _amqp_attributes(m: commands.Queue.Declare) -> dict[str, str]:
    return {
        _ATTR_DURABLE: "true" if m.durable else "false",
        _ATTR_EXCLUSIVE: "true" if m.exclusive else "false",
        _ATTR_AUTO_DELETE: "true" if m.auto_delete else "false",
        _ATTR_ARGUMENTS: _json_encode(_plain_args(m.arguments)).decode(),
    }


def _check_equivalent(name: str, info: QueueInfo, want: dict[str, str], vhost: str = VHOST) -> None:
    have = info.options.attributes
    if _ATTR_ARGUMENTS not in have:
        return  # created through another front door: nothing AMQP-specific to compare
    for key, arg in ((_ATTR_DURABLE, "durable"), (_ATTR_AUTO_DELETE, "auto_delete")):
        if have.get(key) != want[key]:
            raise AmqpError(
                PRECONDITION_FAILED,
                f"inequivalent arg '{arg}' for queue '{name}' in vhost '{vhost}': "
                f"received '{want[key]}' but current is '{have.get(key)}'",
                50,
                10,
            )
    old = _json_decode(have[_ATTR_ARGUMENTS])
    new = _json_decode(want[_ATTR_ARGUMENTS])
    for key in sorted(set(old) | set(new)):
        was, now = old.get(key), new.get(key)
        if was is not None and now is not None:
            if was != now or _type_class(was) != _type_class(now):
                detail = f"received '{_shown(now)}' but current is '{_shown(was)}'"
            else:
                continue
        elif was is None and now is None:
            continue
        else:
            detail = f"received {_describe(now)} but current is {_describe(was)}"
        raise AmqpError(
            PRECONDITION_FAILED,
            f"inequivalent arg '{key}' for queue '{name}' in vhost '{vhost}': {detail}",
            50,
            10,
        )


def _type_class(value: Any) -> str:
    return "int" if isinstance(value, int) and not isinstance(value, bool) else _type_name(value)


def _queue(c: _Connection, name: str) -> str:
    """The engine's name of AMQP queue ``name``; 404 for a name outside the vhost, or
    405 when another connection holds it exclusively."""
    vh = c.vh
    if vh.hidden(name):
        raise _q_missing(name, vh.name)
    internal = vh.queue(name)
    owner = c.server.exclusive_owner.get(internal)
    if owner is not None and owner is not c:
        raise _locked(name, vh.name)
    return internal


async def _queue_counts(c: _Connection, name: str) -> tuple[int, int]:
    stats = await c.broker.stats(name)
    # The engine's count: AMQP consumers (registered with consumer_added) plus long
    # polls of other front doors (an SQS ReceiveMessage with WaitTimeSeconds).
    return stats.ready, c.broker.consumer_count(name)


def _dead_letter_target(c: _Connection, name: str, opts: QueueOptions) -> None:
    """Map the dead-letter exchange into the vhost; on ``/`` refuse one (or, through
    the default exchange, a routing key) that names another vhost's objects."""
    vh = c.vh
    dlx = opts.dead_letter_exchange
    if dlx is None:
        return
    user = c.conn.user if c.conn is not None else ""
    if vh.hidden_exchange(dlx):
        raise AmqpError(
            ACCESS_REFUSED,
            f"access to exchange '{dlx}' in vhost '{vh.name}' refused for user '{user}'",
            50,
            10,
        )
    dlk = opts.dead_letter_routing_key
    if dlx == "" and dlk is not None and vh.hidden(dlk):
        raise AmqpError(
            ACCESS_REFUSED,
            f"access to queue '{dlk}' in vhost '{vh.name}' refused for user '{user}'",
            50,
            10,
        )
    opts.dead_letter_exchange = vh.exchange(dlx)


@_handles(commands.Queue.Declare)
async def _queue_declare(c: _Connection, ch: _Channel, m: commands.Queue.Declare) -> None:
    name = m.queue
    broker = c.broker
    vh = c.vh
    if m.passive:
        name = name or ch.last_queue
        internal = _queue(c, name)
        try:
            await broker.declare_queue(internal, passive=True)
        except (errors.QueueNotFound, errors.InvalidName):
            raise _q_missing(name, vh.name) from None
    else:
        if not name:
            name = "amq.gen-" + secrets.token_urlsafe(16)
        elif name.startswith("amq."):
            raise AmqpError(
                ACCESS_REFUSED, f"queue name '{name}' contains reserved prefix 'amq.*'", 50, 10
            )
        elif vh.hidden(name):
            raise _reserved("queue", name, (50, 10))
        internal = _queue(c, name)
        want = _amqp_attributes(m)
        try:
            info: QueueInfo | None = await broker.get_queue(internal)
        except errors.QueueNotFound:
            info = None
        except errors.InvalidName as exc:
            raise AmqpError(PRECONDITION_FAILED, vh.text(exc.message), 50, 10) from None
        if info is not None:
            if (
                info.options.attributes.get(_ATTR_EXCLUSIVE) == "true"
                and c.server.exclusive_owner.get(internal) is not c
            ):
                raise _locked(name, vh.name)
            _check_equivalent(name, info, want, vh.name)
        else:
            opts = queue_options(name, m.arguments, vh.name)
            _dead_letter_target(c, name, opts)
            opts.attributes = want
            try:
                await broker.declare_queue(internal, opts)
            except errors.QueueExists:
                pass  # declared concurrently; the next declare compares
            except errors.ConveyorError as exc:
                raise translate(exc, queue=name, vhost=vh) from None
            if m.exclusive:
                c.server.exclusive_owner[internal] = c
                c.exclusive_queues.add(internal)
            if m.auto_delete:
                c.server.auto_delete.add(internal)
        if vh.default:
            # The vhost's default exchange reaches the queue by its (AMQP) name.
            try:
                await broker.bind(vh.default, internal, name)
            except errors.QueueNotFound:
                raise _q_missing(name, vh.name) from None
            except errors.ConveyorError as exc:
                raise translate(exc, queue=name, vhost=vh) from None
    ch.last_queue = name
    if m.nowait:
        return
    try:
        ready, consumers = await _queue_counts(c, internal)
    except errors.QueueNotFound:
        raise _q_missing(name, vh.name) from None
    _reply(c, ch, commands.Queue.DeclareOk(name, ready, consumers))


@_handles(commands.Queue.Bind, commands.Queue.Unbind)
async def _queue_bind(c: _Connection, ch: _Channel, m: Any) -> None:
    bind = isinstance(m, commands.Queue.Bind)
    vh = c.vh
    queue = m.queue or ch.last_queue
    key = m.routing_key
    if not m.queue and not key:
        key = queue
    internal = _queue(c, queue)
    await _check_bind_source(c, m.exchange)
    args = codec.plain_value(dict(m.arguments or {}))
    exchange = vh.exchange(m.exchange)
    try:
        if bind:
            await c.broker.bind(exchange, internal, key, args)
        else:
            await c.broker.get_queue(internal)
            await c.broker.unbind(exchange, internal, key, args)
    except (errors.QueueNotFound, errors.InvalidName):
        raise _q_missing(queue, vh.name) from None
    except errors.ConveyorError as exc:
        raise translate(exc, queue=queue, exchange=m.exchange, vhost=vh) from None
    if bind:
        _reply(c, ch, commands.Queue.BindOk(), m.nowait)
    else:
        _reply(c, ch, commands.Queue.UnbindOk())


@_handles(commands.Queue.Purge)
async def _queue_purge(c: _Connection, ch: _Channel, m: commands.Queue.Purge) -> None:
    queue = m.queue or ch.last_queue
    internal = _queue(c, queue)
    try:
        n = await c.broker.purge_queue(internal)
    except (errors.QueueNotFound, errors.InvalidName):
        raise _q_missing(queue, c.vh.name) from None
    _reply(c, ch, commands.Queue.PurgeOk(n), m.nowait)


@_handles(commands.Queue.Delete)
async def _queue_delete(c: _Connection, ch: _Channel, m: commands.Queue.Delete) -> None:
    queue = m.queue or ch.last_queue
    vh = c.vh
    if vh.hidden(queue):
        _reply(c, ch, commands.Queue.DeleteOk(0), m.nowait)  # as a missing one
        return
    internal = _queue(c, queue)
    server = c.server
    in_use = AmqpError(PRECONDITION_FAILED, f"queue '{queue}' in vhost '{vh.name}' in use", 50, 40)
    if m.if_unused and server.consumer_total(internal):
        raise in_use
    try:
        if m.if_empty:
            stats = await c.broker.stats(internal)
            if stats.ready + stats.in_flight + stats.delayed:
                raise AmqpError(
                    PRECONDITION_FAILED, f"queue '{queue}' in vhost '{vh.name}' not empty", 50, 40
                )
        n = await c.broker.delete_queue(internal)
    except (errors.QueueNotFound, errors.InvalidName):
        n = 0  # RabbitMQ: deleting a missing queue succeeds
    except errors.Conflict:
        raise in_use from None
    server.forget_queue(internal)
    _reply(c, ch, commands.Queue.DeleteOk(n), m.nowait)


# basic


@_handles(commands.Basic.Qos)
async def _basic_qos(c: _Connection, ch: _Channel, m: commands.Basic.Qos) -> None:
    if m.prefetch_size:
        raise AmqpError(NOT_IMPLEMENTED, f"prefetch_size!=0 ({m.prefetch_size})", 60, 10)
    if m.global_ or _spec_qos(c):
        ch.global_prefetch = m.prefetch_count
    else:
        ch.prefetch = m.prefetch_count
    for consumer in ch.consumers.values():
        consumer.wake.set()
    _reply(c, ch, commands.Basic.QosOk())


def _spec_qos(c: _Connection) -> bool:
    """Whether this client means ``global=false`` as the AMQP spec does (one limit
    shared by the channel's consumers, changes apply at once) rather than as RabbitMQ
    does (a limit for each consumer created afterwards).

    kombu picks the flag from the server's product: for anything but RabbitMQ 3.3-3.x
    it assumes the spec's meaning and sends ``global=false`` (Celery then raises the
    limit while it holds ETA tasks and expects that to reach its running consumer). So
    py-amqp clients get the spec's meaning; every other client RabbitMQ's. ``global=true``
    from py-amqp (connection-wide in the spec) is channel-wide here too.
    """
    conn = c.conn
    if conn is None:
        return False
    product = conn.client_properties.get("product")
    if isinstance(product, bytes):
        product = product.decode(errors="replace")
    return product == "py-amqp"


@_handles(commands.Basic.Consume)
async def _basic_consume(c: _Connection, ch: _Channel, m: commands.Basic.Consume) -> None:
    queue = m.queue or ch.last_queue
    tag = m.consumer_tag or "amq.ctag-" + secrets.token_urlsafe(16)
    if tag in ch.consumers:
        raise AmqpError(NOT_ALLOWED, f"attempt to reuse consumer tag '{tag}'", 60, 20)
    internal = _queue(c, queue)
    try:
        await c.broker.get_queue(internal)
    except (errors.QueueNotFound, errors.InvalidName):
        raise _q_missing(queue, c.vh.name) from None
    server = c.server
    if server.exclusive_consumer.get(internal) or (m.exclusive and server.consumer_total(internal)):
        raise AmqpError(
            ACCESS_REFUSED, f"queue '{queue}' in vhost '{c.vh.name}' in exclusive use", 60, 20
        )
    consumer = _Consumer(
        tag=tag,
        queue=internal,
        channel=ch,
        connection=c,
        no_ack=bool(m.no_ack),
        prefetch=ch.prefetch,
        exclusive=bool(m.exclusive),
    )
    ch.consumers[tag] = consumer
    server.consumer_added(consumer)
    _reply(c, ch, commands.Basic.ConsumeOk(tag), m.nowait)
    c._flush()  # ConsumeOk must precede the first delivery
    consumer.task = asyncio.get_running_loop().create_task(c._consume_loop(consumer))


@_handles(commands.Basic.Cancel)
async def _basic_cancel(c: _Connection, ch: _Channel, m: commands.Basic.Cancel) -> None:
    consumer = ch.consumers.get(m.consumer_tag or "")
    if consumer is not None:
        c._cancel_consumer(consumer)
    _reply(c, ch, commands.Basic.CancelOk(m.consumer_tag), m.nowait)


@_handles(commands.Basic.Get)
async def _basic_get(c: _Connection, ch: _Channel, m: commands.Basic.Get) -> None:
    name = m.queue or ch.last_queue
    queue = _queue(c, name)
    try:
        got = await c.broker.receive(
            queue,
            1,
            visibility_timeout=None if m.no_ack else c.server.consumer_lease,
            auto_ack=bool(m.no_ack),
            session=True,
        )
        stats = await c.broker.stats(queue)
    except (errors.QueueNotFound, errors.InvalidName):
        raise _q_missing(name, c.vh.name) from None
    conn = c.conn
    assert conn is not None
    if not got:
        conn.send_method(ch.number, commands.Basic.GetEmpty())
        return
    d = got[0]
    if ch.closed:
        await c._give_back(_Consumer("", queue, ch, c, bool(m.no_ack), 0, False), got)
        return
    tag = ch.next_tag
    ch.next_tag += 1
    if d.receipt is not None:
        ch.unacked[tag] = _Unacked(queue, d.receipt, None)
    d = c.vh.delivered(d)
    conn.send_content(
        ch.number,
        commands.Basic.GetOk(tag, d.receive_count > 1, d.exchange, d.routing_key, stats.ready),
        codec.properties_payload(d),
        d.body,
    )


@_handles(commands.Basic.Recover, commands.Basic.RecoverAsync)
async def _basic_recover(c: _Connection, ch: _Channel, m: Any) -> None:
    c._flush_acks_of(ch)
    groups: dict[str, list[str]] = {}
    for item in ch.unacked.values():
        if item.consumer is not None:
            item.consumer.unacked -= 1
            item.consumer.wake.set()
        if item.receipt is not None:
            groups.setdefault(item.queue, []).append(item.receipt)
    ch.unacked.clear()
    for queue, receipts in groups.items():
        await c._nack(queue, receipts, True)
    if isinstance(m, commands.Basic.Recover):
        _reply(c, ch, commands.Basic.RecoverOk())


@_handles(commands.Confirm.Select)
async def _confirm_select(c: _Connection, ch: _Channel, m: commands.Confirm.Select) -> None:
    if ch.tx:
        raise AmqpError(PRECONDITION_FAILED, "cannot switch from tx to confirm mode", 85, 10)
    ch.confirm = True
    _reply(c, ch, commands.Confirm.SelectOk(), m.nowait)


@_handles(commands.Tx.Select)
async def _tx_select(c: _Connection, ch: _Channel, m: commands.Tx.Select) -> None:
    if ch.confirm:
        raise AmqpError(PRECONDITION_FAILED, "cannot switch from confirm to tx mode", 90, 10)
    ch.tx = True
    _reply(c, ch, commands.Tx.SelectOk())


@_handles(commands.Tx.Commit)
async def _tx_commit(c: _Connection, ch: _Channel, m: commands.Tx.Commit) -> None:
    if not ch.tx:
        raise AmqpError(PRECONDITION_FAILED, "channel is not transactional", 90, 20)
    publishes, ch.tx_publishes = ch.tx_publishes, []
    acks, ch.tx_acks = ch.tx_acks, []
    ch.tx = False
    try:
        for event in publishes:
            c._on_publish(ch, event)
        for ack in acks:
            c._apply_ack(ch, ack)
    finally:
        ch.tx = True
    await c._settle_publishes(ch)
    c._flush_acks_of(ch)
    if not ch.closed:
        _reply(c, ch, commands.Tx.CommitOk())


@_handles(commands.Tx.Rollback)
async def _tx_rollback(c: _Connection, ch: _Channel, m: commands.Tx.Rollback) -> None:
    if not ch.tx:
        raise AmqpError(PRECONDITION_FAILED, "channel is not transactional", 90, 30)
    ch.tx_publishes.clear()
    ch.tx_acks.clear()
    _reply(c, ch, commands.Tx.RollbackOk())


# -- the server ---------------------------------------------------------------------------


class AmqpServer:
    """The AMQP listener. ``users`` maps user names to passwords; without it the only
    user is guest/guest, which (as in RabbitMQ) may only log in from loopback.

    ``vhosts`` are the virtual hosts that exist (see :class:`Vhost`); ``permissions``
    maps a user to the vhosts it may open (a user not in it may open every vhost).
    ``max_connections`` bounds the open connections (None: no limit);
    ``max_message_size`` the body of one publish (None: the broker's limit).
    """

    def __init__(
        self,
        broker: Broker,
        *,
        users: dict[str, str] | None = None,
        loopback_users: Iterable[str] = ("guest",),
        frame_max: int = 131072,
        channel_max: int = 2047,
        heartbeat: int = 60,
        consumer_lease: float = DEFAULT_CONSUMER_LEASE,
        handshake_timeout: float = 10.0,
        publish_high_water: int = PUBLISH_HIGH_WATER,
        store_full_retry: float = STORE_FULL_RETRY,
        vhosts: Iterable[str] = (VHOST,),
        permissions: Mapping[str, Iterable[str]] | None = None,
        max_connections: int | None = None,
        max_message_size: int | None = None,
    ) -> None:
        self.broker = broker
        self.vhosts: dict[str, Vhost] = {name: Vhost(name) for name in vhosts}
        self.permissions = {u: frozenset(v) for u, v in (permissions or {}).items()}
        self.max_connections = max_connections
        self.max_message_size = (
            broker.max_message_size if max_message_size is None else max_message_size
        )
        self.users = dict(users) if users else {"guest": "guest"}
        self.loopback_users = frozenset(loopback_users)
        self.frame_max = frame_max
        self.channel_max = channel_max
        self.heartbeat = heartbeat
        self.consumer_lease = consumer_lease
        self.handshake_timeout = handshake_timeout
        self.publish_high_water = publish_high_water
        self.store_full_retry = store_full_retry
        #: Resource alarms on ("memory", "disk"): publishing connections are blocked.
        self.alarms: set[str] = set()
        #: Unconfirmed publishes on all connections.
        self.pending_publishes = 0
        self.connections: set[_Connection] = set()
        self.exclusive_owner: dict[str, _Connection] = {}
        self.exclusive_consumer: dict[str, _Consumer] = {}
        self.auto_delete: set[str] = set()
        self.consumers: dict[str, set[_Consumer]] = {}
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        broker.on_queue_deleted(self._queue_deleted)

    def authenticate(self, user: str, password: str, loopback: bool) -> bool:
        expected = self.users.get(user)
        if expected is None or not secrets.compare_digest(expected, password):
            return False
        return loopback or user not in self.loopback_users

    def open_refusal(self, user: str, vhost: str) -> str | None:
        """Why Connection.Open must be refused (530 NOT_ALLOWED), in RabbitMQ's words
        and order; None to accept."""
        if self.max_connections is not None:
            opened = sum(
                1 for c in self.connections if c.conn is not None and c.conn.state is State.OPEN
            )
            if opened >= self.max_connections:
                log.warning("amqp: connection limit (%d) reached", self.max_connections)
                return (
                    f"connection refused: node connection limit ({self.max_connections}) is reached"
                )
        if vhost not in self.vhosts:
            return f"vhost {vhost} not found"
        allowed = self.permissions.get(user)
        if allowed is not None and vhost not in allowed:
            return f"access to vhost '{vhost}' refused for user '{user}'"
        return None

    async def start(self, host: str, port: int, *, sock: socket.socket | None = None) -> int:
        """Listen on host:port (0 picks a free port), or on ``sock``; returns the port."""
        loop = asyncio.get_running_loop()
        for vh in self.vhosts.values():
            if vh.root:
                continue  # the engine declares "/"'s amq.* exchanges itself
            # Each vhost has RabbitMQ's amq.* exchanges and its own default exchange.
            for name, kind in (*STANDARD_EXCHANGES.items(), (DEFAULT_ALIAS, "direct")):
                with contextlib.suppress(errors.ExchangeExists):
                    await self.broker.declare_exchange(vh.prefix + name, kind)
        if sock is not None:
            self._server = await loop.create_server(lambda: _Connection(self), sock=sock)
        else:
            self._server = await loop.create_server(
                lambda: _Connection(self), host, port, reuse_address=True
            )
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def close(self) -> None:
        """Stop listening, close every connection with 320 CONNECTION_FORCED, requeue
        everything unacked."""
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            if c.conn is not None and c.conn.state is State.OPEN:
                c.conn.close(
                    CONNECTION_FORCED,
                    "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
                )
                c._flush()
            c._teardown()
            if c.transport is not None:
                c.transport.close()
            if c.task is not None:
                c.task.cancel()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    # resource alarms (RabbitMQ's memory and disk alarms -> Connection.Blocked)

    def raise_alarm(self, resource: str) -> None:
        """Block every publishing connection (and each other one at its next publish)
        until :meth:`clear_alarm`. ``resource`` is "memory" or "disk"."""
        if resource in self.alarms:
            return
        self.alarms.add(resource)
        log.info("amqp: %s alarm set; blocking publishers", resource)
        for c in list(self.connections):
            if c.publisher:
                c.block()

    def clear_alarm(self, resource: str) -> None:
        if resource not in self.alarms:
            return
        self.alarms.discard(resource)
        log.info("amqp: %s alarm cleared", resource)
        if not self.alarms:
            for c in list(self.connections):
                c.unblock()

    def alarm_reason(self) -> str:
        return "low on " + " & ".join(sorted(self.alarms))

    def publishes_added(self, n: int) -> None:
        self.pending_publishes += n
        if self.pending_publishes > self.publish_high_water and "memory" not in self.alarms:
            self.raise_alarm("memory")

    def publishes_removed(self, n: int) -> None:
        self.pending_publishes -= n
        if "memory" in self.alarms and self.pending_publishes <= self.publish_high_water // 2:
            self.clear_alarm("memory")

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # consumers and queue lifecycles (per server: exclusive owners and consumers are
    # tracked here, in the node the client is connected to)

    def consumer_total(self, queue: str) -> int:
        return len(self.consumers.get(queue, ()))

    def consumer_added(self, consumer: _Consumer) -> None:
        self.consumers.setdefault(consumer.queue, set()).add(consumer)
        if consumer.exclusive:
            self.exclusive_consumer[consumer.queue] = consumer
        self.broker.consumer_added(consumer.queue)

    def consumer_removed(self, consumer: _Consumer) -> None:
        queue = consumer.queue
        group = self.consumers.get(queue)
        if group is not None:
            group.discard(consumer)
            if not group:
                del self.consumers[queue]
        if self.exclusive_consumer.get(queue) is consumer:
            del self.exclusive_consumer[queue]
        self.broker.consumer_removed(queue)
        if queue in self.auto_delete and not self.consumers.get(queue):
            self.auto_delete.discard(queue)
            self.spawn(self.delete_queue_quietly(queue))

    async def delete_queue_quietly(self, queue: str) -> None:
        with contextlib.suppress(errors.ConveyorError):
            await self.broker.delete_queue(queue)

    def forget_queue(self, queue: str) -> None:
        owner = self.exclusive_owner.pop(queue, None)
        if owner is not None:
            owner.exclusive_queues.discard(queue)
        self.auto_delete.discard(queue)

    def _queue_deleted(self, queue: str) -> None:
        self.forget_queue(queue)
        for consumer in list(self.consumers.get(queue, ())):
            consumer.connection._server_cancel(consumer)


__all__ = ["AmqpServer", "Vhost", "check_vhost_name", "queue_options", "translate"]
