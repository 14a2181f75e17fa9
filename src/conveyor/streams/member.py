"""What a consumer-group member holds on the client side, embedded or remote.

AsyncStreamConsumer (streams/client.py) and RemoteStreamConsumer (streams/remote.py)
share this state and these conveniences; each brings its own join, poll, commit and
close (in-process calls to the engine, or HTTP).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Self

from conveyor.streams.engine import StreamRecord


class GroupMember:
    def __init__(self, stream: Any, group: str, from_start: bool, session_timeout: float) -> None:
        self.stream = stream
        self.group = group
        self.from_start = from_start
        self.session_timeout = session_timeout
        self.member_id = ""
        self.generation = -1
        self.assignment: list[int] = []
        self.positions: dict[int, int] = {}
        #: Index into the assignment of the partition to read first (round robin).
        self._next = 0

    async def join(self) -> None:
        raise NotImplementedError

    async def poll(self, max_records: int = 100, wait: float = 1.0) -> list[StreamRecord]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.join()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[StreamRecord]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StreamRecord]:
        while True:
            for r in await self.poll():
                yield r
