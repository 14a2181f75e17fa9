"""conveyor.jobs with real workers against memory:// and a data directory."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from conveyor.jobs import (
    App,
    Flow,
    JobFailed,
    NonRetryableError,
    Retry,
    Worker,
    adrain,
    chain,
    chord,
    current_job,
    debounce,
    drain,
    fixed,
    simple,
    throttle,
)
from conveyor.jobs.cron import Cron


@pytest.fixture(params=["memory", "dir"])
async def app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[App]:
    url = "memory://" if request.param == "memory" else str(tmp_path / "data")
    a = App("t", url=url, visibility_timeout=2.0)
    await a.astart()
    yield a
    await a.aclose()


@dataclass
class Point:
    x: int
    y: int


class Box(msgspec.Struct):
    label: str
    points: list[Point]


async def test_enqueue_typed_args_and_result(app: App) -> None:
    @app.task(queue="math")
    async def area(box: Box, scale: float = 1.0) -> dict[str, float]:
        assert isinstance(box.points[0], Point)
        w = box.points[1].x - box.points[0].x
        h = box.points[1].y - box.points[0].y
        return {box.label: w * h * scale}

    @app.task(queue="math")
    def shout(word: str) -> str:  # sync: runs in the thread pool
        return word.upper()

    job = await area.aenqueue(Box("a", [Point(0, 0), Point(3, 4)]), scale=2.0)
    job2 = await shout.aenqueue("hi")
    assert await job.astate() == "pending"
    assert (await adrain(app)).processed == 2
    assert await job.aresult(timeout=5) == {"a": 24.0}
    assert await job2.aresult(timeout=5) == "HI"
    assert await job.astate() == "completed"


async def test_result_waits_for_a_running_worker(app: App) -> None:
    @app.task(queue="w")
    async def later(x: int) -> int:
        await asyncio.sleep(0.2)
        return x * 2

    stop = asyncio.Event()
    run = asyncio.create_task(Worker(app, concurrency=4).arun(stop))
    jobs = [await later.aenqueue(i) for i in range(5)]
    assert [await j.aresult(timeout=10) for j in jobs] == [0, 2, 4, 6, 8]
    stop.set()
    await run


async def test_retries_backoff_then_failed_queue(app: App) -> None:
    attempts: list[int] = []

    @app.task(queue="r", max_attempts=3, backoff=fixed(0.1))
    def flaky() -> None:
        attempts.append(current_job().attempt)
        raise ValueError("nope")

    @app.task(queue="r", max_attempts=5)
    def fatal() -> None:
        raise NonRetryableError("bad input")

    @app.task(queue="r", max_attempts=3)
    def retry_then_ok() -> str:
        if current_job().attempt < 2:
            raise Retry("later", delay=0.05)
        return "ok"

    @app.task(queue="r", max_attempts=1, timeout=0.1)
    async def too_slow() -> None:
        await asyncio.sleep(5)

    t0 = time.monotonic()
    j1, j2, j3, j4 = [await t.aenqueue() for t in (flaky, fatal, retry_then_ok, too_slow)]
    res = await adrain(app)
    assert time.monotonic() - t0 >= 0.15  # two backoffs of ~0.1 s (jitter 0)
    assert attempts == [1, 2, 3]
    assert (res.processed, res.failed) == (1, 3)
    assert await j3.aresult(1) == "ok"
    with pytest.raises(JobFailed) as e:
        await j1.aresult(1)
    assert e.value.error_type == "ValueError" and "nope" in (e.value.traceback or "")
    failed = {f.job_id: f for f in await app.afailed("r")}
    assert failed[j1.id].attempts == 3 and "ValueError: nope" in failed[j1.id].traceback
    assert failed[j2.id].attempts == 1 and failed[j2.id].error_type == "NonRetryableError"
    assert failed[j4.id].error_type == "JobTimeout"
    rt = app.runtime()
    assert await rt.acall(app._retry_failed("r", None)) == 3
    assert (await adrain(app)).failed == 3  # they fail again, with fresh attempts


async def test_events_and_progress(app: App) -> None:
    @app.task(queue="e", max_attempts=2, backoff=fixed(0.01))
    async def work(n: int) -> int:
        current_job().progress({"done": 50})
        if n == 0 and current_job().attempt == 1:
            raise RuntimeError("first try fails")
        return n

    async with app.subscribe("e") as sub:
        j0 = await work.aenqueue(0)
        await work.aenqueue(1)
        await adrain(app)
        seen: list[Any] = []
        while len([e for e in seen if e.event == "completed"]) < 2:
            got = await sub.get(wait=2)
            assert got, f"events missing: {seen}"
            seen += got
    kinds = sorted({(e.job_id == j0.id, e.event) for e in seen})
    assert (True, "retried") in kinds and (True, "progress") in kinds
    assert [e.result_value() for e in seen if e.event == "completed"] in ([0, 1], [1, 0])
    rec = await j0.arecord()
    assert rec is not None and rec.progress == {"done": 50} and rec.attempts == 2


async def test_priority_delay_job_id_and_bulk(app: App) -> None:
    order: list[str] = []

    @app.task(queue="p")
    def note(tag: str) -> None:
        order.append(tag)

    await note.with_options(delay=0.3).aenqueue("delayed")
    await note.with_options(priority=1).aenqueue("low")
    await note.with_options(priority=9).aenqueue("high")
    first = await note.with_options(job_id="order-7").aenqueue("once")
    again = await note.with_options(job_id="order-7").aenqueue("twice")
    assert not first.deduplicated and again.deduplicated
    bulk = await app.aenqueue_many([note.s(f"b{i}") for i in range(3)])
    assert len({j.id for j in bulk}) == 3
    await adrain(app, concurrency=1)
    assert order[0] == "high" and order[-1] == "delayed"
    assert order.count("once") == 1 and "twice" not in order


async def test_dedup_simple_throttle_debounce(app: App) -> None:
    runs: list[str] = []

    @app.task(queue="d")
    def act(tag: str) -> str:
        runs.append(tag)
        return tag

    a = await act.with_options(dedup=simple("k")).aenqueue("s1")
    b = await act.with_options(dedup=simple("k")).aenqueue("s2")
    assert b.deduplicated and b.id == a.id
    await adrain(app)
    c = await act.with_options(dedup=simple("k")).aenqueue("s3")  # released after a ran
    assert not c.deduplicated
    t1 = await act.with_options(dedup=throttle("t", 60)).aenqueue("t1")
    t2 = await act.with_options(dedup=throttle("t", 60)).aenqueue("t2")
    assert not t1.deduplicated and t2.deduplicated
    d = [await act.with_options(dedup=debounce("db", 0.3)).aenqueue(f"d{i}") for i in range(3)]
    await adrain(app)
    assert sorted(runs) == ["d2", "s1", "s3", "t1"]
    assert await d[0].astate() == "debounced" and await d[2].astate() == "completed"


async def test_flows_chain_chord_and_child_failure(app: App) -> None:
    @app.task(queue="f")
    def num(x: int) -> int:
        return x

    @app.task(queue="f")
    def add(values: list[int], extra: int) -> int:
        return sum(values) + extra

    @app.task(queue="f")
    def double(x: int) -> int:
        return 2 * x

    @app.task(queue="f")
    def report() -> list[Any]:
        return current_job().children_results

    @app.task(queue="f", max_attempts=1)
    def broken() -> None:
        raise ValueError("child broke")

    ch = await chain(num.s(3), double.s(), double.s()).aenqueue()
    co = await chord([num.s(i) for i in range(5)], add.s(100)).aenqueue()
    fl = await Flow(report.s(), [num.s(7), chord([num.s(1), num.s(2)], add.s(0))]).aenqueue()
    bad = await Flow(report.s(), [num.s(1), broken.s()]).aenqueue()
    await adrain(app)
    assert await ch.aresult(5) == 12
    assert await co.aresult(5) == 110
    assert await fl.aresult(5) == [7, 3]
    with pytest.raises(JobFailed, match="child broke"):
        await bad.aresult(5)


async def test_rate_limit_holds_across_workers(app: App) -> None:
    app.queue("limited", rate_limit="4/0.5s", visibility_timeout=2.0)
    starts: list[float] = []

    @app.task(queue="limited", keep_result=False)
    async def tick() -> None:
        starts.append(time.monotonic())

    for _ in range(10):
        await tick.aenqueue()
    stop = asyncio.Event()
    workers = [asyncio.create_task(Worker(app, concurrency=8).arun(stop)) for _ in range(2)]
    t0 = time.monotonic()
    while len(starts) < 10 and time.monotonic() - t0 < 10:
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.gather(*workers)
    assert len(starts) == 10
    starts.sort()
    # Any 0.5 s window holds at most 4 starts; 10 jobs need at least two refills.
    for i in range(len(starts) - 4):
        assert starts[i + 4] - starts[i] >= 0.45
    assert starts[-1] - starts[0] >= 0.9


async def test_schedule_once_per_tick_with_two_workers(app: App) -> None:
    ticks: list[float] = []

    @app.task(queue="cron", keep_result=False)
    def beat() -> None:
        tick = current_job().tick
        assert tick is not None
        ticks.append(tick)

    app.schedule("beat", beat.s(), every=0.25)
    stop = asyncio.Event()
    workers = [asyncio.create_task(Worker(app).arun(stop)) for _ in range(3)]
    await asyncio.sleep(1.4)
    stop.set()
    await asyncio.gather(*workers)
    assert len(ticks) == len(set(ticks)) >= 4
    assert all(t % 0.25 == 0 for t in ticks)


def test_cron_expressions() -> None:
    c = Cron("*/15 9-17 * * mon-fri")
    t = 1_700_000_000.0  # Tue 2023-11-14 22:13:20 UTC
    n = c.next_after(t)
    assert time.gmtime(n)[2:5] == (15, 9, 0)  # Wed 09:00
    assert c.next_after(n) - n == 15 * 60
    assert Cron("@daily").next_after(t) % 86400 == 0
    assert Cron("0 0 1 1 *").last_at_or_before(t, horizon=400 * 86400) == 1672531200.0
    with pytest.raises(ValueError):
        Cron("61 * * * *")


async def test_long_job_keeps_its_lease(app: App) -> None:
    runs: list[int] = []

    @app.task(queue="long")
    async def long_job() -> int:
        runs.append(current_job().attempt)
        await asyncio.sleep(2.5)  # longer than the 2 s visibility timeout
        return 1

    job = await long_job.aenqueue()
    stop = asyncio.Event()
    workers = [asyncio.create_task(Worker(app).arun(stop)) for _ in range(2)]
    assert await job.aresult(timeout=10) == 1
    stop.set()
    await asyncio.gather(*workers)
    assert runs == [1]


async def test_graceful_shutdown_releases_unfinished_jobs(app: App) -> None:
    @app.task(queue="g")
    async def quick() -> str:
        await asyncio.sleep(0.05)
        return "done"

    @app.task(queue="g")
    async def forever() -> None:
        await asyncio.sleep(60)

    q = await quick.aenqueue()
    await forever.aenqueue()
    stop = asyncio.Event()
    w = Worker(app, shutdown_timeout=0.3)
    run = asyncio.create_task(w.arun(stop))
    await q.aresult(timeout=5)
    t0 = time.monotonic()
    stop.set()
    await run
    assert time.monotonic() - t0 < 3
    stats = await (await app._job_queue("g")).stats()
    assert (stats.ready, stats.in_flight) == (1, 0)  # released, not lost


def test_sync_api_and_drain_helper(tmp_path: Path) -> None:
    app = App("sync", url=str(tmp_path / "d"), serializer="msgpack")
    seen: list[bytes] = []

    @app.task(queue="s")
    def store(blob: bytes, when: float) -> int:
        seen.append(blob)
        return len(blob)

    with app:
        job = store.enqueue(b"\x00\x01binary", 1.5)
        assert drain(app).processed == 1
        assert job.result(timeout=5) == 8 and seen == [b"\x00\x01binary"]
        assert job.state() == "completed"


def test_worker_in_a_thread_with_blocking_producer(tmp_path: Path) -> None:
    app = App("thr", url=str(tmp_path / "d"))

    @app.task(queue="t")
    def square(x: int) -> int:
        return x * x

    stop = threading.Event()
    t = threading.Thread(target=Worker(app, concurrency=4).run, args=(stop,))
    t.start()
    try:
        jobs = app.enqueue_many([square.s(i) for i in range(20)])
        assert [j.result(timeout=10) for j in jobs] == [i * i for i in range(20)]
    finally:
        stop.set()
        t.join()
        app.close()
