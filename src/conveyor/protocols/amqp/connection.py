"""The server side of one AMQP 0-9-1 connection, with no I/O (the h11 pattern).

Feed it bytes with :meth:`ServerConnection.receive_data`, which returns events; queue
frames with the ``send_*`` methods and write out :meth:`data_to_send`. The object
never touches a socket, a clock or the broker.

Rules it enforces (everything else is the server's business):

* The 8-byte protocol header must be ``AMQP 0 0 9 1``; otherwise the header we speak is
  written back and the connection ends (:class:`ConnectionTerminated`).
* Handshake on channel 0: Start -> StartOk (PLAIN or AMQPLAIN, checked by the
  ``authenticate`` callable) -> Tune -> TuneOk -> Open (checked by ``open_refusal``,
  or ``vhost_allowed``). Nothing but that sequence is accepted before the connection is
  open.
* Frames larger than the negotiated ``frame_max`` are a 501 FRAME_ERROR; a broken
  frame-end octet or an unknown frame type too. Undecodable methods are 502; methods
  a client may not send are 503; channel misuse is 504; a content frame out of place
  is 505. These close the connection (hard errors); the server reports soft errors
  with :meth:`close_channel`.
* Channels must be opened before use; as in RabbitMQ, at most ``channel_max`` may be
  open at once (any number 1..65535), one more is 530 NOT_ALLOWED. A channel the
  server closed ignores every frame but Channel.Close/CloseOk until the client
  answers; then the number may be opened again.
* A content header announcing a body larger than ``max_message_size`` closes the
  channel with 406 PRECONDITION_FAILED (RabbitMQ's text) without buffering the body;
  its body frames are skipped (:class:`ChannelClosed` with ``by_peer=False``).
* Basic.Publish, its content header and body frames are assembled into one
  :class:`MessageReceived` (bodies split at any size are joined).
* Heartbeats: :meth:`heartbeat_tick` is called by the server every half interval; it
  queues a heartbeat when nothing else was sent and reports a peer that has been
  silent for two intervals.

Replies to methods the server handles (everything after the handshake except
Channel.Open and the close handshakes' last step) are the server's to send, in order.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pamqp import commands, decode
from pamqp.base import Frame

from . import codec
from .errors import (
    ACCESS_REFUSED,
    CHANNEL_ERROR,
    COMMAND_INVALID,
    CONNECTION_FORCED,
    FRAME_ERROR,
    NOT_ALLOWED,
    NOT_IMPLEMENTED,
    PRECONDITION_FAILED,
    REPLY_SUCCESS,
    SYNTAX_ERROR,
    UNEXPECTED_FRAME,
    AmqpError,
    RemoteProtocolError,
)

# -- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionOpened:
    """The handshake finished: ``user`` logged in to ``vhost``."""

    user: str
    vhost: str
    client_properties: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ChannelOpened:
    channel: int


@dataclass(frozen=True, slots=True)
class MethodReceived:
    """A method for the server to carry out (and answer, unless it has ``nowait``)."""

    channel: int
    method: Frame


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A complete Basic.Publish: method, properties and body.

    ``header`` is the raw content-header payload, kept so that Basic.Return can send
    the publisher's properties back byte for byte.
    """

    channel: int
    method: commands.Basic.Publish
    properties: commands.Basic.Properties
    header: bytes
    body: bytes


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    """The channel is gone: the server drops its state (requeueing unacked messages).

    ``by_peer`` is True when the client sent Channel.Close; the server then answers
    with :meth:`ServerConnection.send_channel_close_ok` after cleaning up.
    """

    channel: int
    by_peer: bool
    reply_code: int = REPLY_SUCCESS
    reply_text: str = ""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is finished; the server cleans up and then closes the socket.

    ``by_peer`` is True when the client sent Connection.Close; answer it with
    :meth:`ServerConnection.send_connection_close_ok`.
    """

    by_peer: bool
    reply_code: int = REPLY_SUCCESS
    reply_text: str = ""


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The connection ended without a close handshake (bad header, auth refused without
    ``authentication_failure_close``, Close-Ok received). Write out what remains and
    close the socket."""

    reason: str


Event = (
    ConnectionOpened
    | ChannelOpened
    | MethodReceived
    | MessageReceived
    | ChannelClosed
    | ConnectionClosed
    | ConnectionTerminated
)

# -- state ----------------------------------------------------------------------------


class State(enum.Enum):
    AWAIT_HEADER = "await-header"
    AWAIT_START_OK = "await-start-ok"
    AWAIT_TUNE_OK = "await-tune-ok"
    AWAIT_OPEN = "await-open"
    OPEN = "open"
    #: We sent Connection.Close and wait for Close-Ok.
    CLOSING = "closing"
    #: The client sent Connection.Close; the server is cleaning up.
    PEER_CLOSING = "peer-closing"
    CLOSED = "closed"


class ChannelState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"  # we sent Channel.Close
    PEER_CLOSING = "peer-closing"  # the client sent Channel.Close


@dataclass(slots=True)
class _Channel:
    state: ChannelState = ChannelState.OPEN
    publish: commands.Basic.Publish | None = None
    properties: commands.Basic.Properties | None = None
    header: bytes = b""
    body_size: int = 0
    received: int = 0
    parts: list[bytes] = field(default_factory=list)


#: Methods only a server sends; a client sending one is a 503 COMMAND_INVALID.
_SERVER_ONLY: frozenset[type[Frame]] = frozenset(
    {
        commands.Connection.Start,
        commands.Connection.Secure,
        commands.Connection.Tune,
        commands.Connection.OpenOk,
        commands.Channel.OpenOk,
        commands.Exchange.DeclareOk,
        commands.Exchange.DeleteOk,
        commands.Exchange.BindOk,
        commands.Exchange.UnbindOk,
        commands.Queue.DeclareOk,
        commands.Queue.BindOk,
        commands.Queue.UnbindOk,
        commands.Queue.PurgeOk,
        commands.Queue.DeleteOk,
        commands.Basic.QosOk,
        commands.Basic.ConsumeOk,
        commands.Basic.Return,
        commands.Basic.Deliver,
        commands.Basic.GetOk,
        commands.Basic.GetEmpty,
        commands.Basic.RecoverOk,
        commands.Tx.SelectOk,
        commands.Tx.CommitOk,
        commands.Tx.RollbackOk,
        commands.Confirm.SelectOk,
        commands.Connection.UpdateSecretOk,
    }
)

_FRAME_HEAD = struct.Struct(">BHI")
_METHOD_ID = struct.Struct(">HH")

DEFAULT_FRAME_MAX = 131072
DEFAULT_CHANNEL_MAX = 2047
DEFAULT_HEARTBEAT = 60
#: Before Tune-Ok the client may not send frames larger than this (spec: frame-min-size).
_PRE_TUNE_FRAME_MAX = 131072


def _frame_max_text(size: int, limit: int) -> str:
    return f"type 1, all octets = <<>>: {{frame_too_large,{size},{limit - 8}}}"


def _server_properties(product: str, version: str) -> dict[str, Any]:
    return {
        "product": product,
        "version": version,
        "platform": "Python",
        "information": "conveyor message broker",
        "capabilities": {
            "publisher_confirms": True,
            "exchange_exchange_bindings": True,
            "basic.nack": True,
            "consumer_cancel_notify": True,
            "connection.blocked": True,
            "consumer_priorities": False,
            "authentication_failure_close": True,
            "per_consumer_qos": True,
            "direct_reply_to": False,
        },
    }


def parse_credentials(mechanism: str, response: str | bytes) -> tuple[str, str] | None:
    """(username, password) from a StartOk response, or None when unreadable."""
    raw = response.encode() if isinstance(response, str) else bytes(response)
    if mechanism == "PLAIN":
        parts = raw.split(b"\x00")
        if len(parts) != 3:
            return None
        return parts[1].decode(errors="replace"), parts[2].decode(errors="replace")
    if mechanism == "AMQPLAIN":
        try:
            _, table = decode.field_table(struct.pack(">I", len(raw)) + raw)
        except ValueError:
            return None
        login, password = table.get("LOGIN"), table.get("PASSWORD")
        if isinstance(login, bytes | bytearray):
            login = login.decode(errors="replace")
        if isinstance(password, bytes | bytearray):
            password = password.decode(errors="replace")
        if isinstance(login, str) and isinstance(password, str):
            return login, password
    return None


class ServerConnection:
    """One AMQP connection as the server sees it. See the module docstring."""

    def __init__(
        self,
        *,
        authenticate: Callable[[str, str], bool],
        vhost_allowed: Callable[[str, str], bool] = lambda user, vhost: vhost == "/",
        open_refusal: Callable[[str, str], str | None] | None = None,
        product: str = "conveyor",
        version: str = "0",
        frame_max: int = DEFAULT_FRAME_MAX,
        channel_max: int = DEFAULT_CHANNEL_MAX,
        heartbeat: int = DEFAULT_HEARTBEAT,
        max_message_size: int | None = None,
    ) -> None:
        self._authenticate = authenticate
        self._vhost_allowed = vhost_allowed
        #: (user, vhost) -> None to accept Connection.Open, or the text of a 530 refusal.
        self._open_refusal = open_refusal
        #: Largest body accepted in a Basic.Publish (None: no limit).
        self.max_message_size = max_message_size
        self._product = product
        self._version = version
        self.state = State.AWAIT_HEADER
        self.frame_max = frame_max
        self.channel_max = channel_max
        self.heartbeat = heartbeat
        self._offered = (frame_max, channel_max, heartbeat)
        self.user = ""
        self.vhost = ""
        self.client_properties: dict[str, Any] = {}
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._channels: dict[int, _Channel] = {}
        self._sent_since_tick = False
        self._silent_ticks = 0

    # -- capabilities the client announced -------------------------------------------

    def client_capability(self, name: str) -> bool:
        caps = self.client_properties.get("capabilities")
        return isinstance(caps, dict) and bool(caps.get(name))

    # -- output ------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        self._sent_since_tick = True
        return data

    def send_method(self, channel: int, method: Frame) -> None:
        if self.state is State.CLOSED:
            return
        self._out.append(codec.method_frame(channel, method))

    def send_content(self, channel: int, method: Frame, header_payload: bytes, body: bytes) -> None:
        """A method with content (Deliver, GetOk, Return) split to frame_max."""
        if self.state is State.CLOSED:
            return
        self._out.append(codec.method_frame(channel, method))
        self._out.extend(codec.content_frames(channel, header_payload, body, self.frame_max))

    def send_content_frame(
        self, channel: int, method_frame: bytes, header_payload: bytes, body: bytes
    ) -> None:
        """send_content with the method frame already built (codec.basic_deliver_frame)."""
        if self.state is State.CLOSED:
            return
        self._out.append(method_frame)
        self._out.extend(codec.content_frames(channel, header_payload, body, self.frame_max))

    def send_raw(self, data: bytes) -> None:
        """Pre-built frames (the server's fast path for deliveries)."""
        if self.state is not State.CLOSED:
            self._out.append(data)

    def close_channel(
        self, channel: int, code: int, text: str, class_id: int = 0, method_id: int = 0
    ) -> None:
        """Close ``channel`` from the server side (a soft error)."""
        ch = self._channels.get(channel)
        if ch is None or ch.state is not ChannelState.OPEN:
            return
        ch.state = ChannelState.CLOSING
        ch.publish = None
        ch.parts = []
        self.send_method(channel, commands.Channel.Close(code, text, class_id, method_id))

    def close(self, code: int, text: str, class_id: int = 0, method_id: int = 0) -> None:
        """Close the connection from the server side (a hard error or shutdown)."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        if self.state in (State.AWAIT_HEADER,):
            self.state = State.CLOSED
            return
        self.state = State.CLOSING
        self._channels.clear()
        self._out.append(
            codec.method_frame(0, commands.Connection.Close(code, text, class_id, method_id))
        )

    def fail(self, error: AmqpError) -> None:
        """Report ``error`` the way its code asks: channel or connection close."""
        self.close(error.code, error.reply_text, error.class_id, error.method_id)

    def send_channel_close_ok(self, channel: int) -> None:
        ch = self._channels.get(channel)
        if ch is not None and ch.state is ChannelState.PEER_CLOSING:
            del self._channels[channel]
            self.send_method(channel, commands.Channel.CloseOk())

    def send_connection_close_ok(self) -> None:
        if self.state is State.PEER_CLOSING:
            self._out.append(codec.method_frame(0, commands.Connection.CloseOk()))
            self.state = State.CLOSED

    def channel_is_open(self, channel: int) -> bool:
        ch = self._channels.get(channel)
        return ch is not None and ch.state is ChannelState.OPEN

    # -- heartbeats --------------------------------------------------------------------

    def heartbeat_tick(self, monitor: bool = True) -> bool:
        """Call every ``heartbeat / 2`` seconds. Returns False when the peer is dead
        (nothing received for two heartbeat intervals). ``monitor=False`` while the
        server is not reading from the peer (blocked or back-pressured, as RabbitMQ
        does): heartbeats are still sent, the peer's silence is not held against it."""
        if self.heartbeat <= 0 or self.state not in (State.OPEN, State.AWAIT_OPEN):
            return True
        if not self._sent_since_tick and not self._out:
            self._out.append(codec.HEARTBEAT_FRAME)
        self._sent_since_tick = False
        if not monitor:
            self._silent_ticks = 0
            return True
        self._silent_ticks += 1
        return self._silent_ticks <= 4

    # -- input -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse ``data``; return the events it completes. Protocol violations are
        answered here (Connection.Close with the right code) and end parsing."""
        events: list[Event] = []
        if self.state is State.CLOSED:
            return events
        self._silent_ticks = 0
        self._buffer += data
        try:
            self._parse(events)
        except RemoteProtocolError as error:
            self._buffer.clear()
            if self.state is State.AWAIT_HEADER:
                self.state = State.CLOSED
                events.append(ConnectionTerminated(error.reply_text))
            else:
                self.close(error.code, error.reply_text, error.class_id, error.method_id)
                events.append(ConnectionClosed(False, error.code, error.reply_text))
        return events

    def _parse(self, events: list[Event]) -> None:
        buf = self._buffer
        pos = 0
        size = len(buf)
        try:
            if self.state is State.AWAIT_HEADER:
                if size < 8:
                    if not codec.PROTOCOL_HEADER.startswith(bytes(buf[:size])):
                        self._bad_header()
                    return
                if bytes(buf[:8]) != codec.PROTOCOL_HEADER:
                    self._bad_header()
                pos = 8
                self._start()
            limit = self.frame_max if self.state is State.OPEN else _PRE_TUNE_FRAME_MAX
            while size - pos >= 7 and self.state is not State.CLOSED:
                frame_type, channel, length = _FRAME_HEAD.unpack_from(buf, pos)
                if length + 8 > limit:
                    raise RemoteProtocolError(FRAME_ERROR, _frame_max_text(length + 8, limit))
                end = pos + 7 + length
                if end >= size:
                    break
                if buf[end] != codec.FRAME_END:
                    raise RemoteProtocolError(
                        FRAME_ERROR,
                        f"type {frame_type}, all octets = <<>>: {{invalid_frame_end_marker,"
                        f"{buf[end]}}}",
                    )
                payload = bytes(buf[pos + 7 : end])
                pos = end + 1
                self._frame(frame_type, channel, payload, events)
                if self.state in (State.AWAIT_OPEN, State.OPEN):
                    limit = self.frame_max if self.state is State.OPEN else limit
        finally:
            if pos:
                del buf[:pos]

    def _bad_header(self) -> None:
        self._out.append(codec.PROTOCOL_HEADER)
        raise RemoteProtocolError(FRAME_ERROR, "bad protocol header")

    def _start(self) -> None:
        self.state = State.AWAIT_START_OK
        self.send_method(
            0,
            commands.Connection.Start(
                server_properties=_server_properties(self._product, self._version),
                mechanisms="PLAIN AMQPLAIN",
                locales="en_US",
            ),
        )

    def _frame(self, frame_type: int, channel: int, payload: bytes, events: list[Event]) -> None:
        if frame_type == codec.FRAME_METHOD:
            method = self._decode_method(payload)
            if channel == 0:
                self._connection_method(method, events)
            else:
                self._channel_method(channel, method, events)
        elif frame_type == codec.FRAME_HEADER:
            self._content_header(channel, payload, events)
        elif frame_type == codec.FRAME_BODY:
            self._content_body(channel, payload, events)
        elif frame_type == codec.FRAME_HEARTBEAT:
            if channel != 0:
                raise RemoteProtocolError(
                    FRAME_ERROR, f"type 8, all octets = <<>>: {{non_zero_channel,{channel}}}"
                )
        else:
            raise RemoteProtocolError(
                FRAME_ERROR, f"type {frame_type}, first 16 octets = <<>>: unknown_frame"
            )

    @staticmethod
    def _decode_method(payload: bytes) -> Frame:
        if len(payload) < 4:
            raise RemoteProtocolError(FRAME_ERROR, "type 1, all octets = <<>>: short_frame")
        class_id, method_id = _METHOD_ID.unpack_from(payload)
        cls = commands.INDEX_MAPPING.get((class_id << 16) | method_id)
        if cls is None:
            raise RemoteProtocolError(
                NOT_IMPLEMENTED, f"unknown method {{{class_id},{method_id}}}", class_id, method_id
            )
        method: Frame = cls()
        try:
            method.unmarshal(payload[4:])
        except Exception as error:  # pamqp raises several types on garbage
            raise RemoteProtocolError(
                SYNTAX_ERROR,
                f"frame method {{{class_id},{method_id}}} could not be decoded",
                class_id,
                method_id,
            ) from error
        return method

    # -- channel 0 ---------------------------------------------------------------------

    def _connection_method(self, method: Frame, events: list[Event]) -> None:
        state = self.state
        if isinstance(method, commands.Connection.Close):
            if state is State.CLOSING:
                # Both sides closed at once: answer and finish.
                self._out.append(codec.method_frame(0, commands.Connection.CloseOk()))
                self.state = State.CLOSED
                events.append(ConnectionTerminated("closed by both sides"))
                return
            self.state = State.PEER_CLOSING
            self._channels.clear()
            events.append(ConnectionClosed(True, method.reply_code or 0, method.reply_text or ""))
            return
        if isinstance(method, commands.Connection.CloseOk):
            if state is State.CLOSING:
                self.state = State.CLOSED
                events.append(ConnectionTerminated("close-ok received"))
                return
            raise _unexpected(method)
        if state is State.CLOSING or state is State.PEER_CLOSING:
            return  # everything but the close handshake is ignored now
        if state is State.AWAIT_START_OK and isinstance(method, commands.Connection.StartOk):
            self._start_ok(method, events)
        elif state is State.AWAIT_TUNE_OK and isinstance(method, commands.Connection.TuneOk):
            self._tune_ok(method)
        elif state is State.AWAIT_OPEN and isinstance(method, commands.Connection.Open):
            vhost = method.virtual_host
            if self._open_refusal is not None:
                refusal = self._open_refusal(self.user, vhost)
            elif not self._vhost_allowed(self.user, vhost):
                refusal = f"access to vhost '{vhost}' refused for user '{self.user}'"
            else:
                refusal = None
            if refusal is not None:
                raise RemoteProtocolError(NOT_ALLOWED, refusal, 10, 40)
            self.vhost = method.virtual_host
            self.state = State.OPEN
            self.send_method(0, commands.Connection.OpenOk())
            events.append(ConnectionOpened(self.user, self.vhost, self.client_properties))
        elif state is State.OPEN and isinstance(
            method,
            commands.Connection.Blocked
            | commands.Connection.Unblocked
            | commands.Connection.UpdateSecret,
        ):
            events.append(MethodReceived(0, method))
        elif type(method) in _SERVER_ONLY or state is State.OPEN:
            raise RemoteProtocolError(
                COMMAND_INVALID,
                f"unexpected method {method.name} on channel 0",
                *_ids(method),
            )
        else:
            raise _unexpected(method)

    def _start_ok(self, method: commands.Connection.StartOk, events: list[Event]) -> None:
        self.client_properties = dict(method.client_properties or {})
        mechanism = method.mechanism
        if mechanism not in ("PLAIN", "AMQPLAIN"):
            raise RemoteProtocolError(
                ACCESS_REFUSED,
                f"unsupported authentication mechanism '{mechanism}'",
                10,
                11,
            )
        creds = parse_credentials(mechanism, method.response)
        if creds is None or not self._authenticate(*creds):
            user = creds[0] if creds else ""
            text = (
                f"Login was refused using authentication mechanism {mechanism}. "
                "For details see the broker logfile."
            )
            if self.client_capability("authentication_failure_close"):
                raise RemoteProtocolError(ACCESS_REFUSED, text, 10, 11)
            self.state = State.CLOSED
            events.append(ConnectionTerminated(f"login refused for user '{user}'"))
            return
        self.user = creds[0]
        self.state = State.AWAIT_TUNE_OK
        self.send_method(
            0,
            commands.Connection.Tune(
                channel_max=self.channel_max, frame_max=self.frame_max, heartbeat=self.heartbeat
            ),
        )

    def _tune_ok(self, method: commands.Connection.TuneOk) -> None:
        offered_frame_max, offered_channel_max, _ = self._offered
        frame_max = method.frame_max or offered_frame_max
        if frame_max < 4096 or frame_max > offered_frame_max:
            raise RemoteProtocolError(
                NOT_ALLOWED,
                f"negotiated frame_max = {frame_max} is outside 4096..{offered_frame_max}",
                10,
                31,
            )
        channel_max = method.channel_max or offered_channel_max
        if channel_max > offered_channel_max:
            raise RemoteProtocolError(
                NOT_ALLOWED,
                f"negotiated channel_max = {channel_max} is higher than the maximum allowed "
                f"value ({offered_channel_max})",
                10,
                31,
            )
        self.frame_max = frame_max
        self.channel_max = channel_max
        self.heartbeat = method.heartbeat
        self.state = State.AWAIT_OPEN

    # -- channels ----------------------------------------------------------------------

    def _channel_method(self, channel: int, method: Frame, events: list[Event]) -> None:
        if self.state is not State.OPEN:
            if self.state in (State.CLOSING, State.PEER_CLOSING):
                return
            raise _unexpected(method)
        ch = self._channels.get(channel)
        if ch is None:
            # RabbitMQ counts the channels (any number is fine) before anything else.
            if self.channel_max and len(self._channels) >= self.channel_max:
                raise RemoteProtocolError(
                    NOT_ALLOWED,
                    f"number of channels opened ({len(self._channels)}) has reached the "
                    f"negotiated channel_max ({self.channel_max})",
                )
            if isinstance(method, commands.Channel.Open):
                self._channels[channel] = _Channel()
                self.send_method(channel, commands.Channel.OpenOk())
                events.append(ChannelOpened(channel))
                return
            raise RemoteProtocolError(CHANNEL_ERROR, "expected 'channel.open'", *_ids(method))
        if ch.state is ChannelState.CLOSING:
            if isinstance(method, commands.Channel.CloseOk):
                del self._channels[channel]
            elif isinstance(method, commands.Channel.Close):
                self.send_method(channel, commands.Channel.CloseOk())
            return
        if ch.state is ChannelState.PEER_CLOSING:
            return
        if ch.publish is not None:
            raise RemoteProtocolError(
                UNEXPECTED_FRAME,
                "expected content header for class 60, got non content header frame instead",
                *_ids(method),
            )
        if isinstance(method, commands.Basic.Publish):
            ch.publish = method
            return
        if isinstance(method, commands.Channel.Close):
            ch.state = ChannelState.PEER_CLOSING
            events.append(
                ChannelClosed(channel, True, method.reply_code or 0, method.reply_text or "")
            )
            return
        if isinstance(method, commands.Channel.Open):
            raise RemoteProtocolError(CHANNEL_ERROR, "second 'channel.open' seen", 20, 10)
        if isinstance(method, commands.Channel.CloseOk):
            raise _unexpected(method)
        if type(method) in _SERVER_ONLY or method.name.startswith("Connection."):
            raise RemoteProtocolError(
                COMMAND_INVALID, f"unexpected method {method.name}", *_ids(method)
            )
        events.append(MethodReceived(channel, method))

    def _content_header(self, channel: int, payload: bytes, events: list[Event]) -> None:
        ch = self._channels.get(channel) if self.state is State.OPEN else None
        if ch is None or ch.state is not ChannelState.OPEN or ch.publish is None:
            if ch is not None and ch.state is not ChannelState.OPEN:
                return
            if self.state in (State.CLOSING, State.PEER_CLOSING):
                return
            raise RemoteProtocolError(
                UNEXPECTED_FRAME, "expected method frame, got non method frame instead"
            )
        if ch.properties is not None:
            raise RemoteProtocolError(
                UNEXPECTED_FRAME, "expected content body, got content header instead"
            )
        if len(payload) < 14:
            raise RemoteProtocolError(FRAME_ERROR, "type 2, all octets = <<>>: short_frame")
        class_id, _, body_size = struct.unpack_from(">HHQ", payload)
        if class_id != 60:
            raise RemoteProtocolError(
                UNEXPECTED_FRAME,
                f"expected content header for class 60, got one for class {class_id} instead",
            )
        header = commands.Basic.Properties()
        try:
            flags, offset = _property_flags(payload)
            header.unmarshal(flags, payload[12 + offset :])
        except Exception as error:
            raise RemoteProtocolError(
                SYNTAX_ERROR, "content header could not be decoded", 60, 40
            ) from error
        limit = self.max_message_size
        if limit is not None and body_size > limit:
            # As RabbitMQ (which says so once the body is in): the channel closes; the
            # body frames still on their way are skipped by the closing channel.
            text = (
                f"PRECONDITION_FAILED - message size {body_size} is larger than configured "
                f"max size {limit}"
            )
            ch.properties = None
            self.close_channel(channel, PRECONDITION_FAILED, text, 60, 40)
            events.append(ChannelClosed(channel, False, PRECONDITION_FAILED, text))
            return
        ch.properties = header
        ch.header = payload
        ch.body_size = body_size
        ch.received = 0
        if body_size == 0:
            self._message_done(channel, ch, events)

    def _content_body(self, channel: int, payload: bytes, events: list[Event]) -> None:
        ch = self._channels.get(channel) if self.state is State.OPEN else None
        if ch is None or ch.state is not ChannelState.OPEN or ch.properties is None:
            if ch is not None and ch.state is not ChannelState.OPEN:
                return
            if self.state in (State.CLOSING, State.PEER_CLOSING):
                return
            raise RemoteProtocolError(
                UNEXPECTED_FRAME, "expected method frame, got non method frame instead"
            )
        ch.received += len(payload)
        if ch.received > ch.body_size:
            raise RemoteProtocolError(
                FRAME_ERROR,
                f"type 3, all octets = <<>>: {{body_too_large,{ch.received},{ch.body_size}}}",
            )
        ch.parts.append(payload)
        if ch.received == ch.body_size:
            self._message_done(channel, ch, events)

    @staticmethod
    def _message_done(channel: int, ch: _Channel, events: list[Event]) -> None:
        assert ch.publish is not None and ch.properties is not None
        body = ch.parts[0] if len(ch.parts) == 1 else b"".join(ch.parts)
        events.append(MessageReceived(channel, ch.publish, ch.properties, ch.header, body))
        ch.publish = None
        ch.properties = None
        ch.parts = []


def _property_flags(payload: bytes) -> tuple[int, int]:
    """(flags, bytes used) of a content header's property flag words."""
    offset, flags, index = 12, 0, 0
    while True:
        if len(payload) < offset + 2:
            raise ValueError("property flags truncated")
        (word,) = struct.unpack_from(">H", payload, offset)
        offset += 2
        flags |= (word & 0xFFFE) << (index * 16)
        if not word & 1:
            return flags, offset - 12
        index += 1


def _ids(method: Frame) -> tuple[int, int]:
    index = method.index
    return index >> 16, index & 0xFFFF


def _unexpected(method: Frame) -> RemoteProtocolError:
    return RemoteProtocolError(
        COMMAND_INVALID, f"unexpected method {method.name} in this state", *_ids(method)
    )


def connection_forced(
    text: str = "broker forced connection closure with reason 'shutdown'",
) -> AmqpError:
    return AmqpError(CONNECTION_FORCED, text)


def precondition_failed(text: str, method: Frame | None = None) -> AmqpError:
    ids = _ids(method) if method is not None else (0, 0)
    return AmqpError(PRECONDITION_FAILED, text, *ids)


__all__ = [
    "ChannelClosed",
    "ChannelOpened",
    "ChannelState",
    "ConnectionClosed",
    "ConnectionOpened",
    "ConnectionTerminated",
    "Event",
    "MessageReceived",
    "MethodReceived",
    "ServerConnection",
    "State",
    "parse_credentials",
]
