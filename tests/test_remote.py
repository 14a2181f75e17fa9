"""The remote client (``conveyor.connect("http://...")``) against a real server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import conveyor
from conveyor import errors
from conveyor.client.remote import RemoteBroker
from conveyor.model import NewMessage
from serverproc import ServerProcess


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("remote"), amqp=False) as s:
        yield s


@pytest.fixture
def mq(srv: ServerProcess) -> Iterator[conveyor.Connection]:
    with conveyor.connect(srv.http_url) as c:
        yield c


def _name(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


def test_sync_client_same_api_as_embedded(mq: conveyor.Connection) -> None:
    q = mq.queue(_name("orders"), visibility_timeout=30)
    msg_id = q.send(b"Process order #12345", headers={"k": b"\x00v"}, priority=2)
    assert q.send_batch(["a", b"\xff\xfe", {"body": "c", "priority": 1}])
    assert q.stats().ready == 4
    assert [d.body for d in q.peek(1)] == [b"Process order #12345"]
    (m,) = q.receive(max_messages=1, wait=1)
    assert m.id == msg_id and m.body == b"Process order #12345"
    assert m.headers == {"k": b"\x00v"}
    m.ack()
    with pytest.raises(errors.ReceiptInvalid):
        m.ack()
    rest = q.receive(max_messages=10)
    assert sorted(x.body for x in rest) == [b"a", b"c", b"\xff\xfe"]
    assert q.ack_batch(rest).ok == 3
    assert q.purge() == 0
    assert q.delete() == 0
    with pytest.raises(errors.QueueNotFound):
        q.stats()


def test_exchanges_through_the_remote_client(mq: conveyor.Connection) -> None:
    x = mq.exchange(_name("events"), "topic")
    a = mq.queue(_name("a"))
    x.bind(a, "order.#")
    assert x.publish("hello", "order.created") == 1
    assert x.publish("nobody", "payment.created") == 0
    assert x.publish_batch([("1", "order.a"), ("2", "x")]) == [1, 0]
    assert [b.destination for b in x.bindings()] == [a.name]
    assert sorted(m.body for m in a.receive(10)) == [b"1", b"hello"]
    x.unbind(a, "order.#")
    assert x.publish("gone", "order.created") == 0
    x.delete()
    assert x.name not in [e.name for e in mq.exchanges()]


def test_long_poll_wakes_on_send_from_another_client(srv: ServerProcess) -> None:
    name = _name("lp")
    with conveyor.connect(srv.http_url) as a, conveyor.connect(srv.http_url) as b:
        qa, qb = a.queue(name), b.queue(name)
        sender = threading.Timer(0.3, lambda: qb.send("wake"))
        sender.start()
        started = time.monotonic()
        got = qa.receive(wait=20)
        sender.join()  # before the connections close under it
        assert [m.body for m in got] == [b"wake"]
        assert time.monotonic() - started < 5


async def test_async_client(srv: ServerProcess) -> None:
    async with await conveyor.connect_async(srv.http_url) as mq:
        q = await mq.queue(_name("async"))
        await q.send("x")
        (m,) = await q.receive(wait=1)
        assert m.body == b"x"
        await m.nack(delay=0)
        (m,) = await q.receive()
        assert m.receive_count == 2
        await m.ack()


async def test_consume_acks_retries_and_extends(srv: ServerProcess) -> None:
    async with await conveyor.connect_async(srv.http_url) as mq:
        q = await mq.queue(_name("consume"), visibility_timeout=1)
        await q.send_batch(["ok", "fail-once", "slow"])
        seen: list[tuple[bytes, int]] = []
        stop = asyncio.Event()

        async def handler(m: conveyor.AsyncMessage) -> None:
            seen.append((m.body, m.receive_count))
            if m.body == b"fail-once" and m.receive_count == 1:
                raise RuntimeError("boom")
            if m.body == b"slow":
                await asyncio.sleep(1.6)  # past the 1 s lease: the helper must extend it
            if len(seen) >= 4:
                stop.set()

        await asyncio.wait_for(
            q.consume(handler, concurrency=3, retry_delay=0.1, stop=stop, wait=0.5), 20
        )
        stats = await q.stats()
        assert stats.ready == stats.in_flight == stats.delayed == 0
        assert sorted(seen) == [(b"fail-once", 1), (b"fail-once", 2), (b"ok", 1), (b"slow", 1)]


def test_errors_are_the_engine_classes(mq: conveyor.Connection) -> None:
    with pytest.raises(errors.QueueNotFound):
        mq.get_queue(_name("missing"))
    with pytest.raises(errors.InvalidName):
        mq.queue("bad/name")
    name = _name("conflict")
    mq.queue(name, visibility_timeout=5)
    with pytest.raises(errors.QueueExists):
        mq.queue(name, visibility_timeout=6)
    with pytest.raises(errors.InvalidArgument):
        mq.queue(name).receive(max_messages=0)
    with pytest.raises(errors.MessageTooLarge):
        mq.queue(name).send(b"x" * (2 * 1024 * 1024))


def test_token(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, token="t0k", amqp=False) as s:
        with conveyor.connect(s.http_url, token="t0k") as mq:
            mq.queue("q").send("x")
        with pytest.raises(errors.Unauthorized), conveyor.connect(s.http_url) as mq:
            mq.queue("q")
        with pytest.raises(errors.Unauthorized), conveyor.connect(s.http_url, token="no") as mq:
            mq.queue("q")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_server_is_closed_error() -> None:
    b = RemoteBroker(f"http://127.0.0.1:{_free_port()}", retries=1)
    with pytest.raises(errors.Unavailable, match="cannot reach"):
        await b.list_queues()
    await b.close()


async def test_calls_are_retried_until_the_server_is_back(tmp_path: Path) -> None:
    port = _free_port()
    b = RemoteBroker(f"http://127.0.0.1:{port}", retries=8)
    srv = ServerProcess(tmp_path, ["--http-port", str(port)], amqp=False)
    try:
        starter = threading.Timer(0.2, srv.start)
        starter.start()
        # a send was never delivered while the port was closed, so it is retried too
        await b.declare_queue("q")
        assert (await b.send("q", NewMessage(body=b"x"))).id
        starter.join()
        # the server goes away and comes back on the same port: the pooled keep-alive
        # connection is dead, an idempotent call reconnects
        srv.stop()
        restarter = threading.Timer(0.2, srv.start)
        restarter.start()
        assert (await b.stats("q")).ready == 1
        # start() returns once /healthz answers, which may be after the call above
        # succeeded: let it finish before stopping the server under it.
        restarter.join()
    finally:
        await b.close()
        srv.stop()


async def test_shutdown_answers_long_poll_with_nothing(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, amqp=False) as s:
        b = RemoteBroker(s.http_url)
        await b.declare_queue("q")
        poll = asyncio.create_task(b.receive("q", wait=20))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await asyncio.to_thread(s.stop)
        assert await poll == []
        assert time.monotonic() - started < 5
        await b.close()
