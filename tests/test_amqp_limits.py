"""AMQP limits (docs/reliability.md): connections per server, channels per connection,
message size; each refused as RabbitMQ refuses it, checked against a real conveyor
server (in-process and ``conveyor serve``) and, for channel_max, against the local
RabbitMQ."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions
import pytest
from pamqp import body, commands, frame, header

from amqp_support import RunningAmqp, amqp_server
from conveyor.protocols.amqp import ChannelClosed, ServerConnection
from serverproc import ServerProcess

pytestmark = pytest.mark.timeout(60)


class Raw:
    """A hand-driven AMQP client: handshake, then frames in and out."""

    def __init__(self, port: int, channel_max: int = 0, vhost: str = "/") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""
        self.sock.sendall(b"AMQP\x00\x00\x09\x01")
        assert isinstance(self.read(), commands.Connection.Start)
        self.send(
            0,
            commands.Connection.StartOk(
                client_properties={"capabilities": {"authentication_failure_close": True}},
                mechanism="PLAIN",
                response="\0guest\0guest",
            ),
        )
        tune = self.read()
        assert isinstance(tune, commands.Connection.Tune)
        self.send(0, commands.Connection.TuneOk(channel_max or tune.channel_max, 131072, 0))
        self.send(0, commands.Connection.Open(vhost))
        self.opened = self.read()

    def send(self, channel: int, obj: Any) -> None:
        self.sock.sendall(frame.marshal(obj, channel))

    def read(self) -> Any:
        return self.read_frame()[1]

    def read_frame(self) -> tuple[int, Any]:
        while True:
            try:
                used, channel, obj = frame.unmarshal(self.buf)
            except Exception:
                data = self.sock.recv(65536)
                if not data:
                    return -1, None
                self.buf += data
                continue
            self.buf = self.buf[used:]
            return channel, obj

    def close(self) -> None:
        self.sock.close()


def close_info(obj: Any) -> tuple[str, int, str, int, int]:
    return (type(obj).__name__, obj.reply_code, obj.reply_text, obj.class_id, obj.method_id)


# -- max_connections -------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited() -> Iterator[RunningAmqp]:
    with amqp_server(max_connections=2, channel_max=3, max_message_size=1000) as srv:
        yield srv


def test_connection_limit_refuses_at_open_and_frees_on_close(limited: RunningAmqp) -> None:
    handshaking = socket.create_connection(("127.0.0.1", limited.port))  # does not count
    a = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", limited.port))
    b = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", limited.port))
    try:
        raw = Raw(limited.port)
        assert close_info(raw.opened) == (
            "Close",
            530,
            "NOT_ALLOWED - connection refused: node connection limit (2) is reached",
            10,
            40,
        )
        raw.close()
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", limited.port))
        a.channel().queue_declare("still-served")  # the open ones keep working
        a.close()
        c = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", limited.port))
        c.channel().queue_declare("still-served", passive=True)
        c.close()
    finally:
        handshaking.close()
        if a.is_open:
            a.close()
        b.close()


# -- channel_max -----------------------------------------------------------------------


def _channel_max_scenario(port: int) -> list[Any]:
    """channel_max 2 negotiated: what opening channels 1, 5 (after closing 1), 2, 3 gives."""
    raw = Raw(port, channel_max=2)
    out: list[Any] = []
    try:
        assert isinstance(raw.opened, commands.Connection.OpenOk)
        raw.send(1, commands.Channel.Open())
        out.append(raw.read_frame())
        raw.send(1, commands.Channel.Close(200, "", 0, 0))
        out.append(raw.read_frame())
        raw.send(5, commands.Channel.Open())  # a number above channel_max is fine
        out.append(raw.read_frame())
        raw.send(2, commands.Channel.Open())
        out.append(raw.read_frame())
        raw.send(3, commands.Channel.Open())  # a third open channel is not
        channel, obj = raw.read_frame()
        out.append((channel, close_info(obj)))
    finally:
        raw.close()
    return [(ch, type(o).__name__) if not isinstance(o, tuple) else (ch, o) for ch, o in out]


def test_channel_max_counts_open_channels(limited: RunningAmqp) -> None:
    got = _channel_max_scenario(limited.port)
    assert got == [
        (1, "OpenOk"),
        (1, "CloseOk"),
        (5, "OpenOk"),
        (2, "OpenOk"),
        (
            0,
            (
                "Close",
                530,
                "NOT_ALLOWED - number of channels opened (2) has reached the negotiated "
                "channel_max (2)",
                0,
                0,
            ),
        ),
    ]
    # The server's own offer (3 here) bounds what a client may ask for.
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", limited.port))
    try:
        assert conn._impl.params.channel_max == 3
    finally:
        conn.close()


def _rabbit_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _rabbit_up(), reason="no RabbitMQ on 127.0.0.1:5672")
def test_differential_channel_max(limited: RunningAmqp) -> None:
    assert _channel_max_scenario(limited.port) == _channel_max_scenario(5672)


# -- max_message_size ------------------------------------------------------------------


def test_message_size_limit_closes_the_channel(limited: RunningAmqp) -> None:
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", limited.port))
    try:
        ch = conn.channel()
        ch.queue_declare("sized")
        ch.confirm_delivery()
        ch.basic_publish("", "sized", b"x" * 1000)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            ch.basic_publish("", "sized", b"x" * 1001)
            ch.queue_declare("sized", passive=True)
        assert (info.value.reply_code, info.value.reply_text) == (
            406,
            "PRECONDITION_FAILED - message size 1001 is larger than configured max size 1000",
        )
        ch2 = conn.channel()  # the connection stays usable
        assert ch2.queue_declare("sized", passive=True).method.message_count == 1
    finally:
        conn.close()


def test_oversized_body_is_not_buffered_sans_io() -> None:
    conn = ServerConnection(authenticate=lambda u, p: True, max_message_size=10)
    conn.receive_data(b"AMQP\x00\x00\x09\x01")
    conn.receive_data(
        frame.marshal(commands.Connection.StartOk(mechanism="PLAIN", response="\0g\0g"), 0)
    )
    conn.receive_data(frame.marshal(commands.Connection.TuneOk(10, 4096, 0), 0))
    conn.receive_data(frame.marshal(commands.Connection.Open("/"), 0))
    conn.receive_data(frame.marshal(commands.Channel.Open(), 1))
    conn.data_to_send()
    data = frame.marshal(commands.Basic.Publish(exchange="", routing_key="q"), 1)
    data += frame.marshal(header.ContentHeader(0, 11, commands.Basic.Properties()), 1)
    events = conn.receive_data(data)
    assert [type(e) for e in events] == [ChannelClosed]
    assert events[0].reply_code == 406
    # The body frames that follow are dropped; nothing is assembled.
    assert conn.receive_data(frame.marshal(body.ContentBody(b"x" * 11), 1)) == []
    _, _, close = frame.unmarshal(conn.data_to_send())
    assert isinstance(close, commands.Channel.Close)
    assert (close.class_id, close.method_id) == (60, 40)
    conn.receive_data(frame.marshal(commands.Channel.CloseOk(), 1))
    assert conn.receive_data(frame.marshal(commands.Channel.Open(), 1))  # reopened


# -- the settings, through ``conveyor serve`` ------------------------------------------


def test_settings_reach_the_amqp_listener(tmp_path: Any) -> None:
    env = {
        "CONVEYOR_MAX_MESSAGE_SIZE": "2048",
        "CONVEYOR_AMQP_MAX_CONNECTIONS": "1",
        "CONVEYOR_AMQP_CHANNEL_MAX": "4",
    }
    with ServerProcess(tmp_path, kafka=False, env=env) as srv:
        port = srv.amqp_port
        assert port is not None
        conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
        try:
            assert conn._impl.params.channel_max == 4
            raw = Raw(port)
            assert close_info(raw.opened)[1:3] == (
                530,
                "NOT_ALLOWED - connection refused: node connection limit (1) is reached",
            )
            raw.close()
            ch = conn.channel()
            ch.queue_declare("big")
            ch.confirm_delivery()
            ch.basic_publish("", "big", b"y" * 2048)
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
                ch.basic_publish("", "big", b"y" * 2049)
            assert info.value.reply_code == 406
            assert "message size 2049 is larger than configured max size 2048" in (
                info.value.reply_text
            )
        finally:
            conn.close()
