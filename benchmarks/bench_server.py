"""conveyor serve against NATS JetStream and RabbitMQ, side by side in one run.

    python benchmarks/bench_server.py [--messages 50000] [--targets conveyor,nats,rabbitmq]
                                      [--latency-seconds 10] [--rate 1000]

Throughput: one producer process and one consumer process running at the same time,
100-byte bodies, batches of 100, everything durable:
  conveyor  ``conveyor serve --durability fsync`` (this checkout), the Python client over
            HTTP: ``send_batch`` of 100; ``receive(100, wait=1)`` + ``ack_batch``
  nats      JetStream, file storage: 100 ``js.publish`` awaited together (each acked by
            the server); pull consumer ``fetch(100)`` + ``ack`` per message
  rabbitmq  aio-pika, durable queue, persistent messages, publisher confirms: 100
            publishes awaited together; consumer prefetch 200, manual ``ack`` each
msg/s = messages / (last one consumed - first one sent).

Latency (conveyor): a steady ``--rate`` msg/s of single sends, each one not waiting for
the previous; a consumer waiting in a long poll; publish-to-deliver = receive time minus
the time just before the send call (one machine, one clock). p50 / p99 / max.

Writes benchmarks/results/server.md and benchmarks/results/server.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
RESULTS = ROOT / "benchmarks" / "results"
BODY = b"x" * 100
BATCH = 100
NATS_URL = "nats://127.0.0.1:4222"
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"

sys.path.insert(0, str(SRC))

from conveyor_serve import start_conveyor  # noqa: E402  (beside this script)


def _run(coro_fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro_fn(*args))
    except ImportError:
        return asyncio.run(coro_fn(*args))


# -- the conveyor server ---------------------------------------------------------------


class Server:
    def __init__(self, durability: str) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="conveyor-bench-")
        self.proc, ready = start_conveyor(self.tmp.name, durability)
        self.url = f"http://127.0.0.1:{ready['http_port']}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.tmp.cleanup()


# -- workloads: each side runs in its own process and reports wall-clock times ------------


#: Batches a conveyor producer keeps in flight, and receive+ack loops a consumer runs.
#: NATS publishes its 100 messages concurrently and acks without waiting; this is the
#: same pipelining for conveyor's batch API, and what lets group commit share one fsync
#: between requests.
INFLIGHT = 4


async def conveyor_produce(url: str, queue: str, n: int) -> tuple[float, float]:
    import conveyor

    async with await conveyor.connect_async(url) as mq:
        q = await mq.queue(queue)
        batches = n // BATCH
        start = time.time()

        async def lane(count: int) -> None:
            for _ in range(count):
                await q.send_batch([BODY] * BATCH)

        share = [
            batches // INFLIGHT + (1 if i < batches % INFLIGHT else 0) for i in range(INFLIGHT)
        ]
        await asyncio.gather(*(lane(c) for c in share))
        return start, time.time()


async def conveyor_consume(url: str, queue: str, n: int) -> tuple[float, float]:
    import conveyor

    async with await conveyor.connect_async(url) as mq:
        q = await mq.queue(queue)
        got, first = 0, 0.0

        async def lane() -> None:
            nonlocal got, first
            while got < n:
                msgs = await q.receive(BATCH, wait=0.2)
                if msgs:
                    first = first or time.time()
                    got += len(msgs)
                    await q.ack_batch(msgs)

        await asyncio.gather(*(lane() for _ in range(INFLIGHT)))
        return first, time.time()


async def nats_setup() -> None:
    import nats
    from nats.js.api import StorageType, StreamConfig

    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    with contextlib.suppress(Exception):  # absent on the first run
        await js.delete_stream("BENCH")
    await js.add_stream(StreamConfig(name="BENCH", subjects=["bench.>"], storage=StorageType.FILE))
    await nc.close()


async def nats_produce(_: str, __: str, n: int) -> tuple[float, float]:
    import nats

    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    start = time.time()
    for _ in range(n // BATCH):
        await asyncio.gather(*(js.publish("bench.x", BODY) for _ in range(BATCH)))
    end = time.time()
    await nc.close()
    return start, end


async def nats_consume(_: str, __: str, n: int) -> tuple[float, float]:
    import nats
    from nats.errors import TimeoutError as NatsTimeout

    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    sub = await js.pull_subscribe("bench.x", durable="bench")
    got, first = 0, 0.0
    while got < n:
        try:
            msgs = await sub.fetch(BATCH, timeout=1)
        except NatsTimeout:
            continue
        first = first or time.time()
        for m in msgs:
            await m.ack()
        got += len(msgs)
    end = time.time()
    await nc.flush()
    await nc.close()
    return first, end


async def rabbit_setup() -> None:
    import aio_pika

    conn = await aio_pika.connect(RABBIT_URL)
    ch = await conn.channel()
    await ch.queue_delete("conveyor-bench")
    await ch.declare_queue("conveyor-bench", durable=True)
    await conn.close()


async def rabbit_produce(_: str, __: str, n: int) -> tuple[float, float]:
    import aio_pika

    conn = await aio_pika.connect(RABBIT_URL)
    ch = await conn.channel(publisher_confirms=True)
    x = ch.default_exchange
    start = time.time()
    for _ in range(n // BATCH):
        await asyncio.gather(
            *(
                x.publish(
                    aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key="conveyor-bench",
                )
                for _ in range(BATCH)
            )
        )
    end = time.time()
    await conn.close()
    return start, end


async def rabbit_consume(_: str, __: str, n: int) -> tuple[float, float]:
    import aio_pika

    conn = await aio_pika.connect(RABBIT_URL)
    ch = await conn.channel()
    await ch.set_qos(prefetch_count=2 * BATCH)
    q = await ch.declare_queue("conveyor-bench", durable=True)
    got, first = 0, 0.0
    async with q.iterator() as it:
        async for m in it:
            first = first or time.time()
            await m.ack()
            got += 1
            if got >= n:
                break
    end = time.time()
    await conn.close()
    return first, end


WORKLOADS: dict[str, tuple[Any, Any]] = {
    "conveyor": (conveyor_produce, conveyor_consume),
    "nats": (nats_produce, nats_consume),
    "rabbitmq": (rabbit_produce, rabbit_consume),
}


def _side(kind: str, role: int, url: str, queue: str, n: int, out: Any) -> None:
    out.put((role, _run(WORKLOADS[kind][role], url, queue, n)))


def throughput(kind: str, url: str, n: int) -> dict[str, float]:
    queue = f"bench-{time.monotonic_ns()}"
    if kind == "nats":
        _run(nats_setup)
    elif kind == "rabbitmq":
        _run(rabbit_setup)
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    consumer = ctx.Process(target=_side, args=(kind, 1, url, queue, n, results))
    producer = ctx.Process(target=_side, args=(kind, 0, url, queue, n, results))
    if kind == "conveyor":
        import conveyor

        with conveyor.connect(url) as mq:
            mq.queue(queue)
    consumer.start()
    time.sleep(1.0)  # consumer connected and waiting
    producer.start()
    got = dict(results.get(timeout=600) for _ in range(2))
    producer.join()
    consumer.join()
    (p0, p1), (_, c1) = got[0], got[1]
    return {
        "produce": n / (p1 - p0),
        "end_to_end": n / (c1 - p0),
    }


# -- latency ----------------------------------------------------------------------------


async def _latency(url: str, seconds: float, rate: float) -> list[float]:
    import conveyor

    queue = f"latency-{time.monotonic_ns()}"
    total = int(seconds * rate)
    lat: list[float] = []
    async with await conveyor.connect_async(url) as prod, await conveyor.connect_async(url) as cons:
        qp = await prod.queue(queue)
        qc = await cons.queue(queue)

        async def consume() -> None:
            acks: set[asyncio.Task[Any]] = set()
            while len(lat) < total:
                msgs = await qc.receive(BATCH, wait=5)
                now = time.time()
                for m in msgs:
                    lat.append(now - float(m.body[:20]))
                if msgs:
                    t = asyncio.create_task(qc.ack_batch(msgs))
                    acks.add(t)
                    t.add_done_callback(acks.discard)
            await asyncio.gather(*acks)

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0.5)
        sends: set[asyncio.Task[Any]] = set()
        start = time.monotonic()
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            body = f"{time.time():<20.6f}".encode().ljust(100, b"x")
            t = asyncio.create_task(qp.send(body))
            sends.add(t)
            t.add_done_callback(sends.discard)
        await asyncio.gather(*sends)
        await asyncio.wait_for(consumer, 60)
    return lat


def _latency_proc(url: str, seconds: float, rate: float, out: Any) -> None:
    out.put(_run(_latency, url, seconds, rate))


def latency(url: str, seconds: float, rate: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    p = ctx.Process(target=_latency_proc, args=(url, seconds, rate, out))
    p.start()
    lat = sorted(out.get(timeout=seconds + 120))
    p.join()
    q = statistics.quantiles(lat, n=100)
    return {"p50": q[49] * 1000, "p99": q[98] * 1000, "max": lat[-1] * 1000, "n": len(lat)}


# -- report -----------------------------------------------------------------------------


def report(tp: dict[str, dict[str, float]], lat: dict[str, float] | None, args: Any) -> str:
    lines = [
        "# conveyor serve vs NATS JetStream vs RabbitMQ",
        "",
        f"One run on this machine ({os.cpu_count()} CPUs), {args.messages} messages of 100 bytes,"
        " batches of 100, one producer process and one consumer process running together,"
        f" durable (conveyor `--durability {args.durability}`, JetStream file storage,"
        " RabbitMQ persistent + confirms). Command: "
        f"`python benchmarks/bench_server.py --messages {args.messages}`.",
        "",
        "| system | produce msg/s | end-to-end msg/s | conveyor / system (end-to-end) |",
        "|---|---:|---:|---:|",
    ]
    base = tp.get("conveyor", {}).get("end_to_end")
    for name, r in tp.items():
        ratio = f"{base / r['end_to_end']:.2f}x" if base else "-"
        lines.append(f"| {name} | {r['produce']:,.0f} | {r['end_to_end']:,.0f} | {ratio} |")
    if lat:
        lines += [
            "",
            f"Publish-to-deliver latency, conveyor, steady {args.rate:.0f} msg/s of single"
            f" sends for {args.latency_seconds:.0f} s, consumer waiting in a long poll"
            f" ({lat['n']:.0f} messages):",
            "",
            "| p50 ms | p99 ms | max ms |",
            "|---:|---:|---:|",
            f"| {lat['p50']:.2f} | {lat['p99']:.2f} | {lat['max']:.2f} |",
        ]
    return "\n".join(lines) + "\n"


def chart(tp: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(tp)
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [tp[n]["produce"] for n in names], 0.4, label="produce")
    ax.bar([x + 0.2 for x in xs], [tp[n]["end_to_end"] for n in names], 0.4, label="end-to-end")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("messages / s")
    ax.set_title("100-byte messages, batches of 100, durable")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--targets", default="conveyor,nats,rabbitmq")
    ap.add_argument("--durability", default="fsync", choices=["fsync", "os", "none"])
    ap.add_argument("--latency-seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    args = ap.parse_args()
    args.messages -= args.messages % BATCH
    server = Server(args.durability)
    try:
        tp: dict[str, dict[str, float]] = {}
        for kind in args.targets.split(","):
            tp[kind] = throughput(kind, server.url, args.messages)
            print(kind, {k: round(v) for k, v in tp[kind].items()}, flush=True)
        lat = None
        if args.latency_seconds > 0:
            lat = latency(server.url, args.latency_seconds, args.rate)
            print("latency", {k: round(v, 2) for k, v in lat.items()}, flush=True)
    finally:
        server.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = report(tp, lat, args)
    (RESULTS / "server.md").write_text(text)
    chart(tp, RESULTS / "server.png")
    print(text)


if __name__ == "__main__":
    main()
