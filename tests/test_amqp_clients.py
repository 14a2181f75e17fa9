"""Real AMQP client libraries against a real conveyor AMQP server (ephemeral port):
pika (BlockingConnection and SelectConnection), aio-pika, kombu over py-amqp; interop
with the engine API; a server-level fuzz check."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import aio_pika
import kombu
import pika
import pika.exceptions
import pytest
from pamqp import commands, frame

from amqp_support import RunningAmqp, amqp_server
from conveyor.model import NewMessage, Properties


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningAmqp]:
    with amqp_server(heartbeat=2) as running:
        yield running


def test_seed_example_blocking(srv: RunningAmqp) -> None:
    connection = pika.BlockingConnection(pika.ConnectionParameters("localhost", srv.port))
    channel = connection.channel()
    channel.queue_declare(queue="tasks")
    channel.basic_publish(exchange="", routing_key="tasks", body="Task data")
    got: list[bytes] = []

    def callback(ch: Any, method: Any, properties: Any, body: bytes) -> None:
        got.append(body)
        ch.basic_ack(delivery_tag=method.delivery_tag)
        ch.stop_consuming()

    channel.basic_consume(queue="tasks", on_message_callback=callback)
    channel.start_consuming()
    assert got == [b"Task data"]
    connection.close()


def test_pika_select_connection(srv: RunningAmqp) -> None:
    received: list[bytes] = []
    params = pika.ConnectionParameters("127.0.0.1", srv.port)

    def on_open(conn: Any) -> None:
        conn.channel(on_open_callback=on_channel)

    def on_channel(ch: Any) -> None:
        ch.confirm_delivery(lambda frame: None)
        ch.queue_declare("select-q", callback=lambda _: on_declared(ch))

    def on_declared(ch: Any) -> None:
        for i in range(50):
            ch.basic_publish("", "select-q", str(i).encode())
        ch.basic_qos(
            prefetch_count=10,
            callback=lambda _: ch.basic_consume("select-q", lambda c, m, p, b: on_message(c, m, b)),
        )

    def on_message(ch: Any, method: Any, body: bytes) -> None:
        received.append(body)
        ch.basic_ack(method.delivery_tag)
        if len(received) == 50:
            ch.connection.close()

    conn = pika.SelectConnection(
        params, on_open_callback=on_open, on_close_callback=lambda *a: conn.ioloop.stop()
    )
    timer = conn.ioloop.call_later(10, conn.ioloop.stop)
    conn.ioloop.start()
    conn.ioloop.remove_timeout(timer)
    assert received == [str(i).encode() for i in range(50)]


def test_large_bodies_split_and_joined(srv: RunningAmqp) -> None:
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", srv.port, frame_max=4096))
    ch = conn.channel()
    ch.queue_declare("big")
    body = random.randbytes(300_000)
    ch.basic_publish("", "big", body)
    _method, _, got = ch.basic_get("big", auto_ack=True)
    assert got == body
    ch.basic_publish("", "big", b"")
    assert ch.basic_get("big", auto_ack=True)[2] == b""
    conn.close()


def test_heartbeats_keep_idle_connection_alive(srv: RunningAmqp) -> None:
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", srv.port, heartbeat=2))
    ch = conn.channel()
    conn.sleep(3.5)  # pika answers heartbeats while sleeping
    ch.queue_declare("hb")
    conn.close()


def test_auth_refused_and_guest_only_from_loopback(srv: RunningAmqp) -> None:
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(
            pika.ConnectionParameters(
                "127.0.0.1", srv.port, credentials=pika.PlainCredentials("guest", "nope")
            )
        )
    assert not srv.server.authenticate("guest", "guest", loopback=False)
    assert srv.server.authenticate("guest", "guest", loopback=True)


def test_prefetch_limits_unacked(srv: RunningAmqp) -> None:
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", srv.port))
    ch = conn.channel()
    ch.queue_declare("prefetch")
    for i in range(20):
        ch.basic_publish("", "prefetch", str(i).encode())
    ch.basic_qos(prefetch_count=3)
    seen: list[Any] = []
    ch.basic_consume("prefetch", lambda c, m, p, b: seen.append(m))
    conn.process_data_events(0.5)
    assert len(seen) == 3  # nothing more until something is acked
    ch.basic_ack(seen[-1].delivery_tag, multiple=True)
    conn.process_data_events(0.5)
    assert len(seen) == 6
    conn.close()


def test_qos_update_reaches_running_consumer_only_for_kombu(srv: RunningAmqp) -> None:
    """RabbitMQ semantics for pika: a later Basic.Qos(global=false) does not change a
    running consumer. kombu, seeing a non-RabbitMQ server, means the spec's semantics
    (channel-wide, applies at once) and Celery relies on that for ETA tasks."""
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", srv.port))
    ch = conn.channel()
    ch.queue_declare("qos-pika")
    for i in range(10):
        ch.basic_publish("", "qos-pika", str(i).encode())
    ch.basic_qos(prefetch_count=1)
    seen: list[Any] = []
    ch.basic_consume("qos-pika", lambda c, m, p, b: seen.append(m))
    conn.process_data_events(0.3)
    ch.basic_qos(prefetch_count=3)
    conn.process_data_events(0.3)
    assert len(seen) == 1  # as RabbitMQ 3.x: the running consumer keeps its limit
    conn.close()

    with kombu.Connection(f"pyamqp://guest:guest@127.0.0.1:{srv.port}//") as kconn:
        queue = kombu.Queue("qos-kombu")
        producer = kconn.Producer()
        for i in range(10):
            producer.publish({"i": i}, routing_key="qos-kombu", declare=[queue])
        held: list[Any] = []
        with kconn.Consumer(
            queue, callbacks=[lambda body, m: held.append(m)], prefetch_count=1
        ) as consumer:
            with contextlib.suppress(socket.timeout):
                for _ in range(5):
                    kconn.drain_events(timeout=0.2)
            assert len(held) == 1
            consumer.qos(prefetch_count=3)  # what Celery does while it holds an ETA task
            with contextlib.suppress(socket.timeout):
                for _ in range(5):
                    kconn.drain_events(timeout=0.2)
            assert len(held) == 3
            for m in held:
                m.ack()


def test_declare_ok_consumer_count(srv: RunningAmqp) -> None:
    """Queue.DeclareOk.consumer_count: the engine's count, so AMQP consumers (whose
    own long polls are not counted again) and other front doors' long polls."""
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", srv.port))
    ch = conn.channel()
    assert ch.queue_declare("counted").method.consumer_count == 0
    tags = [ch.basic_consume("counted", lambda *a: None) for _ in range(2)]
    conn.process_data_events(0.2)
    assert ch.queue_declare("counted", passive=True).method.consumer_count == 2

    async def long_poll() -> Any:
        return await srv.broker.receive("counted", 1, wait=1.0)

    poll = asyncio.run_coroutine_threadsafe(long_poll(), srv.loop)
    conn.process_data_events(0.2)
    assert ch.queue_declare("counted", passive=True).method.consumer_count == 3
    assert poll.result(5) == []
    ch.basic_cancel(tags[0])
    assert ch.queue_declare("counted", passive=True).method.consumer_count == 1
    conn.close()


async def test_aio_pika_round_trip(srv: RunningAmqp) -> None:
    connection = await aio_pika.connect_robust(srv.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=100)
        exchange = await channel.declare_exchange("aio.topic", aio_pika.ExchangeType.TOPIC)
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(exchange, "orders.*")
        for i in range(200):
            await exchange.publish(
                aio_pika.Message(
                    str(i).encode(),
                    headers={"n": i},
                    priority=1,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    correlation_id=f"c{i}",
                ),
                routing_key="orders.new",
            )
        got: list[int] = []
        async with queue.iterator() as it:
            async for message in it:
                async with message.process():
                    assert message.correlation_id == f"c{int(message.body)}"
                    assert message.headers["n"] == int(message.body)
                    got.append(int(message.body))
                if len(got) == 200:
                    break
        assert got == list(range(200))
        # mandatory + unroutable: aio-pika raises DeliveryError from the Return
        with pytest.raises(aio_pika.exceptions.DeliveryError):
            await channel.default_exchange.publish(
                aio_pika.Message(b"x"), "nowhere", mandatory=True
            )


async def test_aio_pika_get_and_reject(srv: RunningAmqp) -> None:
    connection = await aio_pika.connect(srv.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("aio.get", arguments={"x-max-priority": 3})
        await channel.default_exchange.publish(aio_pika.Message(b"low", priority=0), "aio.get")
        await channel.default_exchange.publish(aio_pika.Message(b"high", priority=3), "aio.get")
        m = await queue.get(timeout=2)
        assert m is not None and m.body == b"high"
        await m.reject(requeue=True)
        m = await queue.get(timeout=2)
        assert m is not None and m.body == b"high" and m.redelivered
        await m.ack()
        assert (await queue.get(no_ack=True)).body == b"low"
        assert await queue.get(fail=False) is None
        await queue.delete()


def test_kombu_py_amqp(srv: RunningAmqp) -> None:
    exchange = kombu.Exchange("kombu.ex", type="direct")
    queue = kombu.Queue("kombu.q", exchange, routing_key="k", queue_arguments={"x-max-priority": 5})
    with kombu.Connection(f"pyamqp://guest:guest@127.0.0.1:{srv.port}//") as conn:
        producer = conn.Producer(serializer="json")
        for i in range(10):
            producer.publish(
                {"i": i},
                exchange=exchange,
                routing_key="k",
                declare=[queue],
                priority=i % 3,
                retry=True,
            )
        got: list[int] = []

        def on_message(body: Any, message: Any) -> None:
            got.append(body["i"])
            message.ack()

        with conn.Consumer(queue, callbacks=[on_message], prefetch_count=4):
            while len(got) < 10:
                conn.drain_events(timeout=5)
        assert sorted(got) == list(range(10))
        assert got[:4] == [2, 5, 8, 1] or got[0] in (2, 5, 8)  # priority 2 first
        simple = conn.SimpleQueue("kombu.simple")
        simple.put({"hello": "world"})
        msg = simple.get(timeout=5)
        assert msg.payload == {"hello": "world"}
        msg.ack()
        simple.close()


def test_interop_with_engine_api(srv: RunningAmqp) -> None:
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", srv.port))
    ch = conn.channel()
    ch.queue_declare("interop")
    ch.basic_publish(
        "",
        "interop",
        b"from-amqp",
        pika.BasicProperties(
            content_type="text/plain",
            correlation_id="c1",
            headers={"h": "v", "n": 3},
            priority=4,
            timestamp=1700000000,
            type="kind",
        ),
    )
    got = srv.call(srv.broker.receive("interop", 1, wait=2))
    assert got[0].body == b"from-amqp"
    assert got[0].headers == {"h": "v", "n": 3}
    assert got[0].properties.content_type == "text/plain"
    assert got[0].properties.correlation_id == "c1"
    assert got[0].properties.type == "kind" and got[0].properties.timestamp == 1700000000
    srv.call(srv.broker.ack("interop", got[0].receipt))
    srv.call(
        srv.broker.send(
            "interop",
            NewMessage(
                body=b"from-api",
                headers={"x": 1.5, "raw": b"\x00"},
                properties=Properties(reply_to="r", message_id="m1"),
            ),
        )
    )
    _method, props, body = ch.basic_get("interop", auto_ack=True)
    assert body == b"from-api"
    # 'd' (double) on the wire; pika itself decodes doubles as integers (pika/data.py)
    assert props.headers == {"x": 1, "raw": b"\x00"}
    assert props.reply_to == "r" and props.message_id == "m1"
    conn.close()


def _raw_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"AMQP\x00\x00\x09\x01")
    sock.recv(4096)  # Start
    sock.sendall(
        frame.marshal(
            commands.Connection.StartOk(
                client_properties={}, mechanism="PLAIN", response="\0guest\0guest"
            ),
            0,
        )
    )
    sock.recv(4096)  # Tune
    sock.sendall(frame.marshal(commands.Connection.TuneOk(2047, 131072, 0), 0))
    sock.sendall(frame.marshal(commands.Connection.Open("/"), 0))
    sock.recv(4096)  # OpenOk
    return sock


def _read_close(sock: socket.socket) -> int | None:
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    while len(data) >= 8:
        size = struct.unpack(">I", data[3:7])[0]
        used, _, obj = frame.unmarshal(data[: 8 + size])
        if isinstance(obj, commands.Connection.Close):
            return int(obj.reply_code)
        data = data[used:]
    return None


def test_fuzz_server_keeps_serving(srv: RunningAmqp) -> None:
    """Garbage after the handshake gets Connection.Close with a framing code (or is
    parsed); other connections are unaffected."""
    rng = random.Random(5)
    witness = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", srv.port, heartbeat=0))
    wch = witness.channel()
    codes = set()
    for _ in range(25):
        sock = _raw_connect(srv.port)
        sock.settimeout(0.2)
        sock.sendall(rng.randbytes(rng.randint(1, 200)))
        code = _read_close(sock)
        sock.close()
        if code is not None:
            codes.add(code)
            assert code in (501, 502, 503, 504, 505, 530, 540), code
    assert codes
    wch.queue_declare("still-alive")
    witness.close()
    bad = socket.create_connection(("127.0.0.1", srv.port), timeout=2)
    bad.sendall(b"HTTP/1.1 GET /\r\n")
    assert bad.recv(8) == b"AMQP\x00\x00\x09\x01"
    bad.close()


def test_many_connections_concurrently(srv: RunningAmqp) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", srv.port))
            ch = conn.channel()
            ch.confirm_delivery()
            ch.queue_declare(f"par{n}")
            for i in range(20):
                ch.basic_publish("", f"par{n}", str(i).encode())
            assert ch.queue_declare(f"par{n}", passive=True).method.message_count == 20
            conn.close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors


async def test_close_requeues_unacked(srv: RunningAmqp) -> None:
    connection = await aio_pika.connect(srv.url)
    channel = await connection.channel()
    queue = await channel.declare_queue("requeue-on-close")
    for i in range(5):
        await channel.default_exchange.publish(
            aio_pika.Message(str(i).encode()), "requeue-on-close"
        )
    await channel.set_qos(prefetch_count=5)
    got = []
    async with queue.iterator() as it:
        async for message in it:
            got.append(message)
            if len(got) == 5:
                break
    await connection.close()
    await asyncio.sleep(0.1)
    connection = await aio_pika.connect(srv.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("requeue-on-close", passive=True)
        again = []
        for _ in range(5):
            m = await queue.get(timeout=2)
            assert m is not None and m.redelivered
            again.append(m.body)
            await m.ack()
        assert again == [str(i).encode() for i in range(5)]
