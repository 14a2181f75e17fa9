"""Bridges (stream -> queue, exchange -> stream) and remote streams, against a real
``conveyor serve`` with real clients: kafka-python, pika and the native client."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serverproc import ServerProcess

pytest.importorskip("kafka")

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

import conveyor
from conveyor.errors import NotFound
from conveyor.streams import GroupError


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("bridges"), durability="os") as srv:
        yield srv


def boot(srv: ServerProcess) -> list[str]:
    return [f"127.0.0.1:{srv.kafka_port}"]


def receive_all(q: Any, n: int, timeout: float = 10.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for m in q.receive(100, wait=0.5):
            got.append(m)
            m.ack()
    return got


def kafka_read(srv: ServerProcess, topic: str, n: int, timeout: float = 10.0) -> list[Any]:
    c = KafkaConsumer(bootstrap_servers=boot(srv), auto_offset_reset="earliest")
    c.assign([TopicPartition(topic, 0)])
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for recs in c.poll(timeout_ms=200).values():
            got.extend(recs)
    c.close()
    return got


def test_kafka_produce_reaches_native_consumer_through_feed(server: ServerProcess) -> None:
    topic, queue = uid("orders"), uid("jobs")
    with conveyor.connect(server.http_url) as mq:
        stream = mq.stream(topic, partitions=3)
        q = mq.queue(queue)
        producer = KafkaProducer(bootstrap_servers=boot(server), linger_ms=5)

        def send(i: int) -> None:
            key = b"user-%d" % (i % 4)
            producer.send(topic, b"order %d" % i, key=key, headers=[("n", b"%d" % i)])

        for i in range(30):
            send(i)
        producer.flush()
        stream.feed(q, key="group_id")
        for i in range(30, 40):
            send(i)
        producer.close()
        got = receive_all(q, 40)
        assert sorted(m.body for m in got) == sorted(b"order %d" % i for i in range(40))
        for m in got:
            i = int(m.body.split()[1])
            assert m.group_id == f"user-{i % 4}"
            assert m.headers["n"] == str(i)
            assert m.headers["x-stream"] == topic
        # per key (one partition each), messages arrive in offset order
        by_key: dict[str, list[int]] = {}
        for m in got:
            by_key.setdefault(m.group_id, []).append(m.headers["x-stream-offset"])
        assert all(v == sorted(v) for v in by_key.values())
        [b] = stream.bridges()
        assert b["kind"] == "feed" and b["queue"] == queue and b["lag"] == 0
        stream.unfeed(q)
        assert stream.bridges() == []
        stream.produce(b"after")
        assert q.receive(1, wait=0.3) == []


def test_amqp_publish_reaches_kafka_consumer_through_binding(server: ServerProcess) -> None:
    pika = pytest.importorskip("pika")
    topic, exchange = uid("events"), uid("ev")
    with conveyor.connect(server.http_url) as mq:
        x = mq.exchange(exchange, "topic")
        mq.stream(topic)
        x.bind_stream(topic, "order.*")
        conn = pika.BlockingConnection(pika.URLParameters(server.amqp_url or ""))
        ch = conn.channel()
        ch.confirm_delivery()
        for i in range(20):
            ch.basic_publish(
                exchange,
                "order.new" if i % 2 == 0 else "user.new",
                b"event %d" % i,
                pika.BasicProperties(content_type="text/plain", headers={"i": i}),
            )
        conn.close()
        x.publish(b"native", "order.paid")  # the native client's publish too
        recs = kafka_read(server, topic, 11)
        assert [r.value for r in recs] == [b"event %d" % i for i in range(0, 20, 2)] + [b"native"]
        first = dict(recs[0].headers)
        assert first["x-routing-key"] == b"order.new"
        assert first["x-exchange"] == exchange.encode()
        assert first["x-content-type"] == b"text/plain"
        assert first["i"] == b"0"
        assert [b["routing_key"] for b in mq.stream(topic).bridges()] == ["order.*"]
        x.unbind_stream(topic, "order.*")
        assert x.publish(b"lost", "order.new") == 0
        assert not any(q.name.startswith("__bridge.") for q in mq.queues("__bridge."))


def test_bridges_survive_restart_and_sigkill(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, durability="os") as srv:
        with conveyor.connect(srv.http_url) as mq:
            stream = mq.stream("orders")
            q = mq.queue("jobs")
            stream.feed(q, start="end")
            x = mq.exchange("ev", "fanout")
            mq.stream("audit")
            x.bind_stream("audit")
            stream.produce(b"r0")
            assert [m.body for m in receive_all(q, 1)] == [b"r0"]
        srv.restart()
        with conveyor.connect(srv.http_url) as mq:
            q = mq.queue("jobs")
            assert [b["kind"] for b in mq.stream("orders").bridges()] == ["feed"]
            mq.stream("orders").produce(b"r1")
            assert [m.body for m in receive_all(q, 1)] == [b"r1"]
            mq.exchange("ev", "fanout").publish(b"a1")
            assert [r.value for r in mq.stream("audit").read(0, wait=5)] == [b"a1"]
            # many records in flight, then kill -9: every record reaches the queue
            p = KafkaProducer(bootstrap_servers=boot(srv), linger_ms=5, acks="all")
            for i in range(3000):
                p.send("orders", b"k%d" % i)
            p.flush()
            p.close()
        srv.stop(signal.SIGKILL)
        srv.start()
        with conveyor.connect(srv.http_url) as mq:
            q = mq.queue("jobs")
            bodies = [m.body for m in receive_all(q, 3000, timeout=20)]
            assert set(bodies) == {b"k%d" % i for i in range(3000)}
            assert len(bodies) == 3000  # repeats after the crash were dropped by dedup id
            lag = mq.stream("orders").bridges()[0]["lag"]
            assert lag == 0


def test_deleting_ends_bridges(server: ServerProcess) -> None:
    with conveyor.connect(server.http_url) as mq:
        topic, queue = uid("s"), uid("q")
        s = mq.stream(topic)
        q = mq.queue(queue)
        s.feed(q)
        x = mq.exchange(uid("x"), "fanout")
        x.bind_stream(s)
        q.delete()
        deadline = time.monotonic() + 5
        while any(b["kind"] == "feed" for b in s.bridges()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [b["kind"] for b in s.bridges()] == ["bind"]
        s.delete()
        deadline = time.monotonic() + 5
        while mq.queues("__bridge." + topic) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mq.queues("__bridge." + topic) == []
        with pytest.raises(NotFound):
            mq.stream(topic).unfeed(queue)


def test_remote_stream_api(server: ServerProcess) -> None:
    topic = uid("remote")
    with conveyor.connect(server.http_url) as mq:
        s = mq.stream(topic, partitions=2, retention_ms=3600_000)
        assert s.partitions == 2
        t0 = int(time.time() * 1000)
        out = s.produce_batch(
            [{"value": b"\x00\xffbin", "key": "a", "headers": {"h": b"\x01"}, "partition": 0}]
            + [{"value": f"v{i}", "partition": 1, "timestamp": t0 + i} for i in range(5)]
        )
        assert out == [(0, 0)] + [(1, i) for i in range(5)]
        [r] = s.read(0, partition=0)
        assert (r.key, r.value, r.headers) == (b"a", b"\x00\xffbin", [("h", b"\x01")])
        assert [r.value for r in s.read(2, partition=1, max_records=2)] == [b"v2", b"v3"]
        assert s.offsets(1).high_watermark == 5
        assert s.offset_for_time(t0, partition=1) == 0
        assert s.offset_for_time(t0 + 10**9, partition=1) is None
        t = time.monotonic()
        assert s.read(5, partition=1, wait=0.3) == []
        assert time.monotonic() - t >= 0.25
        # a group of two remote consumers splits the partitions; commits are kept
        c1 = s.consumer("g")
        c2 = s.consumer("g")
        import threading

        th = threading.Thread(target=c2.__enter__)
        th.start()
        c1.__enter__()
        th.join()
        for _ in range(50):  # rejoins settle
            c1.poll(wait=0.05)
            c2.poll(wait=0.05)
            if sorted(c1.assignment + c2.assignment) == [0, 1] and c1.assignment:
                break
        assert sorted(c1.assignment + c2.assignment) == [0, 1]
        c1.close()
        c2.close()
        with s.consumer("g2") as c:
            got = []
            while len(got) < 6:
                got += c.poll(wait=1.0)
            assert sorted(r.value for r in got) == [b"\x00\xffbin"] + [b"v%d" % i for i in range(5)]
            c.commit()
        with s.consumer("g2") as c:
            s.produce(b"later", partition=0)
            assert [r.value for r in c.poll(wait=2.0)] == [b"later"]
        with pytest.raises(GroupError):
            c.commit()  # left the group
        s.delete()
        with pytest.raises(NotFound):
            s.offsets(0)
