"""Group commit: one writer thread runs every caller's script in one transaction.

Callers on the event loop submit scripts; the writer takes everything queued since its
last round, runs each script inside a savepoint (so one failing script rolls back only
itself), commits once, then resolves every caller's future. Nobody waits for a commit
of their own, and a result is only seen after it is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from conveyor.errors import ClosedError, ConveyorError, StoreError, StoreFull
from conveyor.logutil import Throttle

log = logging.getLogger("conveyor.store")
#: A full disk fails every commit: one WARNING line a second, not a traceback each.
_full_log = Throttle()

TxT = TypeVar("TxT")
T = TypeVar("T")

#: Upper bound on scripts per transaction, so one round cannot grow without limit.
MAX_ROUND = 2000


class Backend(Protocol[TxT]):
    """What the writer needs from a database dialect."""

    def prepare(self, relaxed: bool) -> None:
        """Called before each round: ``relaxed`` when every script in it may lose its
        effect on power loss (see Store.run); the backend may then commit without
        waiting for the disk."""
        ...

    def begin(self) -> TxT: ...
    def savepoint(self) -> None: ...
    def release(self) -> None: ...
    def rollback_savepoint(self) -> None: ...
    def snapshot(self, tx: TxT) -> Any: ...
    def restore(self, tx: TxT, snap: Any) -> None: ...
    def commit(self, tx: TxT) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...
    def translate(self, exc: Exception) -> ConveyorError: ...


class _Job(Generic[TxT]):
    __slots__ = ("fut", "loop", "relaxed", "script")

    def __init__(
        self,
        script: Callable[[TxT], Any],
        loop: asyncio.AbstractEventLoop,
        fut: asyncio.Future[Any],
        relaxed: bool = False,
    ) -> None:
        self.script = script
        self.loop = loop
        self.fut = fut
        self.relaxed = relaxed


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():  # the caller was cancelled; the work is committed regardless
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class GroupCommitWriter(Generic[TxT]):
    def __init__(self, backend: Backend[TxT], name: str = "conveyor-writer") -> None:
        self._backend = backend
        self._queue: queue.SimpleQueue[_Job[TxT] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    async def run(self, script: Callable[[TxT], T], relaxed: bool = False) -> T:
        if self._closed:
            raise ClosedError("the store is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(script, loop, fut, relaxed))
        return await fut

    def close(self) -> None:
        """Finish everything already submitted, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _main(self) -> None:
        stop = False
        try:
            while not stop:
                first = self._queue.get()
                if first is None:
                    break
                jobs = [first]
                # empty() first: the writer is the only consumer, so get_nowait() then
                # cannot fail, and no queue.Empty is raised at the end of every round
                # (an exception per round was a measurable share of a lone request).
                while len(jobs) < MAX_ROUND and not self._queue.empty():
                    nxt = self._queue.get_nowait()
                    if nxt is None:
                        stop = True
                        break
                    jobs.append(nxt)
                self._round(jobs)
        finally:
            try:
                self._backend.close()
            except Exception:  # closing a broken connection must not hide the real error
                log.exception("closing the store failed")

    def _round(self, jobs: list[_Job[TxT]]) -> None:
        backend = self._backend
        outcomes: list[tuple[bool, Any]] = []
        try:
            backend.prepare(all(job.relaxed for job in jobs))
            tx = backend.begin()
        except Exception as exc:
            failure = backend.translate(exc)
            _deliver(jobs, [(False, failure)] * len(jobs))
            return
        # A savepoint per script lets one failing script roll back alone; a round of one
        # script needs none (its failure rolls back the whole transaction instead).
        alone = len(jobs) == 1
        for job in jobs:
            snap = backend.snapshot(tx)
            try:
                if alone:
                    value = job.script(tx)
                else:
                    backend.savepoint()
                    value = job.script(tx)
                    backend.release()
                outcomes.append((True, value))
            except Exception as exc:
                try:
                    if alone:
                        backend.rollback()
                        tx = backend.begin()
                    else:
                        backend.rollback_savepoint()
                except Exception:
                    log.exception("rolling back a failed script failed")
                backend.restore(tx, snap)
                if isinstance(exc, ConveyorError):
                    outcomes.append((False, exc))
                else:
                    failure = backend.translate(exc)
                    if isinstance(failure, StoreFull):
                        _full_log.log(log, logging.WARNING, "script", "write refused: %s", failure)
                    else:
                        log.exception("store script failed")
                    outcomes.append((False, failure))
        try:
            backend.commit(tx)
        except Exception as exc:
            err: ConveyorError = backend.translate(exc)
            if isinstance(err, StoreFull):
                _full_log.log(log, logging.WARNING, "commit", "commit refused: %s", err)
            else:
                log.exception("commit failed")
            try:
                backend.rollback()
            except Exception:
                log.exception("rollback failed")
            if not isinstance(err, StoreError):
                err = StoreError(str(exc))
            outcomes = [(False, err)] * len(jobs)
        _deliver(jobs, outcomes)


def _deliver(jobs: list[_Job[Any]], outcomes: list[tuple[bool, Any]]) -> None:
    """Hand every job's outcome back to its loop: one wake-up per loop per round, not
    one per job (each wake-up is a write to the loop's self-pipe and a context switch
    on its side; under load a round holds hundreds of jobs from one loop)."""
    if len(jobs) == 1:  # a lone request: no grouping to do
        with contextlib.suppress(RuntimeError):
            jobs[0].loop.call_soon_threadsafe(_settle, jobs[0].fut, *outcomes[0])
        return
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for job, (ok, value) in zip(jobs, outcomes, strict=True):
        by_loop.setdefault(job.loop, []).append((job.fut, ok, value))
    for loop, settled in by_loop.items():
        # RuntimeError: the caller's loop has closed; there is no one to tell.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle_all, settled)


def _settle_all(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in settled:
        _settle(fut, ok, value)
