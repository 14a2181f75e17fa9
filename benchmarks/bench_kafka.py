"""Kafka throughput: kafka-python and aiokafka against conveyor, with each client's own
ceilings measured in the same run.

    python benchmarks/bench_kafka.py [--records 100000] [--durability fsync]

100-byte values, no keys, one partition. conveyor runs in its own process
(StreamEngine + KafkaServer on uvloop, data in a temporary directory), so client
and server do not share a GIL.

* produce: records/s from the first send until every record is acknowledged
  (acks=all, i.e. durable at the chosen durability).
* consume: records/s reading them all back from offset 1 (after the warm-up record).
* codec ceiling: the client library doing the same record work with no network:
  building the same RecordBatches with its own batch builder (produce) and iterating
  the records of the batches conveyor served with its own record reader (consume).
* full-path ceiling: the same client code as against conveyor (KafkaProducer.send /
  consumer poll, aiokafka send / getmany) against a fake broker that stores nothing:
  a small asyncio server (its own process, uvloop, like conveyor) using the same
  ``conveyor.protocols.kafka`` codec, answering Produce with made-up offsets and
  Fetch from the batches conveyor served, held in memory (``--fake-broker``).
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
from typing import Any

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


def _env() -> dict[str, str]:
    src = Path(__file__).resolve().parents[1] / "src"
    return dict(os.environ, PYTHONPATH=str(src))


def start_conveyor(data: str, durability: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, data, durability],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def start_fake(logs: list[str]) -> tuple[subprocess.Popen[str], int]:
    """The fake broker in its own process, serving Fetch from these log files."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--fake-broker", *logs],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


# -- the fake broker (the full-path ceiling) -------------------------------------------


def fake_broker(logs: list[str]) -> None:
    """A Kafka broker that keeps nothing: Produce is answered at once with offsets
    counted per partition; Fetch is answered from ``logs`` (record batches with their
    offsets, as conveyor stored them), sliced at batch boundaries, for any topic."""
    import bisect

    import uvloop
    from kafka.protocol.consumer import FetchResponse, ListOffsetsResponse
    from kafka.protocol.metadata import MetadataResponse
    from kafka.protocol.producer import InitProducerIdResponse, ProduceResponse

    from conveyor.protocols.kafka import (
        FrameReader,
        UnsupportedRequest,
        api_versions_response,
        decode_request,
        encode_response,
    )
    from conveyor.streams.batch import walk

    blob = b"".join(Path(f).read_bytes() for f in logs)
    starts: list[int] = []  # base offset of each batch
    positions: list[int] = []
    end_offset = 0
    for pos, h in walk(blob):
        starts.append(h.base_offset)
        positions.append(pos)
        end_offset = h.base_offset + h.last_offset_delta + 1
    positions.append(len(blob))
    produced: dict[tuple[str, int], int] = {}

    def fetch_slice(offset: int, max_bytes: int) -> bytes:
        i = max(0, bisect.bisect_right(starts, offset) - 1)
        if offset >= end_offset:
            return b""
        j = bisect.bisect_right(positions, positions[i] + max_bytes) - 1
        j = max(j, i + 1)
        return blob[positions[i] : positions[j]]

    def answer(req: Any, host: str, port: int) -> Any:
        b = req.body
        if req.api_key == 0:
            out = []
            for td in b.topic_data:
                prs = []
                for pd in td.partition_data:
                    key = (td.name, pd.index)
                    base = produced.get(key, 0)
                    n = 0
                    for _, h in walk(pd.records or b""):
                        n += h.last_offset_delta + 1
                    produced[key] = base + n
                    prs.append(
                        ProduceResponse.TopicProduceResponse.PartitionProduceResponse(
                            index=pd.index, error_code=0, base_offset=base,
                            log_append_time_ms=-1, log_start_offset=0, record_errors=[],
                            error_message=None,
                        )
                    )  # fmt: skip
                out.append(
                    ProduceResponse.TopicProduceResponse(name=td.name, partition_responses=prs)
                )
            return None if b.acks == 0 else ProduceResponse(responses=out, throttle_time_ms=0)
        if req.api_key == 1:
            ft = FetchResponse.FetchableTopicResponse
            limit = b.max_bytes
            topics = []
            for t in b.topics:
                parts = [
                    ft.PartitionData(
                        partition_index=p.partition, error_code=0, high_watermark=end_offset,
                        last_stable_offset=end_offset, log_start_offset=0,
                        aborted_transactions=None, preferred_read_replica=-1,
                        records=fetch_slice(p.fetch_offset, min(p.partition_max_bytes, limit)),
                    )
                    for p in t.partitions
                ]  # fmt: skip
                topics.append(ft(topic=t.topic, partitions=parts))
            return FetchResponse(throttle_time_ms=0, error_code=0, session_id=0, responses=topics)
        if req.api_key == 2:
            lt = ListOffsetsResponse.ListOffsetsTopicResponse
            return ListOffsetsResponse(
                throttle_time_ms=0,
                topics=[
                    lt(name=t.name, partitions=[
                        lt.ListOffsetsPartitionResponse(
                            partition_index=p.partition_index, error_code=0, timestamp=-1,
                            offset=end_offset if p.timestamp == -1 else 0, leader_epoch=0,
                        )
                        for p in t.partitions
                    ])
                    for t in b.topics
                ],
            )  # fmt: skip
        if req.api_key == 3:
            mt = MetadataResponse.MetadataResponseTopic
            names = [t.name for t in b.topics or []]
            return MetadataResponse(
                throttle_time_ms=0,
                brokers=[MetadataResponse.MetadataResponseBroker(
                    node_id=0, host=host, port=port, rack=None)],
                cluster_id="fake", controller_id=0,
                topics=[
                    mt(error_code=0, name=n, is_internal=False, partitions=[
                        mt.MetadataResponsePartition(
                            error_code=0, partition_index=0, leader_id=0, leader_epoch=0,
                            replica_nodes=[0], isr_nodes=[0], offline_replicas=[],
                        )
                    ], authorized_operations=None)
                    for n in names
                ],
                authorized_operations=None,
            )  # fmt: skip
        if req.api_key == 22:
            return InitProducerIdResponse(
                throttle_time_ms=0, error_code=0, producer_id=1, producer_epoch=0
            )
        raise ValueError(f"the fake broker does not answer api key {req.api_key}")

    class Conn(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.reader = FrameReader()
            self.host, self.port = transport.get_extra_info("sockname")[:2]

        def data_received(self, data: bytes) -> None:
            for frame in self.reader.feed(data):
                try:
                    req = decode_request(frame)
                except UnsupportedRequest as exc:  # ApiVersions v3+: answer v0, client retries
                    self.t.write(api_versions_response(exc.correlation_id, 0, error=True))
                    continue
                if req.api_key == 18:
                    self.t.write(api_versions_response(req.correlation_id, req.api_version))
                    continue
                resp = answer(req, self.host, self.port)
                if resp is not None:
                    self.t.write(encode_response(req, resp))

    async def serve_fake() -> None:
        server = await asyncio.get_running_loop().create_server(Conn, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    uvloop.run(serve_fake())


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
    if len(sys.argv) > 1 and sys.argv[1] == "--fake-broker":
        fake_broker(sys.argv[2:])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--durability", default="fsync", choices=["fsync", "os", "none"])
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is kept")
    args = ap.parse_args()
    n = args.records
    rows = []
    best: dict[str, float] = {}

    def keep(key: str, value: float) -> None:
        best[key] = max(best.get(key, 0.0), value)

    with tempfile.TemporaryDirectory() as data:
        proc, port = start_conveyor(data, args.durability)
        boot = f"127.0.0.1:{port}"
        try:
            for r in range(args.repeat):
                keep("kp_p", kp_produce(boot, f"kp{r}", n))
                keep("kp_c", kp_consume(boot, f"kp{r}", n))
                keep("ak_p", asyncio.run(ak_produce(boot, f"ak{r}", n)))
                keep("ak_c", asyncio.run(ak_consume(boot, f"ak{r}", n)))
            for _ in range(args.repeat):
                kp_cp, kp_cc = kp_ceiling(n, served_batches(data, "kp0"))
                ak_cp, ak_cc = ak_ceiling(n, served_batches(data, "ak0"))
                keep("kp_cp", kp_cp)
                keep("kp_cc", kp_cc)
                keep("ak_cp", ak_cp)
                keep("ak_cc", ak_cc)
        finally:
            proc.terminate()
            proc.wait()
        for client in ("kp", "ak"):
            logs = [str(f) for f in sorted((Path(data) / f"{client}0" / "0").glob("*.log"))]
            fake, fport = start_fake(logs)
            fboot = f"127.0.0.1:{fport}"
            try:
                for r in range(args.repeat):
                    if client == "kp":
                        keep("kp_fp", kp_produce(fboot, f"kp{r}", n))
                        keep("kp_fc", kp_consume(fboot, f"kp{r}", n))
                    else:
                        keep("ak_fp", asyncio.run(ak_produce(fboot, f"ak{r}", n)))
                        keep("ak_fc", asyncio.run(ak_consume(fboot, f"ak{r}", n)))
            finally:
                fake.terminate()
                fake.wait()
    for client, name in (("kp", "kafka-python"), ("ak", "aiokafka")):
        rows.append(
            (name, "produce", best[f"{client}_p"], best[f"{client}_fp"], best[f"{client}_cp"])
        )
        rows.append(
            (name, "consume", best[f"{client}_c"], best[f"{client}_fc"], best[f"{client}_cc"])
        )
    print(
        f"{n} records of 100 bytes, durability {args.durability}, {os.cpu_count()} CPUs, "
        f"best of {args.repeat}"
    )
    print(
        "| client | op | conveyor rec/s | full-path ceiling rec/s | ratio "
        "| codec ceiling rec/s | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for client, op, got, full, ceil in rows:
        print(
            f"| {client} | {op} | {got:,.0f} | {full:,.0f} | {got / full:.0%} "
            f"| {ceil:,.0f} | {got / ceil:.0%} |"
        )


if __name__ == "__main__":
    main()
