"""Wake-ups for long polls and push consumers.

A receiver registers a future *before* it tries to lease, so a send that commits in
between is never missed. A commit that makes n messages ready wakes at most n
waiters (oldest first) instead of every waiter; a waiter that was woken but leaves
without leasing (timeout, cancel) hands its wake-up on, so nothing is left sleeping
beside a ready message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class Waiters:
    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def register(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._q.append(fut)
        return fut

    def discard(self, fut: asyncio.Future[None]) -> None:
        """The receiver is done with ``fut``; pass on a wake-up it did not use."""
        woken = fut.done() and not fut.cancelled()
        if not fut.done():
            fut.cancel()
        with contextlib.suppress(ValueError):  # already popped by notify()
            self._q.remove(fut)
        if woken:
            self.notify(1)

    def notify(self, n: int = 1) -> None:
        while n > 0 and self._q:
            fut = self._q.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1

    def notify_all(self) -> None:
        while self._q:
            fut = self._q.popleft()
            if not fut.done():
                fut.set_result(None)
