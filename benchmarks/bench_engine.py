"""In-process engine benchmark (issue: core engine).

Three measurements, each in the same run as its reference:

1. throughput: send in batches of 100, receive 100, ack 100 (100-byte bodies,
   durability fsync) through the Broker, vs the raw floor: the same INSERTs and DELETEs
   issued directly through sqlite3 on the same schema in batches of 100, fsync.
2. backlog: receive+ack throughput from a queue holding --backlog ready and --backlog
   delayed messages, vs the same from a queue holding only what is drained.
3. memory: peak RSS of a process holding --rss-count queued 1 KiB messages.

    python benchmarks/bench_engine.py                    # full sizes (1,000,000)
    python benchmarks/bench_engine.py --backlog 100000 --rss-count 100000   # quicker

Writes benchmarks/results/engine.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conveyor.broker import Broker
from conveyor.model import NewMessage
from conveyor.store.sqlite import SCHEMA

BODY = b"x" * 100
RESULTS = Path(__file__).parent / "results"


async def conveyor_throughput(folder: str, total: int, lanes: int = 1) -> float:
    """``lanes`` producer/consumer pairs run at once; with more than one, group commit
    shares each fsync between them (what a server with several clients does)."""
    broker = await Broker.open(folder, durability="fsync", timers=False)
    try:
        await broker.declare_queue("bench")
        batch = [NewMessage(body=BODY) for _ in range(100)]

        async def lane(rounds: int) -> None:
            for _ in range(rounds):
                await broker.send_batch("bench", batch)
                got = await broker.receive("bench", 100)
                await broker.ack_batch("bench", [d.receipt for d in got if d.receipt])

        start = time.perf_counter()
        await asyncio.gather(*(lane(total // 100 // lanes) for _ in range(lanes)))
        return total / (time.perf_counter() - start)
    finally:
        await broker.close()


def raw_floor(folder: str, total: int) -> float:
    conn = sqlite3.connect(os.path.join(folder, "raw.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    for stmt in SCHEMA.split(";"):
        if stmt.strip():
            conn.execute(stmt)
    conn.execute("INSERT INTO queues(name, options, created_at) VALUES ('bench', x'', 0)")
    # Bound as cheaply as sqlite3 allows, as the store does: one multi-row INSERT, no None
    # parameters (NULL literals), blobs as bytearray (a bytes or None parameter costs
    # ~1 us through sqlite3's adapter lookup).
    insert = (
        "INSERT INTO messages(queue_id, state, priority, sent_at, meta, body) VALUES "
        + ",".join(["(1,0,0,?,?,?)"] * 100)
    )
    start = time.perf_counter()
    for _ in range(total // 100):
        params: list[object] = []
        now = time.time()
        for _ in range(100):
            params += (now, bytearray(b""), bytearray(BODY))
        conn.execute("BEGIN")
        conn.execute(insert, params)
        conn.execute("COMMIT")
        conn.execute("BEGIN")
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM messages WHERE queue_id=1 AND state=0"
                " ORDER BY priority DESC, id LIMIT 100"
            )
        ]
        conn.execute(f"DELETE FROM messages WHERE id IN ({','.join('?' * len(ids))})", ids)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return total / elapsed


async def drain_rate(folder: str, backlog: int, drain: int) -> float:
    """receive+ack rate of ``drain`` messages with ``backlog`` ready + ``backlog`` delayed
    messages in the same queue (backlog 0: only the drained ones)."""
    broker = await Broker.open(folder, durability="os", timers=False)
    try:
        await broker.declare_queue("q")
        ready = max(backlog, drain)
        chunk = [NewMessage(body=BODY) for _ in range(10_000)]
        for i in range(0, ready, 10_000):
            await broker.send_batch("q", chunk[: min(10_000, ready - i)])
        late = [NewMessage(body=BODY, delay=3600) for _ in range(10_000)]
        for i in range(0, backlog, 10_000):
            await broker.send_batch("q", late[: min(10_000, backlog - i)])
        start = time.perf_counter()
        done = 0
        while done < drain:
            got = await broker.receive("q", 100)
            await broker.ack_batch("q", [d.receipt for d in got if d.receipt])
            done += len(got)
        return drain / (time.perf_counter() - start)
    finally:
        await broker.close()


RSS_CHILD = """
import asyncio, resource, sys
from conveyor.broker import Broker
from conveyor.model import NewMessage
async def main(folder, count):
    broker = await Broker.open(folder, durability="none", timers=False)
    await broker.declare_queue("big")
    body = b"k" * 1024
    chunk = [NewMessage(body=body) for _ in range(5000)]
    for i in range(0, count, 5000):
        await broker.send_batch("big", chunk[: min(5000, count - i)])
    stats = await broker.stats("big")
    got = await broker.receive("big", 100)
    await broker.close()
    print(stats.ready, len(got), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def peak_rss(folder: str, count: int) -> tuple[int, float]:
    out = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, folder, str(count)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return int(out[0]), int(out[2]) / 1024  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--backlog", type=int, default=1_000_000)
    ap.add_argument("--drain", type=int, default=20_000)
    ap.add_argument("--rss-count", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    rows: list[tuple[str, str, str, str]] = []
    # fsync latency on a shared machine swings between runs: interleave the two sides
    # over several rounds and compare medians.
    floors, ours, piped = [], [], []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            floors.append(raw_floor(tmp, args.messages))
            ours.append(asyncio.run(conveyor_throughput(os.path.join(tmp, f"c{i}"), args.messages)))
            piped.append(
                asyncio.run(conveyor_throughput(os.path.join(tmp, f"p{i}"), args.messages, 4))
            )
    floor, one, four = (statistics.median(x) for x in (floors, ours, piped))
    rows.append(
        (
            "send 100 + receive 100 + ack 100, fsync, one caller at a time",
            f"{one:,.0f} msg/s",
            f"{floor:,.0f} msg/s (raw sqlite3)",
            f"{one / floor:.0%} (target >= 50%)",
        )
    )
    rows.append(
        (
            "the same with 4 callers at once (group commit)",
            f"{four:,.0f} msg/s",
            f"{floor:,.0f} msg/s (raw sqlite3)",
            f"{four / floor:.0%}",
        )
    )
    print(rows[-2], rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Drain the empty-queue case before and after the loaded one: median of the two.
        empty1 = asyncio.run(drain_rate(os.path.join(tmp, "a"), 0, args.drain))
        loaded = asyncio.run(drain_rate(os.path.join(tmp, "b"), args.backlog, args.drain))
        empty2 = asyncio.run(drain_rate(os.path.join(tmp, "c"), 0, args.drain))
        empty = (empty1 + empty2) / 2
        rows.append(
            (
                f"receive+ack with {args.backlog:,} ready + {args.backlog:,} delayed",
                f"{loaded:,.0f} msg/s",
                f"{empty:,.0f} msg/s (queue holding only the drained messages)",
                f"{loaded / empty:.0%} (target >= 80%)",
            )
        )
        print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        n, rss = peak_rss(os.path.join(tmp, "r"), args.rss_count)
        rows.append(
            (
                f"peak RSS with {n:,} queued 1 KiB messages",
                f"{rss:,.0f} MB",
                "",
                "target < 200 MB",
            )
        )
        print(rows[-1], flush=True)

    RESULTS.mkdir(exist_ok=True)
    lines = [
        "# Engine benchmark (in-process, 100-byte bodies unless noted)",
        "",
        f"Command: `python benchmarks/bench_engine.py --messages {args.messages}"
        f" --rounds {args.rounds}"
        f" --backlog {args.backlog} --drain {args.drain} --rss-count {args.rss_count}`",
        "",
        "| measurement | conveyor | reference | ratio |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        f"Machine: {os.cpu_count()} CPUs; Python {sys.version.split()[0]};"
        f" SQLite {sqlite3.sqlite_version}.",
    ]
    (RESULTS / "engine.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
