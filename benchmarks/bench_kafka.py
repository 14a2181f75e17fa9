"""Kafka throughput: kafka-python and aiokafka against conveyor, with each client's own
ceiling measured in the same run.

    python benchmarks/bench_kafka.py [--records 100000] [--durability fsync]

100-byte values, no keys, one partition. conveyor runs in its own process
(StreamEngine + KafkaServer on uvloop, data in a temporary directory), so client
and server do not share a GIL.

* produce: records/s from the first send until every record is acknowledged
  (acks=all, i.e. durable at the chosen durability).
* consume: records/s reading them all back from offset 0.
* ceiling: the client library doing the same record work with no network: building
  the same RecordBatches with its own batch builder (produce) and iterating the records
  of the batches conveyor served with its own record reader (consume).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VALUE = b"x" * 100
BATCH_BYTES = 64 * 1024
SERVER = """
import asyncio, sys
import uvloop
from conveyor.streams import StreamEngine
from conveyor.server.kafka import KafkaServer

async def main():
    engine = await StreamEngine.open(sys.argv[1], sys.argv[2])
    server = KafkaServer(engine)
    port = await server.start("127.0.0.1", 0)
    print(port, flush=True)
    await asyncio.Event().wait()

uvloop.run(main())
"""


def start_conveyor(data: str, durability: str) -> tuple[subprocess.Popen[str], int]:
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, PYTHONPATH=str(src))
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, data, durability],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


# -- kafka-python ---------------------------------------------------------------------


def kp_produce(boot: str, topic: str, n: int) -> float:
    from kafka import KafkaProducer

    p = KafkaProducer(
        bootstrap_servers=[boot], acks="all", linger_ms=5, batch_size=BATCH_BYTES,
        max_in_flight_requests_per_connection=5,
    )  # fmt: skip
    p.send(topic, b"warm").get(timeout=30)
    t = time.perf_counter()
    for _ in range(n):
        p.send(topic, VALUE)
    p.flush()
    dt = time.perf_counter() - t
    p.close()
    return n / dt


def kp_consume(boot: str, topic: str, n: int) -> float:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=[boot], fetch_max_bytes=8 << 20)
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek(tp, 1)
    got = 0
    t = time.perf_counter()
    while got < n:
        for recs in c.poll(timeout_ms=1000, max_records=10000).values():
            got += len(recs)
    dt = time.perf_counter() - t
    c.close()
    return n / dt


def kp_ceiling(n: int, served: list[bytes]) -> tuple[float, float]:
    from kafka.record.default_records import DefaultRecordBatchBuilder
    from kafka.record.memory_records import MemoryRecords

    t = time.perf_counter()
    done = 0
    while done < n:
        b = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, BATCH_BYTES)
        i = 0
        now = int(time.time() * 1000)
        while done < n and b.append(i, timestamp=now, key=None, value=VALUE, headers=[]):
            i += 1
            done += 1
        b.build()
    produce = n / (time.perf_counter() - t)
    t = time.perf_counter()
    count = 0
    for data in served:
        mem = MemoryRecords(data)
        while (batch := mem.next_batch()) is not None:
            for r in batch:
                _ = r.value
                count += 1
    consume = count / (time.perf_counter() - t)
    return produce, consume


# -- aiokafka ---------------------------------------------------------------------------


async def ak_produce(boot: str, topic: str, n: int) -> float:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(
        bootstrap_servers=boot, acks="all", linger_ms=5, max_batch_size=BATCH_BYTES
    )
    await p.start()
    await p.send_and_wait(topic, b"warm")
    t = time.perf_counter()
    futs = []
    for _ in range(n):
        futs.append(await p.send(topic, VALUE))
    await asyncio.gather(*futs)
    dt = time.perf_counter() - t
    await p.stop()
    return n / dt


async def ak_consume(boot: str, topic: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=boot, fetch_max_bytes=8 << 20)
    await c.start()
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek(tp, 1)
    got = 0
    t = time.perf_counter()
    while got < n:
        for recs in (await c.getmany(timeout_ms=1000, max_records=10000)).values():
            got += len(recs)
    dt = time.perf_counter() - t
    await c.stop()
    return n / dt


def ak_ceiling(n: int, served: list[bytes]) -> tuple[float, float]:
    from aiokafka.record.default_records import DefaultRecordBatchBuilder
    from aiokafka.record.memory_records import MemoryRecords

    t = time.perf_counter()
    done = 0
    while done < n:
        b = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, BATCH_BYTES)
        i = 0
        now = int(time.time() * 1000)
        while done < n and b.append(i, timestamp=now, key=None, value=VALUE, headers=[]):
            i += 1
            done += 1
        b.build()
    produce = n / (time.perf_counter() - t)
    t = time.perf_counter()
    count = 0
    for data in served:
        mem = MemoryRecords(data)
        while (batch := mem.next_batch()) is not None:
            for r in batch:
                _ = r.value
                count += 1
    consume = count / (time.perf_counter() - t)
    return produce, consume


def served_batches(data_dir: str, topic: str) -> list[bytes]:
    """The bytes conveyor serves for the topic (its log segments, read whole)."""
    files = sorted((Path(data_dir) / topic / "0").glob("*.log"))
    return [f.read_bytes() for f in files]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--durability", default="fsync", choices=["fsync", "os", "none"])
    args = ap.parse_args()
    n = args.records
    rows = []
    with tempfile.TemporaryDirectory() as data:
        proc, port = start_conveyor(data, args.durability)
        boot = f"127.0.0.1:{port}"
        try:
            kp_p = kp_produce(boot, "kp", n)
            kp_c = kp_consume(boot, "kp", n)
            kp_cp, kp_cc = kp_ceiling(n, served_batches(data, "kp"))
            ak_p = asyncio.run(ak_produce(boot, "ak", n))
            ak_c = asyncio.run(ak_consume(boot, "ak", n))
            ak_cp, ak_cc = ak_ceiling(n, served_batches(data, "ak"))
        finally:
            proc.terminate()
            proc.wait()
    rows.append(("kafka-python", "produce", kp_p, kp_cp))
    rows.append(("kafka-python", "consume", kp_c, kp_cc))
    rows.append(("aiokafka", "produce", ak_p, ak_cp))
    rows.append(("aiokafka", "consume", ak_c, ak_cc))
    print(f"{n} records of 100 bytes, durability {args.durability}, {os.cpu_count()} CPUs")
    print("| client | op | conveyor rec/s | client ceiling rec/s | ratio |")
    print("|---|---|---|---|---|")
    for client, op, got, ceil in rows:
        print(f"| {client} | {op} | {got:,.0f} | {ceil:,.0f} | {got / ceil:.0%} |")


if __name__ == "__main__":
    main()
