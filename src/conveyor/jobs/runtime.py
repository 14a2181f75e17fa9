"""Where job code talks to conveyor: one event loop and one AsyncConnection per App.

Every job operation runs as a coroutine on that loop. Async callers on the same loop
await it directly; callers on another loop or thread hand it over (so a blocking
program, a thread-pool task and an asyncio service can share one App, and one
``memory://`` database).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from conveyor.client.aio import AsyncConnection, AsyncQueue, connect_async
from conveyor.errors import QueueExists
from conveyor.model import QueueOptions

T = TypeVar("T")


class Runtime:
    def __init__(self, loop: asyncio.AbstractEventLoop, conn: AsyncConnection) -> None:
        self.loop = loop
        self.conn = conn
        self._thread: threading.Thread | None = None
        self._queues: dict[str, AsyncQueue] = {}
        self._exchanges: set[str] = set()
        self.owns_connection = False

    # -- construction ----------------------------------------------------------------
    @classmethod
    async def open_here(cls, url: str, **kw: Any) -> Runtime:
        rt = cls(asyncio.get_running_loop(), await connect_async(url, **kw))
        rt.owns_connection = True
        return rt

    @classmethod
    def open_in_thread(cls, url: str, **kw: Any) -> Runtime:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="conveyor-jobs", daemon=True)
        thread.start()
        try:
            conn = asyncio.run_coroutine_threadsafe(connect_async(url, **kw), loop).result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            raise
        rt = cls(loop, conn)
        rt._thread = thread
        rt.owns_connection = True
        return rt

    # -- running coroutines ------------------------------------------------------------
    def here(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run on the runtime's loop from blocking code."""
        if self.here():
            coro.close()
            raise RuntimeError(
                "a blocking job call was made on the event loop that runs the jobs;"
                " use the async variant (aenqueue, aresult, ...) there"
            )
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("the event loop of this App's connection is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def acall(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run on the runtime's loop from async code (any loop)."""
        if self.here():
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def close(self) -> None:
        if self.owns_connection:
            await self.conn.close()

    def close_blocking(self) -> None:
        if self._thread is not None:
            try:
                if self.owns_connection:
                    asyncio.run_coroutine_threadsafe(self.conn.close(), self.loop).result()
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join()
                self.loop.close()
                self._thread = None

    # -- cached declarations (on the runtime's loop) ------------------------------------
    async def queue(self, name: str, options: dict[str, Any] | None = None) -> AsyncQueue:
        q = self._queues.get(name)
        if q is None:
            try:
                q = await self.conn.queue(name, **(options or {}))
            except QueueExists:
                # Declared elsewhere with other options (an older setting): use it as is.
                q = await self.conn.get_queue(name)
            self._queues[name] = q
        return q

    async def queue_updated(self, name: str, options: dict[str, Any]) -> AsyncQueue:
        """Like ``queue``, but a queue declared with other options (an older setting) is
        updated to ``options`` (the first time this runtime uses it)."""
        q = self._queues.get(name)
        if q is None:
            try:
                q = await self.conn.queue(name, **options)
            except QueueExists:
                q = await self.conn.get_queue(name)
                await q.update(**options)
            self._queues[name] = q
        return q

    def forget(self, name: str) -> None:
        self._queues.pop(name, None)

    async def exchange(self, name: str, type: str) -> None:
        if name not in self._exchanges:
            await self.conn.exchange(name, type)
            self._exchanges.add(name)


def queue_options(**kw: Any) -> dict[str, Any]:
    """Validate option names early (a typo should fail at definition, not at send)."""
    unknown = set(kw) - set(QueueOptions.__struct_fields__)
    if unknown:
        raise ValueError(f"unknown queue option(s): {', '.join(sorted(unknown))}")
    return kw
