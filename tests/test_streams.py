"""The stream engine and the Python streams API (real files, no mocks)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("kafka")

import conveyor
from conveyor.errors import InvalidName
from conveyor.streams import (
    CorruptRecords,
    OffsetOutOfRange,
    StreamEngine,
    check_topic_name,
)
from conveyor.streams.records import build_batch


def batch(n: int, start: int = 0, ts: int | None = None) -> bytes:
    return build_batch([(None, b"v%d" % (start + i), [], ts) for i in range(n)])


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "x" * 250, ".hidden", "a b"])
def test_topic_names_cannot_escape(bad: str) -> None:
    with pytest.raises(InvalidName):
        check_topic_name(bad)


async def test_append_read_index_and_reopen(tmp_path: Path) -> None:
    eng = await StreamEngine.open(tmp_path, "fsync")
    await eng.create_topic("t", 1, {"segment.bytes": 4096})
    for i in range(100):
        assert await eng.append("t", 0, batch(3, 3 * i)) == 3 * i
    seg_dir = tmp_path / "t" / "0"
    assert len(list(seg_dir.glob("*.log"))) >= 3
    assert list(seg_dir.glob("*.index")) and list(seg_dir.glob("*.timeindex"))
    # a fetch inside a batch returns the whole batch
    data = eng.read("t", 0, 151, 1)
    recs = eng.decode("t", 0, data, 0)
    assert [r.offset for r in recs] == [150, 151, 152]
    with pytest.raises(OffsetOutOfRange):
        eng.read("t", 0, 301)
    assert eng.read("t", 0, 300) == b""
    with pytest.raises(CorruptRecords):
        await eng.append("t", 0, b"\x00" * 70)
    bad = bytearray(batch(1))
    bad[-1] ^= 0xFF
    with pytest.raises(CorruptRecords):
        await eng.append("t", 0, bytes(bad))
    await eng.close()
    eng = await StreamEngine.open(tmp_path, "fsync")
    assert eng.offsets("t", 0).high_watermark == 300
    assert [r.value for r in eng.decode("t", 0, eng.read("t", 0, 299), 299)] == [b"v299"]
    await eng.close()


async def test_torn_tail_is_cut_at_open(tmp_path: Path) -> None:
    eng = await StreamEngine.open(tmp_path, "os")
    await eng.create_topic("t")
    await eng.append("t", 0, batch(5))
    await eng.close()
    log = next((tmp_path / "t" / "0").glob("*.log"))
    with log.open("ab") as f:
        f.write(batch(5)[:40])  # a crash in the middle of a write
    eng = await StreamEngine.open(tmp_path, "os")
    assert eng.offsets("t", 0).high_watermark == 5
    assert await eng.append("t", 0, batch(1)) == 5
    await eng.close()


async def test_time_index_and_retention(tmp_path: Path) -> None:
    eng = await StreamEngine.open(tmp_path, "none", retention_interval=3600)
    await eng.create_topic(
        "t", 1, {"segment.bytes": 2048, "retention.ms": 60_000, "retention.bytes": -1}
    )
    now = int(time.time() * 1000)
    for i in range(60):
        await eng.append("t", 0, batch(2, 2 * i, ts=now - 600_000 + i * 1000))
    assert eng.offset_for_time("t", 0, now - 600_000 + 30_500) == (62, now - 600_000 + 31_000)
    assert eng.offset_for_time("t", 0, now) is None
    deleted = eng.enforce_retention(now)
    assert deleted > 0
    start = eng.offsets("t", 0).log_start
    assert start > 0
    with pytest.raises(OffsetOutOfRange):
        eng.read("t", 0, 0)
    # by size
    await eng.create_topic("s", 1, {"segment.bytes": 2048, "retention.bytes": 4096})
    for i in range(100):
        await eng.append("s", 0, batch(2, 2 * i))
    eng.enforce_retention()
    parts = eng.topics["s"].partitions[0]
    assert parts.size - parts.active.size < 4096 + 2048
    await eng.close()


async def test_idempotent_retry_returns_the_original_offset(tmp_path: Path) -> None:
    from kafka.record.default_records import DefaultRecordBatchBuilder

    def idem(seq: int) -> bytes:
        b = DefaultRecordBatchBuilder(2, 0, False, 7, 0, seq, 1 << 20)
        b.append(0, timestamp=1, key=None, value=b"x", headers=[])
        return bytes(b.build())

    eng = await StreamEngine.open(tmp_path, "os")
    await eng.create_topic("t")
    assert await eng.append("t", 0, idem(0)) == 0
    assert await eng.append("t", 0, idem(1)) == 1
    assert await eng.append("t", 0, idem(1)) == 1  # a retry: not written twice
    assert eng.offsets("t", 0).high_watermark == 2
    from conveyor.streams import ProducerFenced

    with pytest.raises(ProducerFenced):
        await eng.append("t", 0, idem(5))
    await eng.close()


def test_python_api_produce_read_group(tmp_path: Path) -> None:
    with conveyor.connect(str(tmp_path / "data")) as mq:
        orders = mq.stream("orders", partitions=2)
        p, off = orders.produce(b"first", key="k1", headers={"h": "1"})
        assert off == 0
        orders.produce_batch([{"value": f"o{i}", "key": f"k{i}"} for i in range(20)])
        total = sum(orders.offsets(i).high_watermark for i in range(2))
        assert total == 21
        recs = orders.read(0, partition=p)
        assert recs[0].value == b"first" and recs[0].headers == [("h", b"1")]
        seen = []
        with orders.consumer("billing") as c:
            assert sorted(c.assignment) == [0, 1]
            while len(seen) < 21:
                got = c.poll(wait=1.0)
                assert got
                seen.extend(got)
            c.commit()
        assert len(seen) == 21
    with conveyor.connect(str(tmp_path / "data")) as mq:  # committed offsets persist
        orders = mq.stream("orders")
        with orders.consumer("billing") as c:
            assert c.poll(wait=0.2) == []
        orders.produce("late", partition=0)
        with orders.consumer("billing") as c:
            assert [r.value for r in c.poll(wait=1.0)] == [b"late"]


def test_http_stream_routes(tmp_path: Path) -> None:
    from serverproc import ServerProcess

    with ServerProcess(tmp_path, amqp=False, kafka=False) as srv:
        base = srv.http_url + "/v1/streams"
        assert httpx.put(base + "/events", json={"partitions": 2}).status_code == 201
        r = httpx.post(
            base + "/events/records",
            json={"records": [{"value": "a", "partition": 1}, {"value": "b", "partition": 1}]},
        )
        assert r.json()["offsets"] == [{"partition": 1, "offset": 0}, {"partition": 1, "offset": 1}]
        got = httpx.get(base + "/events/partitions/1/records", params={"offset": 1}).json()
        assert [x["value"] for x in got["records"]] == ["b"] and got["next_offset"] == 2
        httpx.post(base + "/events/groups/g/offsets", json={"offsets": {"1": 2}})
        assert httpx.get(base + "/events/groups/g/offsets").json()["offsets"]["1"] == 2
        assert httpx.get(base + "/nope").status_code == 404
        assert httpx.put(base + "/..bad", json={}).status_code == 400
        assert httpx.delete(base + "/events").status_code == 200
        assert not os.path.exists(srv.data_dir / "streams" / "events")
