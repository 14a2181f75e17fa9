"""Helpers for testing code that enqueues jobs.

``drain(app)`` runs a real worker in this process until every queue of the app is empty
(delayed retries included), then returns. Jobs go through the broker and the serializer
exactly as in production -- there is no eager mode -- so a test catches arguments that
do not serialize, tasks that are not registered, retry and failure handling.

    def test_signup(tmp_path):
        app.connect(f"{tmp_path}/data")
        signup("ann@example.com")          # enqueues send_welcome
        result = drain(app)
        assert result.processed == 1 and outbox == ["ann@example.com"]
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from conveyor.jobs.app import App
from conveyor.jobs.worker import Worker


@dataclass
class DrainResult:
    processed: int
    failed: int


async def adrain(
    app: App, queues: list[str] | None = None, *, timeout: float = 60.0, concurrency: int = 8
) -> DrainResult:
    """Run jobs until the app's queues are empty; TimeoutError after ``timeout`` s."""
    w = Worker(app, queues, concurrency=concurrency, burst=True, schedules=False)
    stop = asyncio.Event()
    run = asyncio.ensure_future(w.arun(stop))
    try:
        await asyncio.wait_for(asyncio.shield(run), timeout)
    except TimeoutError:
        stop.set()
        await run
        raise TimeoutError(f"jobs still queued after {timeout} s") from None
    return DrainResult(w.processed, w.failed)


def drain(
    app: App, queues: list[str] | None = None, *, timeout: float = 60.0, concurrency: int = 8
) -> DrainResult:
    """Blocking ``adrain`` (uses the app's connection; call outside its event loop)."""
    rt = app.runtime()
    return rt.call(adrain(app, queues, timeout=timeout, concurrency=concurrency))
