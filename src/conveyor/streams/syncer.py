"""Group commit for streams: one thread fsyncs log files and commits the metadata
database for everything submitted since its last round.

A caller submits a job (a function run on the thread, given the round) and awaits it;
the round runs every job, then fsyncs each file descriptor the jobs named once,
commits the database once, and only then resolves every caller. So a produce is
acknowledged after its bytes are durable, and many produces share one fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from conveyor.errors import ClosedError

log = logging.getLogger("conveyor.streams")

T = TypeVar("T")

_SYNC = {"fsync": "FULL", "os": "NORMAL", "none": "OFF"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS offsets (
    grp TEXT NOT NULL, topic TEXT NOT NULL, part INTEGER NOT NULL,
    "offset" INTEGER NOT NULL, metadata TEXT, committed_at REAL NOT NULL,
    PRIMARY KEY (grp, topic, part)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS bridges (id TEXT PRIMARY KEY, spec TEXT NOT NULL) WITHOUT ROWID;
"""


class Round:
    __slots__ = ("db", "fds")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.fds: set[int] = set()

    def fsync(self, fds: list[int]) -> None:
        self.fds.update(fds)


class _Fsync:
    """A job that only names files to fsync: no database work, so a round made of
    these (every produce at ``fsync``) skips SQLite's BEGIN/SAVEPOINT/COMMIT."""

    __slots__ = ("fds",)

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds

    def __call__(self, rnd: Round) -> None:
        rnd.fds.update(self.fds)


_Job = tuple[Callable[[Round], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class Syncer:
    def __init__(self, db_path: Path | None, durability: str) -> None:
        self.durability = durability
        self._db_path = db_path
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="conveyor-streams", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    async def run(self, fn: Callable[[Round], T]) -> T:
        if self._closed:
            raise ClosedError("the stream engine is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, loop, fut))
        return await fut

    async def fsync(self, fds: list[int]) -> None:
        """Return once these files were fsynced (shares the round's fsyncs)."""
        await self.run(_Fsync(fds))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _main(self) -> None:
        try:
            db = sqlite3.connect(
                str(self._db_path) if self._db_path else ":memory:",
                isolation_level=None,
                check_same_thread=False,
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={_SYNC[self.durability]}")
            db.executescript(SCHEMA)
        except BaseException as exc:  # reported to the opener
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        stop = False
        try:
            while not stop:
                first = self._queue.get()
                if first is None:
                    break
                jobs = [first]
                while len(jobs) < 5000:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    jobs.append(nxt)
                self._round(db, jobs)
        finally:
            db.close()

    def _round(self, db: sqlite3.Connection, jobs: list[_Job]) -> None:
        rnd = Round(db)
        outcomes: list[tuple[bool, Any]] = []
        use_db = not all(isinstance(fn, _Fsync) for fn, _, _ in jobs)
        if use_db:
            db.execute("BEGIN")
        for fn, _, _ in jobs:
            if isinstance(fn, _Fsync):
                rnd.fds.update(fn.fds)
                outcomes.append((True, None))
                continue
            try:
                db.execute("SAVEPOINT job")
                outcomes.append((True, fn(rnd)))
                db.execute("RELEASE job")
            except Exception as exc:
                db.execute("ROLLBACK TO job")
                db.execute("RELEASE job")
                outcomes.append((False, exc))
        failure: BaseException | None = None
        try:
            if use_db:
                db.execute("COMMIT")
            if self.durability == "fsync":
                for fd in rnd.fds:
                    os.fsync(fd)
        except Exception as exc:
            log.exception("stream group commit failed")
            failure = exc
        for (_, loop, fut), (ok, value) in zip(jobs, outcomes, strict=True):
            if failure is not None:
                ok, value = False, failure
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                loop.call_soon_threadsafe(_settle, fut, ok, value)


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)
