"""What a running job can ask about itself: ``current_job()``."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_current: contextvars.ContextVar[JobContext] = contextvars.ContextVar("conveyor_job")


@dataclass
class JobContext:
    id: str
    task: str
    queue: str
    #: 1 for the first run; counts retries and runs cut short by a dead worker.
    attempt: int
    max_attempts: int
    #: Results of a flow parent's children, in the order they were given.
    children_results: list[Any] = field(default_factory=list)
    #: For a job a schedule enqueued: the schedule's name and the tick (epoch seconds).
    schedule: str | None = None
    tick: float | None = None
    _report: Callable[[Any], None] | None = None

    def progress(self, value: Any) -> None:
        """Report progress (any JSON value): stored with the job and sent as an event.
        Safe from async code, threads and sync code alike; returns at once."""
        if self._report is not None:
            self._report(value)


def current_job() -> JobContext:
    """The job running in this task/thread; LookupError outside a job."""
    try:
        return _current.get()
    except LookupError:
        raise LookupError("current_job() called outside a running job") from None


def set_current(ctx: JobContext) -> contextvars.Token[JobContext]:
    return _current.set(ctx)


def reporter(loop: asyncio.AbstractEventLoop, fn: Callable[[Any], None]) -> Callable[[Any], None]:
    """Make ``fn`` (which must run on ``loop``) callable from any thread."""

    def report(value: Any) -> None:
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:
            fn(value)
        else:
            loop.call_soon_threadsafe(fn, value)

    return report
