"""The stream engine: topics of partitioned, append-only logs; consumer groups with
durable committed offsets; retention; long-poll waits. Every front door (Kafka, the
Python API, HTTP) calls this.

Layout under the engine's directory (``<data>/streams/``)::

    .streams.db                  committed offsets, producer-id counter (SQLite)
    <topic>/topic.json           partitions and retention settings
    <topic>/<partition>/*.log    segments (see conveyor.streams.log)

Durability: appends are written to the active segment on the event loop (page cache);
at ``fsync`` the syncer thread fsyncs them (one fsync per file per round, shared by
every produce in the round) before the produce is acknowledged and before readers
see the records (the high watermark moves after the fsync). At ``os`` and ``none``
the write itself is the acknowledgement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from conveyor.errors import ClosedError, InvalidArgument, InvalidName
from conveyor.streams import log as plog
from conveyor.streams.batch import CorruptBatch, split_batches
from conveyor.streams.errors import (
    CorruptRecords,
    OffsetOutOfRange,
    PartitionNotFound,
    ProducerFenced,
    TopicExists,
    TopicNotFound,
)
from conveyor.streams.groups import GroupCoordinator
from conveyor.streams.log import PartitionLog, TopicConfig
from conveyor.streams.syncer import Round, Syncer

log = logging.getLogger("conveyor.streams")

_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,248}")
DB_FILE = ".streams.db"
MAX_PARTITIONS = 10_000

#: Kafka topic-config names accepted at creation, mapped to TopicConfig fields.
CONFIG_KEYS = {
    "retention.ms": "retention_ms",
    "retention.bytes": "retention_bytes",
    "segment.bytes": "segment_bytes",
    "segment.ms": "segment_ms",
}


def check_topic_name(name: str) -> str:
    """Kafka's rule (letters, digits, ``.``, ``_``, ``-``; at most 249) minus a leading
    dot, so a name is always one plain directory entry under the streams directory."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidName(
            f"invalid topic name {str(name)[:80]!r}: use 1-249 of [A-Za-z0-9._-], "
            "not starting with '.'"
        )
    return name


@dataclass
class TopicInfo:
    name: str
    partitions: int
    config: TopicConfig


@dataclass
class PartitionOffsets:
    log_start: int
    high_watermark: int


@dataclass
class StreamRecord:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)


class Topic:
    def __init__(self, name: str, directory: Path, config: TopicConfig) -> None:
        self.name = name
        self.dir = directory
        self.config = config
        self.partitions: list[PartitionLog] = []

    def info(self) -> TopicInfo:
        return TopicInfo(self.name, len(self.partitions), self.config)


def _config(partitions: int, config: dict[str, Any] | None) -> TopicConfig:
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise InvalidArgument(f"partitions must be between 1 and {MAX_PARTITIONS}")
    cfg = TopicConfig(partitions=partitions)
    names = {f.name for f in fields(TopicConfig)}
    for key, value in (config or {}).items():
        attr = CONFIG_KEYS.get(key, key if key in names and key != "created_at" else None)
        if attr is None or attr == "partitions":
            raise InvalidArgument(f"unknown topic setting {key!r}")
        try:
            setattr(cfg, attr, int(value))
        except (TypeError, ValueError):
            raise InvalidArgument(f"topic setting {key!r} must be an integer") from None
    if cfg.segment_bytes < 1024:
        raise InvalidArgument("segment.bytes must be at least 1024")
    return cfg


class StreamEngine:
    def __init__(
        self,
        directory: Path,
        durability: str = "fsync",
        *,
        default_partitions: int = 1,
        retention_interval: float = 1.0,
        temporary: bool = False,
    ) -> None:
        if durability not in ("fsync", "os", "none"):
            raise InvalidArgument("durability must be one of fsync, os, none")
        self.dir = directory
        self.durability = durability
        self.default_partitions = default_partitions
        self.retention_interval = retention_interval
        self._temporary = temporary
        self.topics: dict[str, Topic] = {}
        self.groups = GroupCoordinator()
        self._committed: dict[str, dict[tuple[str, int], tuple[int, str | None]]] = {}
        self._waiters: dict[tuple[str, int], set[asyncio.Future[None]]] = {}
        self._syncer: Syncer | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        #: Called with a topic's name after it was deleted (bridges drop theirs).
        self.deleted_callbacks: list[Callable[[str], None]] = []

    # -- lifecycle -----------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        directory: str | os.PathLike[str] | None = None,
        durability: str = "fsync",
        **kw: Any,
    ) -> StreamEngine:
        """Open (creating) the engine in ``directory``; None: a temporary directory that
        is removed on close (durability ``none``)."""
        if directory is None:
            engine = cls(Path(tempfile.mkdtemp(prefix="conveyor-streams-")), "none", **kw)
            engine._temporary = True
        else:
            engine = cls(Path(directory), durability, **kw)
        await engine.start()
        return engine

    @classmethod
    async def for_store_url(cls, url: str, durability: str = "fsync", **kw: Any) -> StreamEngine:
        """The engine that belongs with a broker's store URL: ``<dir>/streams`` for a
        directory or ``sqlite:///dir``; a temporary directory for ``memory://``."""
        return await cls.open(streams_dir(url), durability, **kw)

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._syncer = Syncer(self.dir / DB_FILE, self.durability)

        def load(rnd: Round) -> list[tuple[str, str, int, int, str | None]]:
            rows = rnd.db.execute('SELECT grp, topic, part, "offset", metadata FROM offsets')
            return list(rows)

        for grp, tname, part, off, meta in await self._syncer.run(load):
            self._committed.setdefault(grp, {})[(tname, part)] = (off, meta)
        loop = asyncio.get_running_loop()
        for entry in sorted(self.dir.iterdir()):
            if entry.name.startswith(".") or not (entry / "topic.json").exists():
                if entry.name.startswith(".deleted-"):
                    shutil.rmtree(entry, ignore_errors=True)
                continue
            cfg = TopicConfig(**json.loads((entry / "topic.json").read_text()))
            topic = Topic(entry.name, entry, cfg)
            await loop.run_in_executor(None, self._open_partitions, topic)
            self.topics[topic.name] = topic
        self.groups.start()
        self._task = loop.create_task(self._retention_loop(), name="conveyor-retention")

    def _open_partitions(self, topic: Topic) -> None:
        for p in range(topic.config.partitions):
            part = PartitionLog(topic.dir / str(p), topic.config, self.durability)
            part.open()
            topic.partitions.append(part)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.groups.close()
        for futs in self._waiters.values():
            for f in futs:
                if not f.done():
                    f.set_result(None)
        if self._syncer is not None:
            with contextlib.suppress(ClosedError):
                await self._syncer.run(lambda rnd: None)  # barrier: pending fsyncs done
            self._syncer.close()
        for topic in self.topics.values():
            for part in topic.partitions:
                part.close()
        if self._temporary:
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> Syncer:
        if self._closed or self._syncer is None:
            raise ClosedError("the stream engine is closed")
        return self._syncer

    # -- topics --------------------------------------------------------------------------
    def list_topics(self) -> list[TopicInfo]:
        return [t.info() for t in self.topics.values()]

    def get_topic(self, name: str) -> TopicInfo:
        return self._topic(name).info()

    def _topic(self, name: str) -> Topic:
        t = self.topics.get(name)
        if t is None:
            raise TopicNotFound(f"no topic {str(name)[:80]!r}")
        return t

    def _part(self, topic: str, partition: int) -> PartitionLog:
        t = self._topic(topic)
        if not 0 <= partition < len(t.partitions):
            raise PartitionNotFound(f"topic {topic!r} has no partition {partition}")
        return t.partitions[partition]

    async def create_topic(
        self,
        name: str,
        partitions: int | None = None,
        config: dict[str, Any] | None = None,
        *,
        exist_ok: bool = False,
        validate_only: bool = False,
    ) -> TopicInfo:
        self._check_open()
        check_topic_name(name)
        cfg = _config(partitions or self.default_partitions, config)
        async with self._lock:
            if name in self.topics:
                if exist_ok:
                    return self.topics[name].info()
                raise TopicExists(f"topic {name!r} already exists")
            if validate_only:
                return TopicInfo(name, cfg.partitions, cfg)
            topic = Topic(name, self.dir / name, cfg)

            def create() -> None:
                topic.dir.mkdir(parents=True, exist_ok=True)
                tmp = topic.dir / "topic.json.tmp"
                tmp.write_text(json.dumps(asdict(cfg)))
                os.replace(tmp, topic.dir / "topic.json")
                self._open_partitions(topic)
                if self.durability == "fsync":
                    for d in [topic.dir, self.dir]:
                        fd = os.open(d, os.O_RDONLY)
                        try:
                            os.fsync(fd)
                        finally:
                            os.close(fd)

            await asyncio.get_running_loop().run_in_executor(None, create)
            self.topics[name] = topic
            log.info("created topic %s with %d partition(s)", name, cfg.partitions)
            return topic.info()

    async def ensure_topic(self, name: str) -> TopicInfo:
        t = self.topics.get(name)
        if t is not None:
            return t.info()
        return await self.create_topic(name, exist_ok=True)

    async def delete_topic(self, name: str) -> None:
        syncer = self._check_open()
        async with self._lock:
            topic = self._topic(name)
            del self.topics[name]
            for p in range(len(topic.partitions)):
                self._wake((name, p))
            await syncer.run(lambda rnd: None)  # no fsync may still use these files

            def drop(rnd: Round) -> None:
                rnd.db.execute("DELETE FROM offsets WHERE topic = ?", (name,))

            await syncer.run(drop)
            for grp in self._committed.values():
                for key in [k for k in grp if k[0] == name]:
                    del grp[key]
            for part in topic.partitions:
                part.closed = True
                for seg in part.segments:
                    seg.close()
            grave = self.dir / f".deleted-{name}-{time.time_ns()}"
            os.replace(topic.dir, grave)
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: shutil.rmtree(grave, ignore_errors=True)
            )
        for cb in list(self.deleted_callbacks):
            try:
                cb(name)
            except Exception:
                log.exception("topic-deleted callback failed")

    # -- produce -------------------------------------------------------------------------
    async def append(self, topic: str, partition: int, records: bytes) -> int:
        """Append a producer's record set (RecordBatch v2 bytes, any compression);
        returns the base offset once the records are durable at the configured level.

        Raises TopicNotFound, PartitionNotFound, CorruptRecords, ProducerFenced."""
        base, durable = self.begin_append(topic, partition, records)
        if durable is not None:
            await durable
        return base

    def begin_append(
        self, topic: str, partition: int, records: bytes
    ) -> tuple[int, Awaitable[None] | None]:
        """Assign offsets and write now (so appends keep their call order); returns the
        base offset and an awaitable that completes when the records are durable (None
        for a retried batch that was already stored)."""
        syncer = self._check_open()
        part = self._part(topic, partition)
        try:
            headers = split_batches(records)
        except CorruptBatch as exc:
            raise CorruptRecords(str(exc)) from None
        try:
            if len(headers) == 1:
                dup = part.check_producer(headers[0])
                if dup is not None:
                    return dup, None
            else:
                for h in headers:
                    part.check_producer(h)
        except plog.SequenceError as exc:
            raise ProducerFenced(exc.code, str(exc)) from None
        base, _ = part.append(bytearray(records), headers)
        fds, marks, upto = part.pending_sync()
        if self.durability != "fsync" or not fds:
            if part.mark_durable(marks, upto):
                self._wake((topic, partition))
            return base, None
        return base, self._sync(syncer, topic, partition, part, fds, marks, upto)

    async def _sync(
        self,
        syncer: Syncer,
        topic: str,
        partition: int,
        part: PartitionLog,
        fds: list[int],
        marks: list[tuple[plog.Segment, int]],
        upto: int,
    ) -> None:
        await syncer.fsync(fds)
        if part.mark_durable(marks, upto):
            self._wake((topic, partition))

    # -- read ----------------------------------------------------------------------------
    def read(self, topic: str, partition: int, offset: int, max_bytes: int = 1 << 20) -> bytes:
        """Whole record batches starting with the one that holds ``offset``."""
        part = self._part(topic, partition)
        try:
            return part.read(offset, max_bytes)
        except plog.OffsetOutOfRange:
            raise OffsetOutOfRange(
                f"offset {offset} is outside [{part.log_start}, {part.hw}] of {topic}/{partition}"
            ) from None

    def offsets(self, topic: str, partition: int) -> PartitionOffsets:
        part = self._part(topic, partition)
        return PartitionOffsets(part.log_start, part.hw)

    def offset_for_time(
        self, topic: str, partition: int, timestamp_ms: int
    ) -> tuple[int, int] | None:
        """(offset, timestamp) of the first batch holding a record at or after
        ``timestamp_ms`` (batch granularity: the batch's first offset and first
        timestamp); None when every record is older."""
        return self._part(topic, partition).offset_for_time(timestamp_ms)

    def max_timestamp(self, topic: str, partition: int) -> tuple[int, int]:
        return self._part(topic, partition).max_timestamp()

    def available(self, topic: str, partition: int, offset: int) -> int:
        """Records readable from ``offset`` (0 when unknown or out of range)."""
        t = self.topics.get(topic)
        if t is None or not 0 <= partition < len(t.partitions):
            return 0
        return max(0, t.partitions[partition].hw - offset)

    async def wait(self, keys: Iterable[tuple[str, int]], timeout: float) -> None:
        """Return when any of these partitions' high watermark moves, or after timeout."""
        if timeout <= 0 or self._closed:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        keys = list(keys)
        for k in keys:
            self._waiters.setdefault(k, set()).add(fut)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, timeout)
        finally:
            for k in keys:
                s = self._waiters.get(k)
                if s is not None:
                    s.discard(fut)
                    if not s:
                        del self._waiters[k]

    def _wake(self, key: tuple[str, int]) -> None:
        for f in self._waiters.pop(key, ()):
            if not f.done():
                f.set_result(None)

    # -- committed offsets ---------------------------------------------------------------
    async def commit(
        self, group: str, offsets: dict[tuple[str, int], tuple[int, str | None]]
    ) -> None:
        """Store committed offsets durably (the next offset to read, Kafka style)."""
        syncer = self._check_open()
        now = time.time()
        rows = [(group, t, p, off, meta, now) for (t, p), (off, meta) in offsets.items()]

        def save(rnd: Round) -> None:
            rnd.db.executemany(
                'INSERT OR REPLACE INTO offsets (grp, topic, part, "offset", metadata, '
                "committed_at) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

        await syncer.run(save)
        self._committed.setdefault(group, {}).update(offsets)

    def committed(self, group: str, topic: str, partition: int) -> tuple[int, str | None] | None:
        return self._committed.get(group, {}).get((topic, partition))

    def committed_all(self, group: str) -> dict[tuple[str, int], tuple[int, str | None]]:
        return dict(self._committed.get(group, {}))

    def known_groups(self) -> list[str]:
        return sorted(set(self._committed) | {g for g, _, _ in self.groups.list_groups()})

    async def delete_group(self, group: str) -> int:
        code = self.groups.delete(group)
        if code:
            return code
        syncer = self._check_open()
        await syncer.run(lambda rnd: rnd.db.execute("DELETE FROM offsets WHERE grp = ?", (group,)))
        self._committed.pop(group, None)
        return 0

    async def next_producer_id(self) -> int:
        syncer = self._check_open()

        def bump(rnd: Round) -> int:
            row = rnd.db.execute(
                "INSERT INTO meta (key, value) VALUES ('producer_id', 1000) "
                "ON CONFLICT (key) DO UPDATE SET value = value + 1 RETURNING value"
            ).fetchone()
            return int(row[0])

        return await syncer.run(bump)

    # -- bridge table (conveyor.streams.bridges) ----------------------------------------
    async def load_bridges(self) -> list[tuple[str, str]]:
        """(id, JSON spec) of every stored bridge."""
        syncer = self._check_open()

        def load(rnd: Round) -> list[tuple[str, str]]:
            return list(rnd.db.execute("SELECT id, spec FROM bridges ORDER BY id"))

        return await syncer.run(load)

    async def save_bridge(self, bridge_id: str, spec: str) -> None:
        syncer = self._check_open()
        await syncer.run(
            lambda rnd: rnd.db.execute(
                "INSERT OR REPLACE INTO bridges (id, spec) VALUES (?, ?)", (bridge_id, spec)
            )
        )

    async def delete_bridge(self, bridge_id: str) -> None:
        syncer = self._check_open()
        await syncer.run(
            lambda rnd: rnd.db.execute("DELETE FROM bridges WHERE id = ?", (bridge_id,))
        )

    # -- retention -----------------------------------------------------------------------
    def enforce_retention(self, now_ms: int | None = None) -> int:
        """Delete whole segments past retention; returns how many were deleted."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        n = 0
        for topic in list(self.topics.values()):
            for part in topic.partitions:
                if part.closed:
                    continue
                for seg in part.expired_segments(now_ms):
                    seg.delete()
                    n += 1
                if part.active.size and part.config.segment_ms >= 0:
                    age = time.time() - part.active.created
                    if age * 1000 > part.config.segment_ms and part.active.durable_size == (
                        part.active.size
                    ):
                        part.roll()
        return n

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(self.retention_interval)
            try:
                n = self.enforce_retention()
                if n:
                    log.info("retention deleted %d segment(s)", n)
            except Exception:
                log.exception("retention failed")

    # -- Python API helpers --------------------------------------------------------------
    async def produce(
        self,
        topic: str,
        values: Sequence[tuple[bytes | None, bytes | None, list[tuple[str, bytes]], int | None]],
        partition: int,
    ) -> int:
        """Append records given as (key, value, headers, timestamp ms) to one partition;
        returns the first offset."""
        from conveyor.streams.records import build_batch

        return await self.append(topic, partition, build_batch(values))

    def decode(self, topic: str, partition: int, data: bytes, start: int) -> list[StreamRecord]:
        from conveyor.streams.records import decode_records

        return [
            StreamRecord(topic, partition, off, ts, k, v, h)
            for off, ts, k, v, h in decode_records(data)
            if off >= start
        ]


def streams_dir(url: str) -> Path | None:
    """Where a store URL's streams live (None: temporary)."""
    from urllib.parse import unquote, urlparse

    if url.startswith("memory:"):
        return None
    if url.startswith("sqlite:"):
        parsed = urlparse(url)
        return Path(unquote(parsed.netloc + parsed.path)) / "streams"
    if "://" in url:
        raise InvalidArgument(
            f"streams need a local data directory; {url.split('://')[0]}:// stores do not "
            "hold streams yet"
        )
    return Path(url) / "streams"
