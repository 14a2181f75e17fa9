"""Several `conveyor serve` processes sharing one PostgreSQL database (issue 7).

Three real server processes on one fresh database: competing consumers across nodes
never hold the same lease; a send on one node wakes a long poll on another; a node
killed with SIGKILL under load loses nothing that was confirmed (its leases expire and
the other nodes deliver them); catalog changes propagate; restarting every node keeps
all data.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import new_pg_database

from serverproc import ServerProcess


@pytest.fixture(scope="module")
def db_url() -> Iterator[str]:
    with new_pg_database("conveyor_nodes") as url:
        yield url


def _start_all(nodes: list[ServerProcess]) -> None:
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(lambda n: n.start(), nodes))


@pytest.fixture(scope="module")
def nodes(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    base = tmp_path_factory.mktemp("nodes")
    procs = [
        ServerProcess(base, amqp=False, durability="os", data=db_url, name=f"node{i}")
        for i in range(3)
    ]
    try:
        _start_all(procs)
        yield procs
    finally:
        for p in procs:
            try:
                p.stop()
            except Exception:
                p.kill()


def _live(nodes: list[ServerProcess]) -> list[ServerProcess]:
    """Restart any node an earlier test killed."""
    dead = [n for n in nodes if n.proc is None or n.proc.poll() is not None]
    if dead:
        _start_all(dead)
    return nodes


async def _declare(c: httpx.AsyncClient, url: str, queue: str, **options: Any) -> None:
    r = await c.put(f"{url}/v1/queues/{queue}", json=options)
    assert r.status_code == 200, r.text


async def _send(c: httpx.AsyncClient, url: str, queue: str, bodies: list[str]) -> None:
    r = await c.post(
        f"{url}/v1/queues/{queue}/messages/batch",
        json={"messages": [{"body": b} for b in bodies]},
    )
    assert r.status_code == 200, r.text


async def _receive(
    c: httpx.AsyncClient, url: str, queue: str, n: int = 10, wait: float = 0.0, **kw: Any
) -> list[dict[str, Any]]:
    r = await c.post(
        f"{url}/v1/queues/{queue}/receive",
        json={"max_messages": n, "wait": wait, **kw},
        timeout=wait + 10,
    )
    assert r.status_code == 200, r.text
    msgs: list[dict[str, Any]] = r.json()["messages"]
    return msgs


async def _ack(c: httpx.AsyncClient, url: str, queue: str, receipts: list[str]) -> list[str]:
    r = await c.post(f"{url}/v1/queues/{queue}/ack/batch", json={"receipts": receipts})
    assert r.status_code == 200, r.text
    failed: list[str] = r.json()["failed"]
    return failed


async def _stats(c: httpx.AsyncClient, url: str, queue: str) -> dict[str, Any]:
    r = await c.get(f"{url}/v1/queues/{queue}/stats")
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_competing_consumers_never_share_a_lease(nodes: list[ServerProcess]) -> None:
    urls = [n.http_url for n in _live(nodes)]
    total = 900

    async def main() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            await _declare(c, urls[0], "compete", visibility_timeout=60)
            for i in range(0, total, 100):
                await _send(c, urls[i // 100 % 3], "compete", [str(j) for j in range(i, i + 100)])
            seen: list[str] = []

            async def consumer(url: str) -> None:
                while True:
                    got = await _receive(c, url, "compete", 7)
                    if not got:
                        return
                    seen.extend(m["body"] for m in got)
                    assert all(m["receive_count"] == 1 for m in got)
                    assert await _ack(c, url, "compete", [m["receipt"] for m in got]) == []

            await asyncio.gather(*(consumer(urls[i % 3]) for i in range(9)))
            # Nothing was leased twice (each lease outlives the test), nothing missed.
            assert len(seen) == len(set(seen)) == total
            s = await _stats(c, urls[2], "compete")
            assert (s["ready"], s["in_flight"], s["acked_total"]) == (0, 0, total)

    asyncio.run(main())


def test_send_on_one_node_wakes_a_long_poll_on_another(nodes: list[ServerProcess]) -> None:
    a, b, _ = (n.http_url for n in _live(nodes))

    async def main() -> list[float]:
        async with httpx.AsyncClient(timeout=30) as c:
            await _declare(c, a, "wake")
            lags = []
            for i in range(5):
                poll = asyncio.create_task(_receive(c, a, "wake", 1, wait=10))
                await asyncio.sleep(0.3)  # the poll is waiting on node A
                assert not poll.done()
                await _send(c, b, "wake", [f"m{i}"])
                sent = time.monotonic()
                got = await asyncio.wait_for(poll, 5)
                lags.append(time.monotonic() - sent)
                assert [m["body"] for m in got] == [f"m{i}"]
                assert await _ack(c, a, "wake", [got[0]["receipt"]]) == []
            return lags

    lags = asyncio.run(main())
    # Within 100 ms (the median is a few ms; the budget leaves room for a loaded CI box).
    assert max(lags) < 0.1, lags


def test_catalog_changes_reach_every_node(nodes: list[ServerProcess]) -> None:
    a, b, c_ = (n.http_url for n in _live(nodes))

    async def main() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.put(f"{a}/v1/exchanges/events", json={"type": "topic"})
            assert r.status_code == 200, r.text
            await _declare(c, b, "audit")
            r = await c.post(
                f"{b}/v1/exchanges/events/bind", json={"queue": "audit", "routing_key": "o.#"}
            )
            assert r.status_code == 204, r.text
            r = await c.post(
                f"{c_}/v1/exchanges/events/publish", json={"body": "x", "routing_key": "o.new"}
            )
            assert r.status_code == 200 and r.json()["routed"] == 1, r.text
            # Deleting on one node is seen by the others (no stale cached queue).
            r = await c.delete(f"{a}/v1/queues/audit")
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 2
            while True:
                r = await c.post(f"{c_}/v1/queues/audit/messages", json={"body": "y"})
                if r.status_code == 404 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.02)
            assert r.status_code == 404, r.text

    asyncio.run(main())


def test_sigkill_one_node_under_load_loses_nothing(nodes: list[ServerProcess]) -> None:
    urls = [n.http_url for n in _live(nodes)]
    victim = nodes[2]

    async def main() -> None:
        async with httpx.AsyncClient(timeout=10) as c:
            await _declare(c, urls[0], "kill", visibility_timeout=1.5)
            confirmed: set[str] = set()
            acked: set[str] = set()
            held_by_victim: set[str] = set()  # received on the victim, never acked
            stop_producing = asyncio.Event()
            killed = asyncio.Event()

            async def producer(k: int, url: str) -> None:
                n = 0
                while not stop_producing.is_set():
                    bodies = [f"p{k}-{n + i}" for i in range(20)]
                    try:
                        await _send(c, url, "kill", bodies)
                    except (httpx.HTTPError, AssertionError):
                        if killed.is_set():
                            return  # unconfirmed: may or may not be stored
                        raise
                    confirmed.update(bodies)
                    n += 20

            async def consumer(url: str, slow: bool) -> None:
                while True:
                    try:
                        got = await _receive(c, url, "kill", 10, wait=0.5)
                    except (httpx.HTTPError, AssertionError):
                        if killed.is_set():
                            return
                        raise
                    if not got:
                        if stop_producing.is_set() and confirmed <= acked:
                            return
                        continue
                    bodies = {m["body"] for m in got}
                    if slow:
                        held_by_victim.update(bodies)
                        await asyncio.sleep(0.4)  # hold the leases when the kill comes
                    try:
                        failed = await _ack(c, url, "kill", [m["receipt"] for m in got])
                    except (httpx.HTTPError, AssertionError):
                        if killed.is_set():
                            return
                        raise
                    done = {m["body"] for m in got if m["receipt"] not in failed}
                    acked.update(done)
                    if slow:
                        held_by_victim.difference_update(done)

            tasks = [asyncio.create_task(producer(k, urls[k % 3])) for k in range(3)]
            tasks += [asyncio.create_task(consumer(urls[i % 2], False)) for i in range(4)]
            tasks += [asyncio.create_task(consumer(urls[2], True)) for _ in range(2)]
            await asyncio.sleep(1.5)
            killed.set()
            victim.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            victim.proc.wait()  # type: ignore[union-attr]
            held = set(held_by_victim)
            await asyncio.sleep(1.0)
            stop_producing.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            assert held, "the victim held no leases when it was killed"
            assert confirmed, "nothing was sent"
            # Every confirmed message was delivered (and acked) at least once; the
            # victim's leases expired and other nodes delivered those messages.
            assert confirmed - acked == set()
            assert held <= acked
            s = await _stats(c, urls[0], "kill")
            assert (s["ready"], s["in_flight"], s["delayed"]) == (0, 0, 0)

    asyncio.run(main())


def test_restarting_every_node_keeps_all_data(nodes: list[ServerProcess]) -> None:
    urls = [n.http_url for n in _live(nodes)]

    async def before() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            await _declare(c, urls[0], "keep", max_receives=5, dead_letter="keep.dlq")
            r = await c.put(f"{urls[1]}/v1/exchanges/keepx", json={"type": "fanout"})
            assert r.status_code == 200, r.text
            r = await c.post(f"{urls[1]}/v1/exchanges/keepx/bind", json={"queue": "keep"})
            assert r.status_code == 204, r.text
            await _send(c, urls[2], "keep", [f"k{i}" for i in range(50)])
            r = await c.post(
                f"{urls[0]}/v1/queues/keep/messages", json={"body": "later", "delay": 1}
            )
            assert r.status_code == 200, r.text
            # one message in flight across the restart
            (m,) = await _receive(c, urls[1], "keep", 1, visibility_timeout=1)
            assert m["body"] == "k0"

    asyncio.run(before())
    for n in nodes:
        n.stop()
    _start_all(nodes)
    urls = [n.http_url for n in nodes]

    async def after() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.get(f"{urls[2]}/v1/queues/keep")
            assert r.status_code == 200 and r.json()["options"]["max_receives"] == 5
            r = await c.post(f"{urls[2]}/v1/exchanges/keepx/publish", json={"body": "routed"})
            assert r.status_code == 200 and r.json()["routed"] == 1, r.text
            got: list[str] = []
            deadline = time.monotonic() + 10
            while len(got) < 52 and time.monotonic() < deadline:
                msgs = await _receive(c, urls[len(got) % 3], "keep", 10, wait=1)
                got += [m["body"] for m in msgs]
                if msgs:
                    await _ack(c, urls[0], "keep", [m["receipt"] for m in msgs])
            assert sorted(got) == sorted([f"k{i}" for i in range(50)] + ["later", "routed"]), got
            s = await _stats(c, urls[1], "keep")
            assert (s["ready"], s["in_flight"], s["delayed"]) == (0, 0, 0)
            assert s["sent_total"] == 52 and s["acked_total"] == 52

    asyncio.run(after())


@pytest.fixture
def fresh_db() -> Iterator[str]:
    with new_pg_database("conveyor_fresh") as url:
        yield url


def test_fifo_and_timers_with_two_nodes_in_process(fresh_db: str) -> None:
    """Two embedded brokers (two nodes) on one database, one fake clock: FIFO keeps one
    message in flight per group across nodes, and timers run by both nodes at once
    promote and expire every row exactly once."""
    from conveyor.broker import Broker, FakeClock
    from conveyor.model import NewMessage, QueueOptions

    async def main() -> None:
        clock = FakeClock()
        a = await Broker.open(fresh_db, durability="os", clock=clock, timers=False)
        b = await Broker.open(fresh_db, durability="os", clock=clock, timers=False)
        try:
            await a.declare_queue("f", QueueOptions(fifo=True, visibility_timeout=60))
            await a.send_batch(
                "f",
                [NewMessage(body=f"{g}{i}".encode(), group_id=g) for i in range(5) for g in "xyz"],
            )
            order: dict[str, list[int]] = {g: [] for g in "xyz"}
            for _ in range(5):
                got = await asyncio.gather(a.receive("f", 10), b.receive("f", 10))
                flat = got[0] + got[1]
                groups = [d.group_id for d in flat]
                assert sorted(groups) == ["x", "y", "z"], groups  # one per group in flight
                for node, ds in zip((a, b), got, strict=True):
                    for d in ds:
                        assert d.group_id and d.receipt
                        order[d.group_id].append(int(d.body[1:]))
                        await node.ack("f", d.receipt)
            assert order == {g: [0, 1, 2, 3, 4] for g in "xyz"}

            await a.declare_queue("t", QueueOptions(message_ttl=5, dead_letter="t.dlq"))
            await b.send_batch("t", [NewMessage(body=b"t") for _ in range(300)])
            await a.send_batch("t", [NewMessage(body=b"d", delay=2) for _ in range(300)])
            assert len(await b.receive("t", 1, visibility_timeout=1)) == 1
            clock.advance(3)  # the lease ended, the delayed messages are due
            await asyncio.gather(a.tick(), b.tick(), a.tick(), b.tick())
            s = await b.stats("t")
            assert (s.ready, s.in_flight, s.delayed) == (600, 0, 0)
            clock.advance(10)  # every message's TTL passed
            await asyncio.gather(a.tick(), b.tick(), a.tick(), b.tick())
            s = await a.stats("t")
            assert (s.ready, s.expired_total, s.dead_lettered) == (0, 600, 600)
            assert (await b.stats("t.dlq")).ready == 600
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_newer_schema_is_refused(db_url: str, tmp_path: Path) -> None:
    import psycopg

    from conveyor.errors import SchemaTooNew
    from conveyor.store.postgres import SCHEMA_VERSION, PostgresStore

    with new_pg_database("conveyor_newer") as url:
        asyncio.run(PostgresStore(url, "os").close())  # creates the schema
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "UPDATE conveyor_meta SET value = %s WHERE key = 'schema_version'",
                [str(SCHEMA_VERSION + 1)],
            )
        with pytest.raises(SchemaTooNew, match="Upgrade conveyor"):
            PostgresStore(url, "os")
