"""AMQP virtual hosts as isolated namespaces, against a real ``conveyor serve``
(pika and aio-pika): same names in two vhosts stay apart, per-user vhost permissions,
``amq.*`` routing and dead-lettering stay inside their vhost, ``/`` cannot reach the
others' objects. One differential case against the local RabbitMQ (unknown vhost),
and one more that runs only if the RabbitMQ there has a vhost guest may use."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pika
import pika.exceptions
import pytest
from pamqp import commands, frame

from serverproc import ServerProcess

pytestmark = pytest.mark.timeout(60)

CONFIG = """
vhosts = ["/", "billing", "shop"]

[users]
guest = "guest"
alice = "alice-pw"
bob = "bob-pw"

[permissions]
alice = ["billing"]
bob = ["/", "shop"]
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("vhosts")
    config = tmp / "conveyor.toml"
    config.write_text(CONFIG)
    with ServerProcess(tmp, ["--config", str(config)], kafka=False) as s:
        yield s


def connect(
    port: int, vhost: str = "/", user: str = "guest", password: str = "guest"
) -> pika.BlockingConnection:
    return pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", port, vhost, pika.PlainCredentials(user, password))
    )


def channel_error(fn: Callable[[], Any]) -> tuple[int, str]:
    try:
        fn()
    except pika.exceptions.ChannelClosedByBroker as exc:
        return exc.reply_code, exc.reply_text
    raise AssertionError("no channel error")


def open_refusal(port: int, vhost: str, user: str, password: str) -> tuple[int, str, int, int]:
    """Handshake by hand and return the Connection.Close that answers Connection.Open."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        buf = b""

        def read() -> Any:
            nonlocal buf
            while True:
                try:
                    used, _ch, obj = frame.unmarshal(buf)
                except Exception:
                    data = sock.recv(65536)
                    assert data, "connection closed without Connection.Close"
                    buf += data
                    continue
                buf = buf[used:]
                return obj

        assert isinstance(read(), commands.Connection.Start)
        sock.sendall(
            frame.marshal(
                commands.Connection.StartOk(
                    client_properties={"capabilities": {"authentication_failure_close": True}},
                    mechanism="PLAIN",
                    response=f"\0{user}\0{password}",
                ),
                0,
            )
        )
        tune = read()
        assert isinstance(tune, commands.Connection.Tune)
        sock.sendall(frame.marshal(commands.Connection.TuneOk(tune.channel_max, 131072, 0), 0))
        sock.sendall(frame.marshal(commands.Connection.Open(vhost), 0))
        close = read()
        assert isinstance(close, commands.Connection.Close), close
        return close.reply_code, close.reply_text, close.class_id, close.method_id


def wait_get(ch: Any, queue: str) -> Any:
    deadline = time.monotonic() + 5
    while True:
        got = ch.basic_get(queue, auto_ack=True)
        if got[0] is not None or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def test_same_queue_name_in_two_vhosts_is_two_queues(srv: ServerProcess) -> None:
    port = srv.amqp_port
    assert port is not None
    conns = {vh: connect(port, vh) for vh in ("/", "billing", "shop")}
    try:
        for vh, conn in conns.items():
            ch = conn.channel()
            ok = ch.queue_declare("orders")
            assert ok.method.queue == "orders"
            for i in range({"/": 1, "billing": 2, "shop": 3}[vh]):
                ch.basic_publish("", "orders", f"{vh}-{i}".encode())
        for vh, conn in conns.items():
            ch = conn.channel()
            ok = ch.queue_declare("orders", passive=True)
            assert ok.method.message_count == {"/": 1, "billing": 2, "shop": 3}[vh]
            method, _props, body = ch.basic_get("orders", auto_ack=True)
            assert body == f"{vh}-0".encode()
            assert (method.exchange, method.routing_key) == ("", "orders")
        # "/" is the engine's own namespace: the native API sees "orders" as is and the
        # other vhosts' queues under their prefix.
        listed = httpx.get(f"{srv.http_url}/v1/queues").raise_for_status().json()
        names = {q["name"] for q in listed["queues"]}
        assert {"orders", "@billing@orders", "@shop@orders"} <= names
        # Server-named queues and exclusive ownership are per vhost too.
        b = conns["billing"].channel()
        s = conns["shop"].channel()
        gen = b.queue_declare("", exclusive=True).method.queue
        assert gen.startswith("amq.gen-")
        b.queue_declare("mine", exclusive=True)
        s.queue_declare("mine", exclusive=True)  # another vhost: not locked
        other = connect(port, "billing")
        try:
            code, text = channel_error(lambda: other.channel().queue_declare("mine"))
            assert code == 405
            assert "locked queue 'mine' in vhost 'billing'" in text
        finally:
            other.close()
        code, text = channel_error(lambda: b.queue_declare("nope", passive=True))
        assert (code, text) == (404, "NOT_FOUND - no queue 'nope' in vhost 'billing'")
    finally:
        for conn in conns.values():
            conn.close()


def test_vhost_permissions_at_connection_open(srv: ServerProcess) -> None:
    port = srv.amqp_port
    assert port is not None
    refused = "NOT_ALLOWED - access to vhost 'shop' refused for user 'alice'"
    assert open_refusal(port, "shop", "alice", "alice-pw") == (530, refused, 10, 40)
    assert open_refusal(port, "/", "alice", "alice-pw")[:2] == (
        530,
        "NOT_ALLOWED - access to vhost '/' refused for user 'alice'",
    )
    assert open_refusal(port, "nope", "guest", "guest")[:2] == (
        530,
        "NOT_ALLOWED - vhost nope not found",
    )
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError, match="refused for user"):
        connect(port, "billing", "bob", "bob-pw")
    connect(port, "billing", "alice", "alice-pw").close()
    connect(port, "shop", "bob", "bob-pw").close()


def test_user_of_one_vhost_cannot_see_purge_or_delete_anothers_queues(
    srv: ServerProcess,
) -> None:
    port = srv.amqp_port
    assert port is not None
    bob = connect(port, "shop", "bob", "bob-pw")
    alice = connect(port, "billing", "alice", "alice-pw")
    try:
        bch = bob.channel()
        bch.queue_declare("shop-only")
        bch.confirm_delivery()
        bch.basic_publish("", "shop-only", b"secret")
        for op in (
            lambda ch: ch.queue_declare("shop-only", passive=True),
            lambda ch: ch.queue_purge("shop-only"),
            lambda ch: ch.basic_get("shop-only"),
            lambda ch: ch.basic_consume("shop-only", lambda *a: None),
            lambda ch: ch.queue_bind("shop-only", "amq.topic", "#"),
        ):
            ch = alice.channel()
            code, text = channel_error(lambda ch=ch, op=op: op(ch))
            assert (code, text) == (404, "NOT_FOUND - no queue 'shop-only' in vhost 'billing'")
        ach = alice.channel()
        assert ach.queue_delete("shop-only").method.message_count == 0  # a missing queue
        # Publishing to the name reaches nothing in billing (mandatory: returned).
        ach.confirm_delivery()
        with pytest.raises(pika.exceptions.UnroutableError):
            ach.basic_publish("", "shop-only", b"x", mandatory=True)
        assert bch.queue_declare("shop-only", passive=True).method.message_count == 1
    finally:
        alice.close()
        bob.close()


def test_root_vhost_cannot_name_other_vhosts_objects(srv: ServerProcess) -> None:
    port = srv.amqp_port
    assert port is not None
    billing = connect(port, "billing")
    root = connect(port, "/")
    try:
        bch = billing.channel()
        bch.queue_declare("ledger")
        bch.confirm_delivery()
        bch.basic_publish("", "ledger", b"entry")
        internal = "@billing@ledger"
        code, text = channel_error(lambda: root.channel().queue_declare(internal, passive=True))
        assert (code, text) == (404, f"NOT_FOUND - no queue '{internal}' in vhost '/'")
        code, text = channel_error(lambda: root.channel().queue_declare(internal))
        assert (code, text) == (
            403,
            f"ACCESS_REFUSED - queue name '{internal}' contains reserved prefix '@'",
        )
        assert channel_error(lambda: root.channel().queue_purge(internal))[0] == 404
        assert channel_error(lambda: root.channel().basic_get(internal))[0] == 404
        ch = root.channel()
        assert ch.queue_delete(internal).method.message_count == 0
        ch.confirm_delivery()
        with pytest.raises(pika.exceptions.UnroutableError):
            ch.basic_publish("", internal, b"intruder", mandatory=True)
        pub = root.channel()
        code, text = channel_error(
            lambda: (
                pub.basic_publish("@billing@amq.topic", "x", b"intruder")
                or pub.queue_declare("", exclusive=True)
            )
        )
        assert (code, text) == (404, "NOT_FOUND - no exchange '@billing@amq.topic' in vhost '/'")
        code, text = channel_error(
            lambda: root.channel().queue_declare(
                "dlx-intruder", arguments={"x-dead-letter-exchange": "@billing@amq.direct"}
            )
        )
        assert code == 403
        assert "access to exchange '@billing@amq.direct' in vhost '/' refused" in text
        code, _ = channel_error(
            lambda: root.channel().queue_declare(
                "dlk-intruder",
                arguments={
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": internal,
                },
            )
        )
        assert code == 403
        ok = bch.queue_declare("ledger", passive=True)
        assert ok.method.message_count == 1
        method, _props, body = bch.basic_get("ledger", auto_ack=True)
        assert body == b"entry"
        assert (method.exchange, method.routing_key) == ("", "ledger")
    finally:
        root.close()
        billing.close()


def test_amq_topic_routing_stays_inside_the_vhost(srv: ServerProcess) -> None:
    port = srv.amqp_port
    assert port is not None
    conns = {vh: connect(port, vh) for vh in ("/", "billing", "shop")}
    try:
        chans = {vh: c.channel() for vh, c in conns.items()}
        for ch in chans.values():
            ch.queue_declare("topic-q")
            ch.queue_bind("topic-q", "amq.topic", "events.#")
            ch.queue_purge("topic-q")
        chans["billing"].confirm_delivery()
        chans["billing"].basic_publish("amq.topic", "events.paid", b"billing-event")
        method, _props, body = wait_get(chans["billing"], "topic-q")
        assert body == b"billing-event"
        assert (method.exchange, method.routing_key) == ("amq.topic", "events.paid")
        for vh in ("/", "shop"):
            assert chans[vh].queue_declare("topic-q", passive=True).method.message_count == 0
        # Exchanges declared in one vhost do not exist in another.
        chans["shop"].exchange_declare("shop-x", "fanout")
        code, text = channel_error(
            lambda: conns["billing"].channel().exchange_declare("shop-x", passive=True)
        )
        assert (code, text) == (404, "NOT_FOUND - no exchange 'shop-x' in vhost 'billing'")
        assert (
            channel_error(lambda: conns["/"].channel().exchange_declare("shop-x", passive=True))[0]
            == 404
        )
    finally:
        for c in conns.values():
            c.close()


def test_dead_lettering_stays_inside_the_vhost(srv: ServerProcess) -> None:
    port = srv.amqp_port
    assert port is not None
    conns = {vh: connect(port, vh) for vh in ("/", "billing")}
    try:
        root = conns["/"].channel()
        ch = conns["billing"].channel()
        for c in (root, ch):
            for q in ("dead-x", "dead-key", "dead-orig"):
                c.queue_declare(q)
                c.queue_purge(q)
        ch.exchange_declare("dlx", "fanout")
        ch.queue_bind("dead-x", "dlx")
        ch.queue_declare("work-x", arguments={"x-dead-letter-exchange": "dlx"})
        ch.queue_declare(
            "work-key",
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dead-key"},
        )
        # No x-dead-letter-routing-key: the message keeps its own routing key, which
        # through the vhost's default exchange names a queue of the same vhost.
        ch.queue_declare("work-orig", arguments={"x-dead-letter-exchange": ""})
        ch.queue_bind("work-orig", "amq.direct", "dead-orig")
        ch.confirm_delivery()
        ch.basic_publish("", "work-x", b"one")
        ch.basic_publish("", "work-key", b"two")
        ch.basic_publish("amq.direct", "dead-orig", b"three")
        for q in ("work-x", "work-key", "work-orig"):
            method, _p, _b = ch.basic_get(q)
            ch.basic_reject(method.delivery_tag, requeue=False)
        method, props, body = wait_get(ch, "dead-x")
        assert body == b"one"
        assert (method.exchange, method.routing_key) == ("dlx", "work-x")
        (death,) = props.headers["x-death"]
        assert death["queue"] == "work-x"
        assert death["exchange"] == ""
        assert death["routing-keys"] == ["work-x"]
        assert death["reason"] == "rejected"
        assert props.headers["x-first-death-queue"] == "work-x"
        assert props.headers["x-first-death-exchange"] == ""
        method, props, body = wait_get(ch, "dead-key")
        assert body == b"two"
        assert (method.exchange, method.routing_key) == ("", "dead-key")
        assert props.headers["x-death"][0]["queue"] == "work-key"
        method, props, body = wait_get(ch, "dead-orig")
        assert body == b"three"
        assert (method.exchange, method.routing_key) == ("", "dead-orig")
        (death,) = props.headers["x-death"]
        assert (death["queue"], death["exchange"], death["routing-keys"]) == (
            "work-orig",
            "amq.direct",
            ["dead-orig"],
        )
        for q in ("dead-x", "dead-key", "dead-orig"):
            assert root.queue_declare(q, passive=True).method.message_count == 0
    finally:
        for c in conns.values():
            c.close()


def test_aio_pika_in_a_vhost_with_returns(srv: ServerProcess) -> None:
    port = srv.amqp_port
    assert port is not None

    async def main() -> None:
        conn = await aio_pika.connect(f"amqp://alice:alice-pw@127.0.0.1:{port}/billing")
        async with conn:
            ch = await conn.channel()
            q = await ch.declare_queue("aio-q")
            assert q.name == "aio-q"
            await ch.default_exchange.publish(aio_pika.Message(b"hello"), routing_key="aio-q")
            msg = await q.get(timeout=5)
            assert msg.body == b"hello"
            assert (msg.exchange, msg.routing_key) == ("", "aio-q")
            await msg.ack()
            returned: list[Any] = []
            ch2 = await conn.channel(on_return_raises=False)
            ch2.return_callbacks.add(lambda _ch, m: returned.append(m))
            await ch2.default_exchange.publish(
                aio_pika.Message(b"lost"), routing_key="no-such-queue", mandatory=True
            )
            for _ in range(100):
                if returned:
                    break
                await asyncio.sleep(0.02)
            assert [(m.exchange, m.routing_key, m.body) for m in returned] == [
                ("", "no-such-queue", b"lost")
            ]

    asyncio.run(main())


# -- differential: the local RabbitMQ -------------------------------------------------


def _rabbit_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _rabbit_up(), reason="no RabbitMQ on 127.0.0.1:5672")
def test_differential_unknown_vhost(srv: ServerProcess) -> None:
    port = srv.amqp_port
    assert port is not None
    rabbit = open_refusal(5672, "conveyor-no-such-vhost", "guest", "guest")
    ours = open_refusal(port, "conveyor-no-such-vhost", "guest", "guest")
    assert ours == rabbit


def _isolation_scenario(port: int, vhost: str, tag: str) -> Any:
    conn = connect(port, vhost)
    other = connect(port, "/")
    try:
        ch = conn.channel()
        q = f"{tag}-iso"
        ch.queue_declare(q, auto_delete=False)
        ch.queue_purge(q)
        ch.queue_bind(q, "amq.topic", "k.#")
        ch.confirm_delivery()
        ch.basic_publish("amq.topic", "k.1", b"in-vhost")
        method, _p, body = wait_get(ch, q)
        seen = (method.exchange, method.routing_key, body)
        code, text = channel_error(lambda: other.channel().queue_declare(q, passive=True))
        ch.queue_delete(q)
        return seen, code, text.replace(tag, "<tag>")
    finally:
        other.close()
        conn.close()


@pytest.mark.skipif(not _rabbit_up(), reason="no RabbitMQ on 127.0.0.1:5672")
def test_differential_isolation_if_rabbitmq_has_the_vhost(srv: ServerProcess) -> None:
    vhost = "billing"
    try:
        connect(5672, vhost).close()
    except pika.exceptions.AMQPConnectionError:
        pytest.skip(f"vhost {vhost!r} does not exist (or is closed to guest) on the RabbitMQ")
    port = srv.amqp_port
    assert port is not None
    tag = f"diff{int(time.time() * 1000) % 100000}"
    assert _isolation_scenario(port, vhost, tag) == _isolation_scenario(5672, vhost, tag)


def test_config_rejects_bad_vhosts(tmp_path: Path) -> None:
    from conveyor.errors import InvalidArgument
    from conveyor.server.config import load_config

    assert load_config(env={"CONVEYOR_VHOSTS": "/, billing"}).vhosts == ("/", "billing")
    for bad in ("a/b", "x@y", "a" * 65):
        with pytest.raises(InvalidArgument, match="vhosts"):
            load_config(env={"CONVEYOR_VHOSTS": bad})
    path = tmp_path / "c.toml"
    path.write_text('[permissions]\nalice = ["billing"]\n')
    with pytest.raises(InvalidArgument, match="not in 'vhosts'"):
        load_config(env={}, config_file=path)
