"""conveyor over PostgreSQL with 1, 2 and 3 nodes vs the raw floor (issue 7).

In one run, on one fresh database per measurement (created and dropped here):

- raw floor: the store's own statements through psycopg, no conveyor: INSERT ...
  unnest(...) RETURNING id of 100 rows per transaction; then lease 100 with
  ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 100) RETURNING``
  and delete them by id, one transaction each. ``--workers`` connections (threads).
- conveyor: N node processes, each an embedded Broker on the same database (the
  engine and store a `conveyor serve` node runs, without HTTP in front), each with
  ``--workers`` concurrent tasks: send_batch(100); then receive(100) + ack_batch.

Both at the same durability (synchronous_commit on = conveyor's fsync, unless
``--durability os``), 100-byte bodies, ``--messages`` messages per phase.

    python benchmarks/bench_postgres.py                 # writes benchmarks/results/postgres.md
    python benchmarks/bench_postgres.py --messages 20000 --nodes 1 2

PostgreSQL: ``--admin-url`` (default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import secrets
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

BODY = b"x" * 100
BATCH = 100
RESULTS = Path(__file__).parent / "results"


def db_url(admin: str, name: str) -> str:
    return urlunsplit(urlsplit(admin)._replace(path=f"/{name}"))


class Database:
    """A fresh database for one measurement."""

    def __init__(self, admin: str) -> None:
        self.admin = admin
        self.name = f"conveyor_bench_{os.getpid()}_{secrets.token_hex(3)}"
        self.url = db_url(admin, self.name)

    def __enter__(self) -> str:
        with psycopg.connect(self.admin, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {self.name}")
        return self.url

    def __exit__(self, *exc: object) -> None:
        with psycopg.connect(self.admin, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


# -- raw floor ---------------------------------------------------------------------------

INSERT = (
    "INSERT INTO messages(queue_id, state, priority, visible_at, expires_at, sent_at,"
    " group_id, dedup_id, meta, body) SELECT 1, 0, 0, NULL, NULL, t, NULL, NULL, m, b"
    " FROM unnest(%s::float8[], %s::bytea[], %s::bytea[]) WITH ORDINALITY AS u(t, m, b, o)"
    " ORDER BY o RETURNING id"
)
LEASE = (
    "UPDATE messages SET state = 1, visible_at = %s, lease_token = %s,"
    " receive_count = receive_count + 1 WHERE id IN (SELECT id FROM messages"
    " WHERE queue_id = 1 AND state = 0 ORDER BY priority DESC, id LIMIT %s"
    " FOR UPDATE SKIP LOCKED) RETURNING id, body"
)
DELETE = "DELETE FROM messages WHERE id = ANY(%s::bigint[]) AND lease_token = %s"


def raw_floor(url: str, total: int, workers: int, sync: str) -> tuple[float, float]:
    from conveyor.store.postgres import PostgresStore

    asyncio.run(PostgresStore(url, "fsync").close())  # the same schema
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("INSERT INTO queues(name, options, created_at) VALUES ('bench', '', 0)")

    def conn() -> psycopg.Connection[Any]:
        c = psycopg.connect(url, autocommit=True)
        c.execute("SELECT set_config('synchronous_commit', %s, false)", [sync])
        return c

    def produce(n: int) -> None:
        with conn() as c:
            for _ in range(n // BATCH):
                with c.transaction():
                    c.execute(INSERT, [[time.time()] * BATCH, [b""] * BATCH, [BODY] * BATCH])

    def consume(done: list[int]) -> None:
        with conn() as c:
            while True:
                token = secrets.randbits(60)
                with c.transaction():
                    rows = c.execute(LEASE, [time.time() + 30, token, BATCH]).fetchall()
                if not rows:
                    return
                with c.transaction():
                    c.execute(DELETE, [[r[0] for r in rows], token])
                done.append(len(rows))

    per = total // workers
    threads = [threading.Thread(target=produce, args=(per,)) for _ in range(workers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    send = per * workers / (time.perf_counter() - start)
    done: list[int] = []
    threads = [threading.Thread(target=consume, args=(done,)) for _ in range(workers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recv = sum(done) / (time.perf_counter() - start)
    return send, recv


# -- conveyor nodes ----------------------------------------------------------------------


def node_main(
    url: str, durability: str, per_node: int, workers: int, go: Any, phase2: Any, out: Any
) -> None:
    async def main() -> None:
        from conveyor.broker import Broker
        from conveyor.model import NewMessage

        broker = await Broker.open(url, durability=durability)
        try:
            await broker.declare_queue("bench")
            batch = [NewMessage(body=BODY) for _ in range(BATCH)]
            out.put(("ready", 0, 0.0))
            await asyncio.get_running_loop().run_in_executor(None, go.wait)

            async def send(n: int) -> None:
                for _ in range(n // BATCH):
                    await broker.send_batch("bench", batch)

            start = time.perf_counter()
            await asyncio.gather(*(send(per_node // workers) for _ in range(workers)))
            sent = per_node // workers // BATCH * BATCH * workers
            out.put(("sent", sent, time.perf_counter() - start))
            await asyncio.get_running_loop().run_in_executor(None, phase2.wait)
            got = 0

            async def drain() -> None:
                nonlocal got
                while True:
                    msgs = await broker.receive("bench", BATCH)
                    if not msgs:
                        return
                    await broker.ack_batch("bench", [m.receipt for m in msgs if m.receipt])
                    got += len(msgs)

            start = time.perf_counter()
            await asyncio.gather(*(drain() for _ in range(workers)))
            out.put(("received", got, time.perf_counter() - start))
        finally:
            await broker.close()

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())


def conveyor_nodes(
    url: str, nodes: int, total: int, workers: int, durability: str
) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    go, phase2, out = ctx.Event(), ctx.Event(), ctx.Queue()
    per_node = total // nodes
    procs = [
        ctx.Process(target=node_main, args=(url, durability, per_node, workers, go, phase2, out))
        for _ in range(nodes)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        assert out.get(timeout=120)[0] == "ready"
    start = time.perf_counter()
    go.set()
    sent = sum(out.get(timeout=600)[1] for _ in procs)
    send_rate = sent / (time.perf_counter() - start)
    start = time.perf_counter()
    phase2.set()
    got = sum(out.get(timeout=600)[1] for _ in procs)
    recv_rate = got / (time.perf_counter() - start)
    for p in procs:
        p.join(60)
    assert got == sent, (got, sent)
    return send_rate, recv_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--durability", choices=["fsync", "os"], default="fsync")
    ap.add_argument("--out", type=Path, default=RESULTS / "postgres.md")
    args = ap.parse_args()
    sync = "on" if args.durability == "fsync" else "off"
    rows: list[tuple[str, float, float]] = []
    with Database(args.admin_url) as url:
        s, r = raw_floor(url, args.messages, args.workers, sync)
    rows.append(("raw floor (psycopg, same statements)", s, r))
    print(f"raw floor: send {s:,.0f}/s  receive+ack {r:,.0f}/s", flush=True)
    for n in args.nodes:
        with Database(args.admin_url) as url:
            s, r = conveyor_nodes(url, n, args.messages, args.workers, args.durability)
        rows.append((f"conveyor, {n} node{'s' if n > 1 else ''}", s, r))
        print(f"conveyor {n} node(s): send {s:,.0f}/s  receive+ack {r:,.0f}/s", flush=True)
    with psycopg.connect(args.admin_url) as c:
        version = c.execute("SHOW server_version").fetchone()
    raw_s, raw_r = rows[0][1], rows[0][2]
    lines = [
        "# conveyor over PostgreSQL: 1, 2, 3 nodes vs the raw floor",
        "",
        f"One run on this machine ({os.cpu_count()} CPUs, {platform.machine()}; PostgreSQL"
        f" {version[0] if version else '?'} on the same machine), {args.messages:,} messages"
        f" of 100 bytes per phase, batches of {BATCH}, {args.workers} concurrent workers per"
        f" node (raw floor: {args.workers} connections), durability {args.durability}"
        f" (synchronous_commit {sync}). Command:"
        f" `python benchmarks/bench_postgres.py --messages {args.messages}"
        f" --durability {args.durability}`.",
        "",
        "| what | send msg/s | receive+ack msg/s | send vs raw | receive+ack vs raw |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s, r in rows:
        lines.append(f"| {name} | {s:,.0f} | {r:,.0f} | {s / raw_s:.0%} | {r / raw_r:.0%} |")
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = args.out.read_text() if args.out.exists() else ""
    notes = old.split("<!-- notes -->", 1)[1] if "<!-- notes -->" in old else "\n"
    args.out.write_text("\n".join(lines) + "\n<!-- notes -->" + notes)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
