"""Removal policies for finished jobs' records (remove_on_complete / remove_on_fail),
with real workers against memory:// and a data directory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.jobs import App, JobFailed, NonRetryableError, Worker, adrain
from conveyor.jobs.retention import Policy, parse, remove_queue_options


@pytest.fixture(params=["memory", "dir"])
async def app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[App]:
    url = "memory://" if request.param == "memory" else str(tmp_path / "data")
    a = App("t", url=url, visibility_timeout=2.0)
    await a.astart()
    yield a
    await a.aclose()


async def status_queues(app: App) -> set[str]:
    infos = await app.runtime().conn.queues(prefix=f"{app.name}.job.")
    return {i.name.removeprefix(f"{app.name}.job.") for i in infos}


async def readable(app: App, ids: list[str]) -> list[str]:
    """The states of ``ids`` ("pending" when the record is gone)."""
    return [await app.job(i).astate() for i in ids]


async def test_keep_last_n_completed(app: App) -> None:
    @app.task(queue="k", remove_on_complete=3)
    async def double(x: int) -> int:
        return 2 * x

    jobs = [await double.aenqueue(i) for i in range(10)]
    # One at a time, so "newest" is the enqueue order.
    w = Worker(app, concurrency=1, burst=True, schedules=False)
    await w.arun()
    assert w.processed == 10
    assert await status_queues(app) == {j.id for j in jobs[7:]}
    assert [await j.aresult(timeout=1) for j in jobs[7:]] == [14, 16, 18]
    assert await readable(app, [j.id for j in jobs[:7]]) == ["pending"] * 7
    index = await app.runtime().conn.get_queue(app.names.keep("completed", double.name))
    assert (await index.stats()).ready == 3
    # Five more: the window slides.
    more = [await double.aenqueue(i) for i in range(10, 15)]
    await Worker(app, concurrency=1, burst=True, schedules=False).arun()
    assert await status_queues(app) == {j.id for j in more[2:]}
    # A removed record reads as "pending": result() waits (for a run that may come).
    with pytest.raises(TimeoutError):
        await jobs[0].aresult(timeout=0.3)


async def test_completed_and_failed_are_kept_independently(app: App) -> None:
    @app.task(queue="mix", max_attempts=1, remove_on_complete=2, remove_on_fail=1)
    async def maybe(x: int) -> int:
        if x % 2:
            raise NonRetryableError(f"odd {x}")
        return x

    jobs = [await maybe.aenqueue(i) for i in range(10)]
    w = Worker(app, concurrency=1, burst=True, schedules=False)
    await w.arun()
    assert (w.processed, w.failed) == (5, 5)
    ok, bad = jobs[0::2], jobs[1::2]
    assert await status_queues(app) == {ok[3].id, ok[4].id, bad[4].id}
    assert [await j.aresult(timeout=1) for j in ok[3:]] == [6, 8]
    with pytest.raises(JobFailed, match="odd 9"):
        await bad[4].aresult(timeout=1)
    assert await readable(app, [j.id for j in ok[:3] + bad[:4]]) == ["pending"] * 7
    # The failed queue (for retry_failed) is the dead-letter queue: not trimmed.
    assert len(await app.afailed("mix")) == 5


async def test_app_defaults_and_task_overrides(tmp_path: Path) -> None:
    app = App("d", url="memory://", remove_on_complete=2, remove_on_fail=True)

    @app.task(queue="q", max_attempts=1)
    async def default(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x

    @app.task(queue="q", remove_on_complete=False)
    async def keep_all(x: int) -> int:
        return x

    try:
        a = [await default.aenqueue(i) for i in range(5)]
        b = [await keep_all.aenqueue(i) for i in range(5)]
        f = await default.aenqueue(-1)
        await Worker(app, concurrency=1, burst=True, schedules=False).arun()
        # Per task: the newest 2 of `default`, all of `keep_all`, no failed record.
        assert await status_queues(app) == {j.id for j in a[3:] + b}
        assert await f.astate() == "pending"
    finally:
        await app.aclose()


async def test_keep_for_an_age(app: App) -> None:
    @app.task(queue="age", remove_on_complete=0.4)
    async def quick(x: int) -> int:
        return x

    @app.task(queue="age", remove_on_complete=0)
    async def gone(x: int) -> int:
        return x

    j1 = await quick.aenqueue(1)
    j2 = await gone.aenqueue(2)
    await adrain(app)
    assert await j1.aresult(timeout=1) == 1
    assert j2.id not in await status_queues(app)  # 0: removed at once
    await asyncio.sleep(0.6)
    assert await j1.astate() == "pending"


async def test_a_job_run_again_keeps_its_new_record(app: App) -> None:
    allow: list[int] = []

    @app.task(queue="again", max_attempts=1, remove_on_fail=1)
    async def flaky(x: int) -> int:
        if x not in allow:
            raise NonRetryableError(f"not yet {x}")
        return x

    a = await flaky.aenqueue(1)
    await adrain(app)
    assert await a.astate() == "failed"
    allow.append(1)
    assert await app.runtime().acall(app._retry_failed("again", None)) == 1
    await adrain(app)
    assert await a.aresult(timeout=1) == 1
    # A second failure pushes a's failure entry out of the index; a's record is now
    # the completed one, which that entry must not remove.
    b = await flaky.aenqueue(2)
    await adrain(app)
    assert await b.astate() == "failed"
    assert await a.aresult(timeout=1) == 1


async def test_two_workers_keep_exactly_n(app: App, tmp_path: Path) -> None:
    """Two workers (on the directory: two separate connections, as two processes
    would have) finishing jobs concurrently still leave exactly N records."""
    second = app if app.url == "memory://" else App("t", url=app.url, visibility_timeout=2.0)

    def register(a: App) -> Any:
        @a.task(name="t.work", queue="two", remove_on_complete=4)
        async def work(x: int) -> int:
            await asyncio.sleep(0.01)
            return x

        return work

    work = register(app)
    if second is not app:
        register(second)
        await second.astart()
    try:
        jobs = [await work.aenqueue(i) for i in range(30)]
        stop = asyncio.Event()
        ws = [Worker(a, concurrency=4, schedules=False, poll=0.1) for a in (app, second)]
        runs = [asyncio.create_task(w.arun(stop)) for w in ws]
        rq = await app.runtime().queue(app.names.remove_queue(), remove_queue_options())
        deadline = time.monotonic() + 10
        left: set[str] = set()
        while time.monotonic() < deadline:
            left = await status_queues(app)
            s = await rq.stats()
            drained = s.ready + s.in_flight == 0
            if sum(w.processed for w in ws) == 30 and drained and len(left) == 4:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*runs)
        assert all(w.processed > 0 for w in ws) or second is app
        done = [await app.job(i).arecord() for i in left]
        assert len(left) == 4, left
        assert all(r is not None and r.state == "completed" for r in done)
        assert sum(1 for j in jobs if j.id in left) == 4
    finally:
        if second is not app:
            await second.aclose()


def test_policy_values() -> None:
    assert parse(None, "x") is None
    assert parse(5, "x") == Policy(count=5)
    assert parse(True, "x") == Policy(count=0)
    assert parse(False, "x") == Policy()
    assert parse(2.5, "x") == Policy(age=2.5)
    for bad in (-1, 0.0, float("nan"), -3.0):
        with pytest.raises(ValueError):
            parse(bad, "x")
    with pytest.raises(TypeError):
        parse("3", "x")  # type: ignore[arg-type]
    app = App("v", url="memory://")
    with pytest.raises(ValueError):
        app.task(remove_on_fail=-2)


async def test_behind_a_server(tmp_path: Path) -> None:
    """The same policies over http:// (only the client API is used)."""
    from serverproc import ServerProcess

    with ServerProcess(tmp_path, amqp=False) as srv:
        app = App("s", url=srv.http_url)

        @app.task(queue="q", max_attempts=1, remove_on_complete=2, remove_on_fail=1)
        async def maybe(x: int) -> int:
            if x % 2:
                raise NonRetryableError(f"odd {x}")
            return x

        try:
            jobs = [await maybe.aenqueue(i) for i in range(8)]
            await Worker(app, concurrency=1, burst=True, schedules=False).arun()
            ok, bad = jobs[0::2], jobs[1::2]
            assert await status_queues(app) == {ok[2].id, ok[3].id, bad[3].id}
            assert await ok[3].aresult(timeout=2) == 6
        finally:
            await app.aclose()
