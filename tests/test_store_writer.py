"""Group commit: many callers share one transaction; a failing script rolls back alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conveyor import errors
from conveyor.broker import Broker
from conveyor.model import NewMessage, QueueOptions


async def test_concurrent_sends_share_rounds_and_failures_stay_alone(tmp_path: Path) -> None:
    broker = await Broker.open(str(tmp_path / "d"), durability="os", timers=False)
    try:
        await broker.declare_queue("q", QueueOptions(max_length=150))
        ok = [NewMessage(body=b"x")]
        too_big = [NewMessage(body=b"y" * (2 * 1024 * 1024))]
        tasks = [broker.send_batch("q", too_big if i % 10 == 0 else ok) for i in range(200)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert all(isinstance(f, errors.MessageTooLarge | errors.QueueFull) for f in failed)
        stats = await broker.stats("q")
        stored = sum(1 for r in results if not isinstance(r, BaseException))
        # every confirmed send is there, nothing else; the gauge agrees with the rows
        assert stats.ready == stored == 150
        assert len(await broker.receive("q", 1000)) == 150
    finally:
        await broker.close()


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    broker = await Broker.open("memory://", timers=False)
    await broker.declare_queue("q")
    await broker.close()
    with pytest.raises(errors.ClosedError):
        await broker.send("q", NewMessage(body=b"x"))


async def test_schema_version_newer_than_code_is_refused(tmp_path: Path) -> None:
    import sqlite3

    folder = tmp_path / "d"
    broker = await Broker.open(str(folder), timers=False)
    await broker.close()
    conn = sqlite3.connect(folder / "conveyor.db")
    conn.execute("UPDATE conveyor_meta SET value='999' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(errors.SchemaTooNew, match="Upgrade conveyor"):
        await Broker.open(str(folder), timers=False)


async def test_corrupt_file_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "conveyor.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(errors.StoreCorrupt, match=r"conveyor\.db"):
        await Broker.open(str(folder), timers=False)


async def test_session_leases_come_back_at_restart_timed_leases_do_not(tmp_path: Path) -> None:
    folder = str(tmp_path / "d")
    broker = await Broker.open(folder, timers=False)
    await broker.declare_queue("q", QueueOptions(visibility_timeout=600))
    await broker.send_batch("q", [NewMessage(body=b"amqp"), NewMessage(body=b"sqs")])
    (held,) = await broker.receive("q", 1, visibility_timeout=1800, session=True)
    (timed,) = await broker.receive("q", 1)
    assert (held.body, timed.body) == (b"amqp", b"sqs")
    await broker.close()  # as after a crash: nobody acked or released anything

    broker = await Broker.open(folder, timers=False)
    try:
        (back,) = await broker.receive("q", 10)
        assert back.body == b"amqp" and back.receive_count == 2
        stats = await broker.stats("q")
        assert (stats.ready, stats.in_flight) == (0, 2)
    finally:
        await broker.close()


async def test_max_queues_limit() -> None:
    broker = await Broker.open("memory://", timers=False, max_queues=2)
    try:
        await broker.declare_queue("a")
        await broker.declare_queue("b")
        await broker.declare_queue("a")  # existing: no new queue
        with pytest.raises(errors.LimitExceeded, match="at most 2 queues"):
            await broker.declare_queue("c")
        assert [q.name for q in await broker.list_queues()] == ["a", "b"]
    finally:
        await broker.close()


def test_processes_opening_and_declaring_at_once(tmp_path: Path) -> None:
    """Several processes on one new directory: no 'database is locked', no duplicate
    queue, no raw sqlite error."""
    import subprocess
    import sys

    code = (
        "import sys, conveyor\n"
        "mq = conveyor.connect(sys.argv[1])\n"
        "mq.queue('shared', visibility_timeout=7)\n"
        "mq.queue('shared').send(b'x')\n"
        "mq.close()\n"
    )
    folder = str(tmp_path / "d")
    procs = [subprocess.Popen([sys.executable, "-c", code, folder]) for _ in range(5)]
    assert [p.wait(60) for p in procs] == [0] * 5

    async def check() -> None:
        broker = await Broker.open(folder, timers=False)
        try:
            assert [q.name for q in await broker.list_queues()] == ["shared"]
            assert (await broker.stats("shared")).ready == 5
        finally:
            await broker.close()

    asyncio.run(check())


async def test_two_processes_on_one_directory_see_each_other(tmp_path: Path) -> None:
    """Two brokers on one directory stand for two programs sharing it: a send by one
    wakes a long poll of the other (on its next timer round), and an exchange declared
    by one can be published to through the other."""
    folder = str(tmp_path / "d")
    a = await Broker.open(folder)
    b = await Broker.open(folder)
    try:
        await a.declare_queue("q")
        await b.declare_queue("q")
        loop = asyncio.get_running_loop()
        started = loop.time()
        poll = asyncio.create_task(b.receive("q", 1, wait=10))
        await asyncio.sleep(0.2)
        await a.send("q", NewMessage(body=b"from a"))
        (got,) = await asyncio.wait_for(poll, 5)
        assert got.body == b"from a"
        assert loop.time() - started < 3  # a timer round (at most 1 s) after the send

        await a.declare_exchange("events", "fanout")
        await a.bind("events", "q")
        assert (await b.publish("events", NewMessage(body=b"via b"))).routed == 1
    finally:
        await a.close()
        await b.close()
