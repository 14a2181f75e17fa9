"""Sans-I/O tests of the AMQP server state machine: bytes in, events and bytes out."""

from __future__ import annotations

import datetime
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import body, commands, frame, header
from pamqp.base import Frame

from conveyor.model import Death, Delivery, Properties
from conveyor.protocols.amqp import (
    ChannelClosed,
    ChannelOpened,
    ConnectionClosed,
    ConnectionOpened,
    ConnectionTerminated,
    MessageReceived,
    MethodReceived,
    ServerConnection,
    State,
    codec,
)
from conveyor.protocols.amqp.connection import parse_credentials

HEADER = b"AMQP\x00\x00\x09\x01"


def decode_all(data: bytes) -> list[tuple[int, Any]]:
    out = []
    while data:
        used, channel, obj = frame.unmarshal(data)
        out.append((channel, obj))
        data = data[used:]
    return out


def fm(channel: int, obj: Any) -> bytes:
    return frame.marshal(obj, channel)


def plain(user: str = "guest", password: str = "guest") -> commands.Connection.StartOk:
    return commands.Connection.StartOk(
        client_properties={"capabilities": {"authentication_failure_close": True}},
        mechanism="PLAIN",
        response=f"\0{user}\0{password}",
    )


def new_conn(**kw: Any) -> ServerConnection:
    return ServerConnection(authenticate=lambda u, p: (u, p) == ("guest", "guest"), **kw)


def opened(frame_max: int = 131072) -> ServerConnection:
    conn = new_conn()
    conn.receive_data(HEADER)
    conn.receive_data(fm(0, plain()))
    conn.receive_data(fm(0, commands.Connection.TuneOk(2047, frame_max, 60)))
    events = conn.receive_data(fm(0, commands.Connection.Open("/")))
    assert events == [ConnectionOpened("guest", "/", conn.client_properties)]
    conn.receive_data(fm(1, commands.Channel.Open()))
    conn.data_to_send()
    return conn


def test_handshake_offers_what_clients_need() -> None:
    conn = new_conn()
    assert conn.receive_data(HEADER) == []
    ((_ch, start),) = decode_all(conn.data_to_send())
    assert isinstance(start, commands.Connection.Start)
    assert start.mechanisms == "PLAIN AMQPLAIN"
    caps = start.server_properties["capabilities"]
    for cap in (
        "publisher_confirms",
        "basic.nack",
        "consumer_cancel_notify",
        "exchange_exchange_bindings",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
    ):
        assert caps[cap] is True
    conn.receive_data(fm(0, plain()))
    ((_, tune),) = decode_all(conn.data_to_send())
    assert isinstance(tune, commands.Connection.Tune)
    assert (tune.channel_max, tune.frame_max, tune.heartbeat) == (2047, 131072, 60)
    conn.receive_data(fm(0, commands.Connection.TuneOk(100, 8192, 10)))
    assert (conn.channel_max, conn.frame_max, conn.heartbeat) == (100, 8192, 10)
    events = conn.receive_data(fm(0, commands.Connection.Open("/")))
    assert isinstance(events[0], ConnectionOpened)
    assert conn.state is State.OPEN


def test_header_byte_by_byte_and_bad_header() -> None:
    conn = new_conn()
    for b in HEADER[:-1]:
        assert conn.receive_data(bytes([b])) == []
    conn.receive_data(HEADER[-1:])
    assert conn.state is State.AWAIT_START_OK
    bad = new_conn()
    events = bad.receive_data(b"AMQP\x00\x00\x09\x00")  # pamqp would accept this one
    assert isinstance(events[0], ConnectionTerminated)
    assert bad.data_to_send() == HEADER
    http = new_conn()
    events = http.receive_data(b"GET / HTTP/1.1\r\n")
    assert isinstance(events[0], ConnectionTerminated)
    assert http.data_to_send() == HEADER


def test_amqplain_and_refusal() -> None:
    raw = codec.encode_table({"LOGIN": "guest", "PASSWORD": "guest"})[4:]
    assert parse_credentials("AMQPLAIN", raw) == ("guest", "guest")
    assert parse_credentials("PLAIN", "\0a\0b") == ("a", "b")
    assert parse_credentials("PLAIN", "nonsense") is None
    conn = new_conn()
    conn.receive_data(HEADER)
    conn.data_to_send()
    events = conn.receive_data(fm(0, plain("guest", "wrong")))
    assert isinstance(events[0], ConnectionClosed)
    ((_, close),) = decode_all(conn.data_to_send())
    assert close.reply_code == 403
    assert close.reply_text.startswith("ACCESS_REFUSED - Login was refused using authentication")


def test_bad_vhost_is_530() -> None:
    conn = new_conn()
    conn.receive_data(HEADER + fm(0, plain()) + fm(0, commands.Connection.TuneOk(0, 0, 0)))
    conn.data_to_send()
    conn.receive_data(fm(0, commands.Connection.Open("nope")))
    ((_, close),) = decode_all(conn.data_to_send())
    assert close.reply_code == 530


def test_publish_assembly_split_bodies() -> None:
    conn = opened(frame_max=4096)
    props = commands.Basic.Properties(content_type="text/plain", headers={"a": 1})
    payload = b"x" * 10000
    data = fm(1, commands.Basic.Publish(exchange="", routing_key="q"))
    data += fm(1, header.ContentHeader(0, len(payload), props))
    for i in range(0, len(payload), 4088):
        data += fm(1, body.ContentBody(payload[i : i + 4088]))
    events: list[Any] = []
    for i in range(0, len(data), 333):  # arbitrary TCP segmentation
        events += conn.receive_data(data[i : i + 333])
    (msg,) = events
    assert isinstance(msg, MessageReceived)
    assert msg.body == payload
    assert msg.properties.content_type == "text/plain"
    assert msg.properties.headers == {"a": 1}
    # a zero-length body has no body frame
    events = conn.receive_data(
        fm(1, commands.Basic.Publish(routing_key="q")) + fm(1, header.ContentHeader(0, 0, props))
    )
    assert isinstance(events[0], MessageReceived) and events[0].body == b""


def test_send_content_splits_at_frame_max() -> None:
    conn = opened(frame_max=4096)
    conn.send_content(
        1,
        commands.Basic.Deliver("c", 1, False, "", "q"),
        codec.content_header_payload(commands.Basic.Properties(), 9000),
        b"y" * 9000,
    )
    frames = decode_all(conn.data_to_send())
    sizes = [len(f.value) for _, f in frames if isinstance(f, body.ContentBody)]
    assert sizes == [4088, 4088, 824]
    empty = opened()
    empty.send_content(
        1,
        commands.Basic.Deliver("c", 1, False, "", "q"),
        codec.content_header_payload(commands.Basic.Properties(), 0),
        b"",
    )
    assert len(decode_all(empty.data_to_send())) == 2


def expect_close(conn: ServerConnection, data: bytes, code: int) -> str:
    events = conn.receive_data(data)
    assert any(isinstance(e, ConnectionClosed) for e in events), events
    frames = decode_all(conn.data_to_send())
    close = frames[-1][1]
    assert isinstance(close, commands.Connection.Close)
    assert close.reply_code == code, close.reply_text
    assert conn.state is State.CLOSING
    return str(close.reply_text)


def test_frame_errors() -> None:
    conn = opened(frame_max=4096)
    text = expect_close(conn, fm(1, body.ContentBody(b"z" * 5000)), 501)
    assert text.startswith("FRAME_ERROR")
    conn = opened()
    good = fm(1, commands.Basic.Qos(prefetch_count=1))
    expect_close(conn, good[:-1] + b"\x00", 501)
    conn = opened()
    expect_close(conn, struct.pack(">BHI", 9, 1, 1) + b"x\xce", 501)
    conn = opened()
    expect_close(conn, struct.pack(">BHI", 1, 1, 4) + struct.pack(">HH", 99, 99) + b"\xce", 540)


def test_unexpected_frames() -> None:
    conn = opened()
    text = expect_close(conn, fm(1, header.ContentHeader(0, 1, commands.Basic.Properties())), 505)
    assert text == "UNEXPECTED_FRAME - expected method frame, got non method frame instead"
    conn = opened()
    expect_close(
        conn,
        fm(1, commands.Basic.Publish()) + fm(1, commands.Basic.Qos()),
        505,
    )
    conn = opened()
    text = expect_close(conn, fm(2, commands.Basic.Qos()), 504)
    assert text == "CHANNEL_ERROR - expected 'channel.open'"
    conn = opened()
    expect_close(conn, fm(1, commands.Channel.Open()), 504)
    conn = opened()
    expect_close(conn, fm(1, commands.Basic.Deliver("c", 1, False, "", "q")), 503)


def test_channel_close_both_ways() -> None:
    conn = opened()
    events = conn.receive_data(fm(1, commands.Channel.Close(200, "bye", 0, 0)))
    assert events == [ChannelClosed(1, True, 200, "bye")]
    assert conn.data_to_send() == b""  # the server answers after cleaning up
    conn.send_channel_close_ok(1)
    ((_, ok),) = decode_all(conn.data_to_send())
    assert isinstance(ok, commands.Channel.CloseOk)
    assert conn.receive_data(fm(1, commands.Channel.Open())) == [ChannelOpened(1)]
    # server-side close: frames are dropped until Close-Ok, then the number is free
    conn.data_to_send()
    conn.close_channel(1, 404, "NOT_FOUND - no queue 'x' in vhost '/'", 50, 10)
    assert conn.receive_data(fm(1, commands.Basic.Qos())) == []
    assert conn.receive_data(fm(1, commands.Channel.CloseOk())) == []
    assert conn.receive_data(fm(1, commands.Channel.Open())) == [ChannelOpened(1)]


def test_methods_pass_through() -> None:
    conn = opened()
    method = commands.Queue.Declare(queue="q", durable=True)
    (event,) = conn.receive_data(fm(1, method))
    assert isinstance(event, MethodReceived) and event.method.queue == "q"


def test_connection_close_by_peer_and_heartbeats() -> None:
    conn = opened()
    assert conn.heartbeat_tick()  # something was just sent: no heartbeat needed
    assert conn.data_to_send() == b""
    assert conn.heartbeat_tick()
    assert decode_all(conn.data_to_send())[0][1].name == "Heartbeat"
    for _ in range(2):
        assert conn.heartbeat_tick()
    assert not conn.heartbeat_tick()
    conn.receive_data(codec.HEARTBEAT_FRAME)
    assert conn.heartbeat_tick()
    events = conn.receive_data(fm(0, commands.Connection.Close(200, "bye", 0, 0)))
    assert events == [ConnectionClosed(True, 200, "bye")]
    conn.send_connection_close_ok()
    assert isinstance(decode_all(conn.data_to_send())[-1][1], commands.Connection.CloseOk)
    assert conn.state is State.CLOSED


def test_table_encoding_round_trips_through_pamqp() -> None:
    from pamqp import decode

    value = {
        "s": "text",
        "i": 5,
        "big": 2**40,
        "neg": -3,
        "f": 0.1,
        "b": True,
        "raw": b"\x00\xff",
        "none": None,
        "list": [1, "a", [2]],
        "table": {"x": 1},
        "when": datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC),
    }
    _, decoded = decode.field_table(codec.encode_table(value))
    decoded = codec.plain_value(decoded)
    assert decoded == value


def test_delivery_properties_and_x_death() -> None:
    d = Delivery(
        id="1",
        queue="q",
        body=b"b",
        headers={"h": "v"},
        properties=Properties(content_type="text/plain", type="t", timestamp=1700000000),
        priority=3,
        sent_at=0.0,
        receive_count=1,
        first_received_at=None,
        receipt="r",
        deaths=[
            Death(reason="rejected", queue="q", time=1700000000.5, exchange="", routing_keys=["q"])
        ],
    )
    payload = codec.properties_payload(d)
    hdr = header.ContentHeader()
    hdr.unmarshal(payload)
    props = hdr.properties
    assert props.message_type == "t" and props.priority == 3
    assert props.headers["h"] == "v"
    death = props.headers["x-death"][0]
    assert list(death) == ["count", "reason", "queue", "time", "exchange", "routing-keys"]
    assert props.headers["x-first-death-reason"] == "rejected"
    msg = codec.to_new_message(props, b"b")
    assert msg.properties.type == "t" and msg.properties.timestamp == 1700000000
    with pytest.raises(Exception, match="invalid expiration"):
        codec.to_new_message(commands.Basic.Properties(expiration="soon"), b"")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_fuzz_frames_parse_or_close(garbage: bytes, cut: int) -> None:
    """Any bytes after the handshake either parse into events or close the connection
    with an AMQP error code; nothing else escapes."""
    conn = opened()
    events: list[Any] = []
    for i in range(0, len(garbage), cut):
        events += conn.receive_data(garbage[i : i + cut])
    out = decode_all(conn.data_to_send()) if conn.state is State.CLOSING else []
    if conn.state is State.CLOSING:
        assert isinstance(out[-1][1], commands.Connection.Close)
        assert out[-1][1].reply_code in (501, 502, 503, 504, 505, 530, 540)
    for event in events:
        assert isinstance(
            event,
            MethodReceived | MessageReceived | ChannelClosed | ChannelOpened | ConnectionClosed,
        )


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(
        [
            commands.Basic.Qos(prefetch_count=5),
            commands.Queue.Declare(queue="q"),
            commands.Basic.Ack(delivery_tag=3),
        ]
    ),
    st.integers(min_value=0, max_value=40),
    st.binary(min_size=1, max_size=4),
)
def test_fuzz_mutated_methods(method: Frame, where: int, junk: bytes) -> None:
    conn = opened()
    data = bytearray(fm(1, method))
    where = min(where, len(data) - 1)
    data[where : where + len(junk)] = junk
    conn.receive_data(bytes(data))
    assert conn.state in (State.OPEN, State.CLOSING)
