"""The Python API for streams: ``await conn.stream("orders")`` / ``conn.stream("orders")``.

Embedded connections (a directory, ``sqlite:///dir``, ``memory://``) open the stream
engine next to the store (``<dir>/streams``) on first use and close it with the
connection. Remote (``http://``) connections get the same classes' methods over the
server's ``/v1/streams`` HTTP routes (conveyor.streams.remote).

Group consumption uses the engine's group coordinator with this client's own
protocol type (``conveyor``, range assignment computed by the elected leader), so a
group is either all conveyor consumers or all Kafka consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from conveyor.errors import InvalidArgument
from conveyor.streams.bridges import BridgeManager
from conveyor.streams.engine import PartitionOffsets, StreamEngine, StreamRecord
from conveyor.streams.errors import GroupError, OffsetOutOfRange
from conveyor.streams.groups import NONE, REBALANCE_IN_PROGRESS
from conveyor.streams.member import GroupMember

if TYPE_CHECKING:
    from conveyor.streams.remote import RemoteStream, RemoteStreamConsumer, RemoteStreams

T = TypeVar("T")
Value = bytes | str
_ATTR = "_conveyor_streams"
_BRIDGES = "_conveyor_bridges"
_REMOTE = "_conveyor_remote_streams"


def _bytes(v: Value | None) -> bytes | None:
    if v is None or isinstance(v, bytes):
        return v
    return v.encode()


async def engine_for(conn: Any) -> StreamEngine:
    """The connection's stream engine, opened on first use."""
    engine: StreamEngine | None = getattr(conn, _ATTR, None)
    if engine is not None and not engine.closed:
        return engine
    backend = conn.backend
    store = getattr(backend, "store", None)
    location = getattr(store, "location", None)
    if store is None or location is None:
        raise InvalidArgument(
            "streams are available on embedded connections (a directory, sqlite:// or "
            "memory://); for a server use its /v1/streams HTTP API or a Kafka client"
        )
    durability = getattr(store, "durability", "fsync")
    if location == "memory":
        engine = await StreamEngine.open(None)
    else:
        engine = await StreamEngine.open(f"{location}/streams", durability)
    setattr(conn, _ATTR, engine)
    from conveyor.broker import Broker

    if isinstance(backend, Broker):
        bridges = BridgeManager(engine, backend)
        await bridges.start()
        setattr(conn, _BRIDGES, bridges)
    return engine


async def close_streams(conn: Any) -> None:
    bridges: BridgeManager | None = getattr(conn, _BRIDGES, None)
    if bridges is not None:
        await bridges.close()
    engine: StreamEngine | None = getattr(conn, _ATTR, None)
    if engine is not None:
        await engine.close()
    remote: Any = getattr(conn, _REMOTE, None)
    if remote is not None:
        await remote.close()


def _is_remote(conn: Any) -> bool:
    from conveyor.client.remote import RemoteBroker

    return isinstance(conn.backend, RemoteBroker)


def remote_streams(conn: Any) -> RemoteStreams:
    """The HTTP streams client of a remote (``http://``) connection."""
    from conveyor.streams.remote import RemoteStreams

    api: RemoteStreams | None = getattr(conn, _REMOTE, None)
    if api is None:
        api = RemoteStreams(conn.backend)
        setattr(conn, _REMOTE, api)
    return api


async def bridges_for(conn: Any) -> BridgeApi:
    """What configures bridges on this connection: the in-process manager (embedded)
    or the server's HTTP routes (remote)."""
    if _is_remote(conn):
        return remote_streams(conn)
    await engine_for(conn)
    bridges: BridgeManager | None = getattr(conn, _BRIDGES, None)
    if bridges is None:
        raise InvalidArgument("bridges need a connection with a queue engine")
    return bridges


async def open_stream(
    conn: Any, name: str, partitions: int | None = None, config: dict[str, Any] | None = None
) -> AsyncStream | RemoteStream:
    if _is_remote(conn):
        return await remote_streams(conn).open_stream(name, partitions, config)
    engine = await engine_for(conn)
    await engine.create_topic(name, partitions, config, exist_ok=True)
    return AsyncStream(engine, name, getattr(conn, _BRIDGES, None))


class BridgeApi(Protocol):
    async def feed(
        self, stream: str, queue: str, *, key: str = "header", start: str = "start"
    ) -> Any: ...
    async def unfeed(self, stream: str, queue: str) -> None: ...
    async def bind(
        self,
        exchange: str,
        stream: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> Any: ...
    async def unbind(
        self,
        exchange: str,
        stream: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None: ...
    async def list_bridges(self, stream: str | None = None) -> list[dict[str, Any]]: ...


def _queue_name(queue: Any) -> str:
    return queue if isinstance(queue, str) else str(queue.name)


class AsyncStream:
    def __init__(
        self, engine: StreamEngine, name: str, bridges: BridgeManager | None = None
    ) -> None:
        self.engine = engine
        self.name = name
        self._bridges = bridges
        self._rr = 0

    def __repr__(self) -> str:
        return f"<AsyncStream {self.name!r}>"

    @property
    def partitions(self) -> int:
        return self.engine.get_topic(self.name).partitions

    async def produce(
        self,
        value: Value | None,
        *,
        key: Value | None = None,
        headers: Mapping[str, Value] | Iterable[tuple[str, Value]] | None = None,
        partition: int | None = None,
        timestamp: int | None = None,
    ) -> tuple[int, int]:
        """Append one record; returns (partition, offset) once it is durable."""
        return (
            await self.produce_batch(
                [
                    {
                        "value": value,
                        "key": key,
                        "headers": headers,
                        "partition": partition,
                        "timestamp": timestamp,
                    }
                ]
            )
        )[0]

    async def produce_batch(self, items: Iterable[Mapping[str, Any]]) -> list[tuple[int, int]]:
        """Append records given as dicts with ``value`` and optional ``key``, ``headers``,
        ``partition``, ``timestamp`` (ms). Keys pick partitions as Kafka's default
        partitioner does (murmur2), so Kafka clients agree."""
        from conveyor.streams.records import partition_for

        n = self.partitions
        by_part: dict[int, list[tuple[int, Any]]] = {}
        count = 0
        for i, item in enumerate(items):
            key = _bytes(item.get("key"))
            part = item.get("partition")
            if part is None:
                part = partition_for(key, n, self._rr)
                self._rr += 1
            hdrs = item.get("headers") or ()
            pairs = hdrs.items() if isinstance(hdrs, Mapping) else hdrs
            headers = [(str(k), _bytes(v) or b"") for k, v in pairs]
            by_part.setdefault(int(part), []).append(
                (i, (key, _bytes(item.get("value")), headers, item.get("timestamp")))
            )
            count += 1
        out: list[tuple[int, int]] = [(0, 0)] * count
        for part, recs in by_part.items():
            first = await self.engine.produce(self.name, [r for _, r in recs], part)
            for j, (i, _) in enumerate(recs):
                out[i] = (part, first + j)
        return out

    async def read(
        self,
        offset: int = 0,
        *,
        partition: int = 0,
        max_records: int = 100,
        wait: float = 0.0,
    ) -> list[StreamRecord]:
        """Records from ``offset`` on; waits up to ``wait`` seconds for the first one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            data = self.engine.read(self.name, partition, offset, 1 << 20)
            recs = self.engine.decode(self.name, partition, data, offset)
            if recs or data:  # data without records: control batches only
                return recs[:max_records]
            left = deadline - loop.time()
            if left <= 0:
                return []
            await self.engine.wait([(self.name, partition)], left)

    async def offsets(self, partition: int = 0) -> PartitionOffsets:
        return self.engine.offsets(self.name, partition)

    async def offset_for_time(self, timestamp_ms: int, partition: int = 0) -> int | None:
        found = self.engine.offset_for_time(self.name, partition, timestamp_ms)
        return None if found is None else found[0]

    def consumer(
        self, group: str, *, from_start: bool = True, session_timeout: float = 10.0
    ) -> AsyncStreamConsumer:
        return AsyncStreamConsumer(self, group, from_start, session_timeout)

    async def delete(self) -> None:
        await self.engine.delete_topic(self.name)

    # -- bridges (conveyor.streams.bridges) ----------------------------------------------
    def _bridge_api(self) -> BridgeManager:
        if self._bridges is None:
            raise InvalidArgument("bridges need a connection with a queue engine")
        return self._bridges

    async def feed(self, queue: Any, *, key: str = "header", start: str = "start") -> None:
        """Send every record of this stream to ``queue`` (a queue or its name) as a
        message, at least once, from the server process. ``key``: where the record key
        goes (``header`` = header ``x-stream-key``, ``group_id``, ``none``); ``start``:
        a new feed begins at the log start or the current ``end``."""
        await self._bridge_api().feed(self.name, _queue_name(queue), key=key, start=start)

    async def unfeed(self, queue: Any) -> None:
        await self._bridge_api().unfeed(self.name, _queue_name(queue))

    async def bridges(self) -> list[dict[str, Any]]:
        """This stream's feeds (with their lag) and exchange bindings."""
        return await self._bridge_api().list_bridges(self.name)


@dataclass
class Joined:
    member_id: str
    generation: int
    assignment: list[int]
    #: where to read each assigned partition: the committed offset, else the log start
    #: (``from_start``) or the high watermark
    positions: dict[int, int]


async def join_group(
    engine: StreamEngine,
    topic: str,
    group: str,
    member_id: str = "",
    *,
    session_timeout: float = 10.0,
    from_start: bool = True,
    client_id: str = "conveyor-python",
    client_host: str = "",
) -> Joined:
    """Join (or rejoin) ``group`` as a conveyor consumer of ``topic``: Kafka's join and
    sync with this client's protocol type (``conveyor``); the elected leader assigns
    partitions round robin over the sorted member ids. Shared by the embedded consumer
    and the HTTP route remote consumers call."""
    groups = engine.groups
    while True:
        res = await groups.join(
            group,
            member_id,
            protocol_type="conveyor",
            protocols=[("range", topic.encode())],
            session_timeout_ms=int(session_timeout * 1000),
            client_id=client_id,
            client_host=client_host,
        )
        if res.error != NONE:
            if res.error == REBALANCE_IN_PROGRESS:
                continue
            raise GroupError(res.error, f"joining group {group!r} failed")
        member_id = res.member_id
        assignments: dict[str, bytes] = {}
        if res.members:
            ids = sorted(m for m, _, _ in res.members)
            n = engine.get_topic(topic).partitions
            for i, mid in enumerate(ids):
                assignments[mid] = json.dumps(list(range(i, n, len(ids)))).encode()
        code, data = await groups.sync(group, res.generation, member_id, assignments)
        if code == REBALANCE_IN_PROGRESS:
            continue
        if code != NONE:
            raise GroupError(code, f"syncing group {group!r} failed")
        assignment: list[int] = json.loads(data) if data else []
        positions: dict[int, int] = {}
        for p in assignment:
            got = engine.committed(group, topic, p)
            if got is not None:
                positions[p] = got[0]
            else:
                off = engine.offsets(topic, p)
                positions[p] = off.log_start if from_start else off.high_watermark
        return Joined(member_id, res.generation, assignment, positions)


class AsyncStreamConsumer(GroupMember):
    """A member of a consumer group: gets some partitions, reads them from the group's
    committed offsets, ``commit()`` stores its positions. Use as an async context
    manager (joins on enter, leaves on exit) or iterate it."""

    stream: AsyncStream

    @property
    def _groups(self) -> Any:
        return self.stream.engine.groups

    async def join(self) -> None:
        try:
            joined = await join_group(
                self.stream.engine,
                self.stream.name,
                self.group,
                self.member_id,
                session_timeout=self.session_timeout,
                from_start=self.from_start,
            )
        except GroupError:
            self.member_id = ""
            raise
        self.member_id = joined.member_id
        self.generation = joined.generation
        self.assignment = joined.assignment
        self.positions = joined.positions

    async def _check(self) -> None:
        code = self._groups.heartbeat(self.group, self.generation, self.member_id)
        if code != NONE:
            await self.join()

    async def poll(self, max_records: int = 100, wait: float = 1.0) -> list[StreamRecord]:
        """Records from the assigned partitions (round robin), waiting up to ``wait``."""
        if not self.member_id:
            await self.join()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            await self._check()
            parts = list(self.assignment)
            for k in range(len(parts)):
                p = parts[(self._next + k) % len(parts)]
                pos = self.positions[p]
                try:
                    recs = await self.stream.read(pos, partition=p, max_records=max_records)
                except OffsetOutOfRange:
                    self.positions[p] = self.stream.engine.offsets(self.stream.name, p).log_start
                    continue
                if recs:
                    self._next = (self._next + k + 1) % len(parts)
                    self.positions[p] = recs[-1].offset + 1
                    return recs
            left = deadline - loop.time()
            if left <= 0:
                return []
            keys = [(self.stream.name, p) for p in parts]
            await self.stream.engine.wait(keys, min(left, 1.0))

    async def commit(self) -> None:
        code = self._groups.check_commit(self.group, self.generation, self.member_id)
        if code != NONE:
            raise GroupError(code, "commit refused: the group rebalanced; poll again")
        await self.stream.engine.commit(
            self.group, {(self.stream.name, p): (o, None) for p, o in self.positions.items()}
        )

    async def close(self) -> None:
        if self.member_id:
            self._groups.leave(self.group, [self.member_id])
            self.member_id = ""


class _Runner(Protocol):
    def call(self, coro: Coroutine[Any, Any, T]) -> T: ...


class Stream:
    """Blocking wrapper of AsyncStream or RemoteStream (``conveyor.connect(...).stream(name)``)."""

    def __init__(self, lt: _Runner, s: AsyncStream | RemoteStream) -> None:
        self._lt = lt
        self._s = s
        self.name = s.name

    def __repr__(self) -> str:
        return f"<Stream {self.name!r}>"

    @property
    def partitions(self) -> int:
        return self._s.partitions

    def produce(self, value: Value | None, **kw: Any) -> tuple[int, int]:
        return self._lt.call(self._s.produce(value, **kw))

    def produce_batch(self, items: Iterable[Mapping[str, Any]]) -> list[tuple[int, int]]:
        return self._lt.call(self._s.produce_batch(items))

    def read(self, offset: int = 0, **kw: Any) -> list[StreamRecord]:
        return self._lt.call(self._s.read(offset, **kw))

    def offsets(self, partition: int = 0) -> PartitionOffsets:
        return self._lt.call(self._s.offsets(partition))

    def offset_for_time(self, timestamp_ms: int, partition: int = 0) -> int | None:
        return self._lt.call(self._s.offset_for_time(timestamp_ms, partition))

    def consumer(self, group: str, **kw: Any) -> StreamConsumer:
        return StreamConsumer(self._lt, self._s.consumer(group, **kw))

    def delete(self) -> None:
        self._lt.call(self._s.delete())

    def feed(self, queue: Any, *, key: str = "header", start: str = "start") -> None:
        """See AsyncStream.feed: this stream's records become messages on ``queue``."""
        self._lt.call(self._s.feed(_queue_name(queue), key=key, start=start))

    def unfeed(self, queue: Any) -> None:
        self._lt.call(self._s.unfeed(_queue_name(queue)))

    def bridges(self) -> list[dict[str, Any]]:
        return self._lt.call(self._s.bridges())


class StreamConsumer:
    def __init__(self, lt: _Runner, c: AsyncStreamConsumer | RemoteStreamConsumer) -> None:
        self._lt = lt
        self._c = c

    @property
    def assignment(self) -> list[int]:
        return self._c.assignment

    def __enter__(self) -> StreamConsumer:
        self._lt.call(self._c.join())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def poll(self, max_records: int = 100, wait: float = 1.0) -> list[StreamRecord]:
        return self._lt.call(self._c.poll(max_records, wait))

    def commit(self) -> None:
        self._lt.call(self._c.commit())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._lt.call(self._c.close())

    def __iter__(self) -> Iterator[StreamRecord]:
        while True:
            yield from self.poll()
