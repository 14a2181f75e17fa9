"""AMQP throughput: conveyor vs the RabbitMQ on this machine, same clients, one run.

    python benchmarks/bench_amqp.py [--messages 20000] [--durability fsync] [--rounds 3]

Writes benchmarks/results/amqp.md (medians of alternating rounds).

Persistent messages (delivery_mode 2), publisher confirms, manual acks, prefetch 1000,
100-byte bodies. For each client (aio-pika, pika) and each server: publish msg/s (all
confirmed) then consume+ack msg/s. conveyor runs as shipped, ``conveyor serve`` in its own
process (SQLite store in a temporary directory, the chosen durability), so client and
server do not share a GIL.

aio-pika publishes with up to ``--window`` unconfirmed messages in flight; pika's
BlockingConnection waits for each confirm before the next publish (its only mode).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
import pika
from conveyor_serve import start_conveyor

BODY = b"x" * 100
RESULTS = Path(__file__).resolve().parent / "results"


async def aio_publish(url: str, queue: str, n: int, window: int) -> float:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True)
        exchange = channel.default_exchange
        start = time.perf_counter()
        sent = 0
        while sent < n:
            batch = min(window, n - sent)
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        queue,
                    )
                    for _ in range(batch)
                )
            )
            sent += batch
        return n / (time.perf_counter() - start)


async def aio_consume(url: str, queue: str, n: int) -> float:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        q = await channel.declare_queue(queue, durable=True)
        done = asyncio.Event()
        count = 0
        start = time.perf_counter()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            await message.ack()
            count += 1
            if count == n:
                done.set()

        tag = await q.consume(on_message)
        await done.wait()
        rate = n / (time.perf_counter() - start)
        await q.cancel(tag)
        await q.delete(if_unused=False, if_empty=False)
        return rate


def pika_publish(host: str, port: int, queue: str, n: int) -> float:
    conn = pika.BlockingConnection(pika.ConnectionParameters(host, port))
    ch = conn.channel()
    ch.queue_declare(queue, durable=True)
    ch.confirm_delivery()
    props = pika.BasicProperties(delivery_mode=2)
    start = time.perf_counter()
    for _ in range(n):
        ch.basic_publish("", queue, BODY, props)
    rate = n / (time.perf_counter() - start)
    conn.close()
    return rate


def pika_consume(host: str, port: int, queue: str, n: int) -> float:
    conn = pika.BlockingConnection(pika.ConnectionParameters(host, port))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1000)
    count = 0
    start = time.perf_counter()

    def on_message(c: object, method: object, props: object, body: bytes) -> None:
        nonlocal count
        ch.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]
        count += 1
        if count == n:
            ch.stop_consuming()

    ch.basic_consume(queue, on_message)
    ch.start_consuming()
    rate = n / (time.perf_counter() - start)
    ch.queue_delete(queue)
    conn.close()
    return rate


def run(host: str, port: int, n: int, pika_n: int, window: int) -> dict[str, float]:
    url = f"amqp://guest:guest@{host}:{port}/"
    q1 = f"bench-aio-{uuid.uuid4().hex[:6]}"
    q2 = f"bench-pika-{uuid.uuid4().hex[:6]}"
    out = {
        "aio-pika publish": asyncio.run(aio_publish(url, q1, n, window)),
        "aio-pika consume+ack": asyncio.run(aio_consume(url, q1, n)),
        "pika publish": pika_publish(host, port, q2, pika_n),
        "pika consume+ack": pika_consume(host, port, q2, pika_n),
    }
    return out


def rabbit_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=0.5):
            return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--pika-messages", type=int, default=5000)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--durability", default="fsync", choices=["fsync", "os", "none"])
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="conveyor and RabbitMQ alternate this many times; medians are reported",
    )
    args = parser.parse_args()
    # fsync latency on a shared machine swings widely from minute to minute: alternate
    # the two brokers round by round and compare medians, not one run of each.
    samples: dict[str, dict[str, list[float]]] = {"conveyor": {}, "rabbitmq": {}}
    with tempfile.TemporaryDirectory() as data:
        proc, ready = start_conveyor(data, args.durability, amqp=True)
        port = int(ready["amqp_port"])
        try:
            for _ in range(args.rounds):
                got = run("127.0.0.1", port, args.messages, args.pika_messages, args.window)
                for k, v in got.items():
                    samples["conveyor"].setdefault(k, []).append(v)
                if rabbit_up():
                    got = run("127.0.0.1", 5672, args.messages, args.pika_messages, args.window)
                    for k, v in got.items():
                        samples["rabbitmq"].setdefault(k, []).append(v)
        finally:
            proc.terminate()
            proc.wait(10)
    head = (
        f"{args.messages} msgs (pika {args.pika_messages}), 100-byte bodies, persistent, "
        f"confirms, manual acks, prefetch 1000; conveyor durability={args.durability};"
        f" median of {args.rounds} alternating rounds"
    )
    lines = [
        "# AMQP: conveyor vs the RabbitMQ on this machine",
        "",
        f"Command: `python benchmarks/bench_amqp.py --rounds {args.rounds}"
        f" --durability {args.durability}`. {head}.",
        "",
        "| client / operation | conveyor msg/s | RabbitMQ msg/s | ratio | conveyor runs |",
        "|---|---:|---:|---:|---|",
    ]
    print(head)
    print(f"{'':24}{'conveyor':>12}{'rabbitmq':>12}{'ratio':>8}")
    for key, values in samples["conveyor"].items():
        ours = statistics.median(values)
        theirs_all = samples["rabbitmq"].get(key)
        theirs = statistics.median(theirs_all) if theirs_all else None
        ratio = f"{ours / theirs:.2f}x" if theirs else "-"
        shown = f"{theirs:,.0f}" if theirs else "-"
        print(f"{key:24}{ours:>12,.0f}{shown:>12}{ratio:>8}")
        runs = ", ".join(f"{v:,.0f}" for v in values)
        lines.append(f"| {key} | {ours:,.0f} | {shown} | {ratio} | {runs} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "amqp.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
