"""kafka-python and aiokafka against a real ``conveyor serve`` (no mocks)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from serverproc import ServerProcess

kafka = pytest.importorskip("kafka")
aiokafka = pytest.importorskip("aiokafka")

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from kafka.admin import NewTopic  # noqa: E402

FAST = {"request_timeout_ms": 10000, "metadata_max_age_ms": 5000}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("kafka"), durability="os") as srv:
        yield srv


def boot(srv: ServerProcess) -> list[str]:
    return [f"127.0.0.1:{srv.kafka_port}"]


def name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create(srv: ServerProcess, topic: str, partitions: int, **config: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=boot(srv))
    try:
        admin.create_topics([NewTopic(topic, partitions, 1, topic_configs=config or {})])
    finally:
        admin.close()


def drain(consumer: KafkaConsumer, n: int, timeout: float = 10.0) -> list[object]:
    got: list[object] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for recs in consumer.poll(timeout_ms=200).values():
            got.extend(recs)
    return got


def test_seed_example(server: ServerProcess) -> None:
    topic = name("orders")
    producer = KafkaProducer(bootstrap_servers=boot(server))
    producer.send(topic, b"Order #12345")
    producer.flush()
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=boot(server),
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    values = []
    for message in consumer:
        values.append(message.value)
        break
    consumer.close()
    producer.close()
    assert values == [b"Order #12345"]


def test_keys_to_partitions_and_headers(server: ServerProcess) -> None:
    topic = name()
    create(server, topic, 3)
    producer = KafkaProducer(bootstrap_servers=boot(server), linger_ms=5)
    sent = {}
    for i in range(60):
        key = f"user-{i % 6}".encode()
        md = producer.send(topic, b"v%d" % i, key=key, headers=[("trace", b"%d" % i)]).get(
            timeout=10
        )
        sent.setdefault(key, set()).add(md.partition)
    producer.close()
    assert all(len(p) == 1 for p in sent.values())
    assert len({next(iter(p)) for p in sent.values()}) > 1
    consumer = KafkaConsumer(bootstrap_servers=boot(server), auto_offset_reset="earliest", **FAST)
    consumer.assign([TopicPartition(topic, p) for p in range(3)])
    recs = drain(consumer, 60)
    consumer.close()
    assert len(recs) == 60
    for r in recs:
        assert r.partition in sent[r.key]
        assert r.headers == [("trace", r.value[1:])]
    # per-partition order is send order
    by_part: dict[int, list[int]] = {}
    for r in recs:
        by_part.setdefault(r.partition, []).append(int(r.value[1:]))
    assert all(v == sorted(v) for v in by_part.values())


@pytest.mark.parametrize("codec", ["gzip", "lz4", "zstd", "snappy"])
def test_compression_passes_through(server: ServerProcess, codec: str) -> None:
    mod = {"gzip": "gzip", "lz4": "lz4", "zstd": "zstandard", "snappy": "snappy"}[codec]
    pytest.importorskip(mod)
    topic = name()
    producer = KafkaProducer(bootstrap_servers=boot(server), compression_type=codec, linger_ms=20)
    for i in range(200):
        producer.send(topic, b"compressible payload %05d " % i * 4)
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=boot(server), auto_offset_reset="earliest")
    recs = drain(consumer, 200)
    consumer.close()
    assert [r.value for r in recs] == [b"compressible payload %05d " % i * 4 for i in range(200)]


def test_aiokafka_produce_consume_headers_gzip(server: ServerProcess) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = name()

    async def main() -> list[tuple[bytes, list[tuple[str, bytes]]]]:
        producer = AIOKafkaProducer(
            bootstrap_servers=boot(server), compression_type="gzip", enable_idempotence=True
        )
        await producer.start()
        try:
            for i in range(50):
                await producer.send(topic, b"m%d" % i, headers=[("n", b"%d" % i)])
            await producer.flush()
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=boot(server), auto_offset_reset="earliest"
        )
        await consumer.start()
        out = []
        try:
            while len(out) < 50:
                batch = await consumer.getmany(timeout_ms=5000)
                assert batch, "no records within 5 s"
                for recs in batch.values():
                    out.extend((r.value, list(r.headers)) for r in recs)
        finally:
            await consumer.stop()
        return out

    got = asyncio.run(main())
    assert got == [(b"m%d" % i, [("n", b"%d" % i)]) for i in range(50)]


def test_consumer_group_split_and_rebalance(server: ServerProcess) -> None:
    topic = name()
    group = name("g")
    create(server, topic, 4)
    opts = dict(
        bootstrap_servers=boot(server),
        group_id=group,
        auto_offset_reset="earliest",
        heartbeat_interval_ms=200,
        session_timeout_ms=6000,
        **FAST,
    )
    stop = {1: threading.Event(), 2: threading.Event()}
    consumers: dict[int, KafkaConsumer] = {}

    def member(i: int) -> None:  # each consumer polls in its own thread, as in real use
        c = consumers[i] = KafkaConsumer(topic, **opts)
        while not stop[i].is_set():
            c.poll(timeout_ms=100)
        c.close()

    threads = {i: threading.Thread(target=member, args=(i,)) for i in (1, 2)}
    threads[1].start()
    time.sleep(0.5)
    threads[2].start()

    def parts(i: int) -> set[int]:
        c = consumers.get(i)
        return {tp.partition for tp in c.assignment()} if c is not None else set()

    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (len(parts(1)) == 2 and len(parts(2)) == 2):
            time.sleep(0.05)
        assert parts(1) | parts(2) == {0, 1, 2, 3} and not parts(1) & parts(2)
        stop[2].set()
        threads[2].join()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and parts(1) != {0, 1, 2, 3}:
            time.sleep(0.05)
        assert parts(1) == {0, 1, 2, 3}
    finally:
        stop[1].set()
        stop[2].set()
        for t in threads.values():
            t.join()


def test_committed_offsets_survive_restart_and_seek_replay(tmp_path: Path) -> None:
    topic, group = name(), name("g")
    with ServerProcess(tmp_path, durability="fsync") as srv:
        producer = KafkaProducer(bootstrap_servers=boot(srv))
        stamps = []
        for i in range(20):
            md = producer.send(topic, b"r%d" % i).get(timeout=10)
            stamps.append(md.timestamp)
            time.sleep(0.002)
        producer.close()
        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=boot(srv),
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **FAST,
        )
        got = drain(consumer, 12)[:12]
        tp = TopicPartition(topic, 0)
        from kafka.structs import OffsetAndMetadata

        consumer.commit({tp: OffsetAndMetadata(12, "", -1)})
        consumer.close()
        assert [r.value for r in got] == [b"r%d" % i for i in range(12)]

        srv.restart()
        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=boot(srv),
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **FAST,
        )
        rest = drain(consumer, 8)
        assert [r.value for r in rest] == [b"r%d" % i for i in range(12, 20)]
        assert consumer.committed(tp) == 12
        consumer.close()

        # replay: from the start, from an offset, from a time
        c = KafkaConsumer(bootstrap_servers=boot(srv), **FAST)
        c.assign([tp])
        c.seek_to_beginning(tp)
        assert [r.offset for r in drain(c, 20)] == list(range(20))
        c.seek(tp, 15)
        assert [r.offset for r in drain(c, 5)] == [15, 16, 17, 18, 19]
        found = c.offsets_for_times({tp: stamps[7]})[tp]
        assert found is not None and found.offset == 7
        assert c.beginning_offsets([tp])[tp] == 0
        assert c.end_offsets([tp])[tp] == 20
        c.close()


def test_sigkill_keeps_confirmed_records(tmp_path: Path) -> None:
    topic = name()
    srv = ServerProcess(tmp_path, durability="fsync").start()
    try:
        producer = KafkaProducer(bootstrap_servers=boot(srv), acks="all", linger_ms=2)
        futures = [producer.send(topic, b"k%d" % i) for i in range(300)]
        producer.flush()
        confirmed = [f.get(timeout=10).offset for f in futures]
        producer.close()
        srv.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        srv.proc.wait()  # type: ignore[union-attr]
        srv.start()
        c = KafkaConsumer(topic, bootstrap_servers=boot(srv), auto_offset_reset="earliest")
        recs = drain(c, 300)
        c.close()
        assert sorted(confirmed) == list(range(300))
        assert [r.value for r in recs] == [b"k%d" % i for i in range(300)]
    finally:
        srv.stop()
        srv.kill()


def test_retention_via_kafka(server: ServerProcess) -> None:
    topic = name()
    create(server, topic, 1, **{"segment.bytes": "2048", "retention.bytes": "4096"})
    producer = KafkaProducer(bootstrap_servers=boot(server))
    for i in range(200):
        producer.send(topic, b"x" * 100 + b"%d" % i)
        if i % 10 == 9:
            producer.flush()
    producer.close()
    c = KafkaConsumer(bootstrap_servers=boot(server), **FAST)
    tp = TopicPartition(topic, 0)
    deadline = time.monotonic() + 10
    start = 0
    while time.monotonic() < deadline:
        start = c.beginning_offsets([tp])[tp]
        if start > 0:
            break
        time.sleep(0.2)
    assert start > 0, "retention deleted nothing"
    c.assign([tp])
    c.seek_to_beginning(tp)
    recs = drain(c, 200 - start)
    assert recs[0].offset == start and recs[-1].offset == 199
    c.close()


def test_admin_groups_and_topics(server: ServerProcess) -> None:
    topic, group = name(), name("g")
    create(server, topic, 2)
    c = KafkaConsumer(
        topic,
        bootstrap_servers=boot(server),
        group_id=group,
        heartbeat_interval_ms=200,
        auto_offset_reset="earliest",
        **FAST,
    )
    deadline = time.monotonic() + 10
    while not c.assignment() and time.monotonic() < deadline:
        c.poll(timeout_ms=100)
    admin = KafkaAdminClient(bootstrap_servers=boot(server))
    try:
        listed = admin.list_groups()
        assert group in str(listed)
        desc = admin.describe_groups([group])
        assert "Stable" in str(desc)
        c.close()
        assert topic in admin.list_topics()
        admin.delete_topics([topic])
        assert topic not in admin.list_topics()
    finally:
        admin.close()
