"""Bridges between streams and queues, run inside the process that owns both engines
(the server, or an embedded connection once it uses streams).

**Feed** (stream -> queue): every record of a stream becomes a message on a queue.
A worker reads each partition from the committed offset of its consumer group
(``__bridge:<stream>><queue>``), sends the records as one ``send_batch`` and commits
the next offset only after the send returned (the queue's store has the messages).
At least once: a crash between the send and the commit sends the records again at
restart, and each message carries the dedup id ``stream:<stream>:<created>:<p>:<offset>``
so the queue drops such repeats within its dedup window (300 s by default).
Mapping: value -> body; headers -> headers (UTF-8 values as str, others as bytes);
key -> header ``x-stream-key`` (``key="header"``, the default), the message group id
(``key="group_id"``) or nowhere (``key="none"``); plus headers ``x-stream``,
``x-stream-partition``, ``x-stream-offset`` and ``x-stream-timestamp`` (ms).
Feeds are stored in the streams' metadata database (table ``bridges``).

**Bind** (exchange -> stream): the bridge declares a queue ``__bridge.<stream>``,
binds it to the exchange like any queue (so the queue engine routes to it with its
own rules, persisted with the other bindings) and a worker moves its messages into
the stream: receive a batch, append the records (waiting until they are durable),
then ack. At least once: a crash between the append and the ack appends the
messages again after restart. Mapping: body -> value; headers -> headers (str as
UTF-8, bytes as is, other values as their JSON text); key = the message's group id,
else its ``x-stream-key`` header, else none (round robin); timestamp = sent time;
plus headers ``x-exchange``, ``x-routing-key`` and ``x-<property>`` for each
message property that is set (``x-content-type``, ``x-message-id``...). The
bindings of ``__bridge.<stream>`` queues are the bind-bridge table.

Deleting a stream removes its bridges; deleting a fed queue removes its feeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from conveyor import errors
from conveyor.model import NewMessage, QueueOptions, check_name
from conveyor.streams.batch import walk
from conveyor.streams.engine import StreamEngine, StreamRecord, check_topic_name
from conveyor.streams.errors import OffsetOutOfRange
from conveyor.streams.records import partition_for

if TYPE_CHECKING:
    from conveyor.broker import Broker
    from conveyor.model import Delivery

log = logging.getLogger("conveyor.streams.bridges")

HIDDEN_PREFIX = "__bridge."
KEY_MODES = ("header", "group_id", "none")
STARTS = ("start", "end")
#: Messages per receive and records per send in a bridge round.
BATCH = 500
READ_BYTES = 1 << 20
#: Lease of the messages a bind worker holds while it appends them.
LEASE = 60.0
_BACKOFF_MAX = 5.0


def hidden_queue(stream: str) -> str:
    """The queue that collects what exchanges route to ``stream``."""
    return check_name(HIDDEN_PREFIX + check_topic_name(stream), "bridge queue")


def feed_group(stream: str, queue: str) -> str:
    """The consumer group whose committed offsets are a feed's progress."""
    return f"__bridge:{stream}>{queue}"


@dataclass
class Feed:
    stream: str
    queue: str
    key: str = "header"
    start: str = "start"

    @property
    def id(self) -> str:
        return f"feed:{self.stream}>{self.queue}"

    @property
    def group(self) -> str:
        return feed_group(self.stream, self.queue)


@dataclass
class StreamBinding:
    stream: str
    exchange: str
    routing_key: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)


def _text(v: bytes | None) -> str | bytes | None:
    if v is None:
        return None
    try:
        return v.decode()
    except UnicodeDecodeError:
        return v


def record_to_message(feed: Feed, created_ms: int, r: StreamRecord) -> NewMessage:
    headers: dict[str, Any] = {}
    for k, v in r.headers:
        headers[k] = _text(v)
    headers["x-stream"] = r.topic
    headers["x-stream-partition"] = r.partition
    headers["x-stream-offset"] = r.offset
    headers["x-stream-timestamp"] = r.timestamp
    group_id = None
    if r.key is not None:
        if feed.key == "header":
            headers["x-stream-key"] = _text(r.key)
        elif feed.key == "group_id":
            group_id = r.key.decode("utf-8", "backslashreplace")
    return NewMessage(
        body=r.value or b"",
        headers=headers,
        group_id=group_id,
        dedup_id=f"stream:{r.topic}:{created_ms}:{r.partition}:{r.offset}",
    )


def _header_bytes(v: Any) -> bytes | None:
    if v is None:
        return None
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v)
    if isinstance(v, str):
        return v.encode()
    return json.dumps(v, default=str, separators=(",", ":")).encode()


def delivery_to_record(
    d: Delivery,
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]], int | None]:
    """(key, value, headers, timestamp ms) of the record a routed message becomes."""
    headers: list[tuple[str, bytes]] = []
    key: bytes | None = None
    for k, v in d.headers.items():
        if k == "x-stream-key" and v is not None:
            key = _header_bytes(v)
        b = _header_bytes(v)
        headers.append((str(k), b if b is not None else b""))
    if d.group_id is not None:
        key = d.group_id.encode()
    headers.append(("x-exchange", d.exchange.encode()))
    headers.append(("x-routing-key", d.routing_key.encode()))
    for name in d.properties.__struct_fields__:
        value = getattr(d.properties, name)
        if value is not None:
            headers.append(("x-" + name.replace("_", "-"), str(value).encode()))
    return key, d.body, headers, int(d.sent_at * 1000)


def _next_offset(data: bytes, start: int) -> int:
    """The offset after the last batch in ``data`` (control batches included)."""
    nxt = start
    for _, h in walk(data):
        nxt = max(nxt, h.base_offset + h.last_offset_delta + 1)
    return nxt


class _Worker:
    """One bridge's task. ``busy`` while a round (receive/read -> send -> ack/commit)
    is between its first and last write, so a shutdown lets that round finish."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.busy = False
        self.stop = False
        self.task: asyncio.Task[None] | None = None
        self.failures = 0

    async def backoff(self, exc: BaseException, what: str) -> None:
        self.failures += 1
        if self.failures in (1, 10) or self.failures % 100 == 0:
            log.warning("bridge %s: %s (%s); retrying", self.name, what, exc)
        await asyncio.sleep(min(0.05 * 2**self.failures, _BACKOFF_MAX))


class BridgeManager:
    """Runs the bridges between one StreamEngine and one Broker."""

    def __init__(self, streams: StreamEngine, broker: Broker) -> None:
        self.streams = streams
        self.broker = broker
        self.feeds: dict[str, Feed] = {}
        self._workers: dict[str, _Worker] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for bridge_id, spec in await self.streams.load_bridges():
            try:
                feed = Feed(**json.loads(spec))
            except (TypeError, ValueError):
                log.error("ignoring unreadable bridge %s: %s", bridge_id, spec[:200])
                continue
            self.feeds[feed.id] = feed
            self._start_feed(feed)
        for q in await self.broker.list_queues(HIDDEN_PREFIX):
            stream = q.name[len(HIDDEN_PREFIX) :]
            if stream in self.streams.topics:
                self._start_mover(stream)
        self.broker.on_queue_deleted(self._queue_deleted)
        self.streams.deleted_callbacks.append(self._topic_deleted)

    async def close(self) -> None:
        """Stop every worker: idle ones at once, one in the middle of a round after it
        (at most a few seconds)."""
        if self._closed:
            return
        self._closed = True
        workers = list(self._workers.values())
        self._workers.clear()
        await self._stop(workers)
        for t in list(self._tasks):
            t.cancel()

    async def _stop(self, workers: list[_Worker]) -> None:
        tasks = []
        for w in workers:
            w.stop = True
            if w.task is None:
                continue
            if not w.busy:
                w.task.cancel()
            tasks.append(w.task)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=5.0)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _queue_deleted(self, name: str) -> None:
        if self._closed:
            return
        doomed = [f for f in self.feeds.values() if f.queue == name]
        for f in doomed:
            self._spawn(self._drop_feed(f))
        if name.startswith(HIDDEN_PREFIX):
            w = self._workers.pop("bind:" + name[len(HIDDEN_PREFIX) :], None)
            if w is not None:
                self._spawn(self._stop([w]))

    def _topic_deleted(self, stream: str) -> None:
        if self._closed:
            return
        for f in [f for f in self.feeds.values() if f.stream == stream]:
            self._spawn(self._drop_feed(f))
        self._spawn(self._drop_hidden(stream))

    async def _drop_feed(self, feed: Feed) -> None:
        async with self._lock:
            if self.feeds.pop(feed.id, None) is None:
                return
            w = self._workers.pop(feed.id, None)
            if w is not None:
                await self._stop([w])
            with contextlib.suppress(errors.ClosedError):
                await self.streams.delete_bridge(feed.id)
                await self.streams.delete_group(feed.group)
            log.info("removed bridge %s", feed.id)

    async def _drop_hidden(self, stream: str) -> None:
        w = self._workers.pop("bind:" + stream, None)
        if w is not None:
            await self._stop([w])
        with contextlib.suppress(errors.NotFound, errors.ClosedError):
            await self.broker.delete_queue(HIDDEN_PREFIX + stream)

    # -- the API -------------------------------------------------------------------------
    async def feed(
        self, stream: str, queue: str, *, key: str = "header", start: str = "start"
    ) -> Feed:
        """Start feeding ``stream`` into ``queue`` (idempotent; changes ``key``).
        ``start``: a new feed begins at the log start or at the current end."""
        if key not in KEY_MODES:
            raise errors.InvalidArgument(f"key must be one of {', '.join(KEY_MODES)}")
        if start not in STARTS:
            raise errors.InvalidArgument("start must be 'start' or 'end'")
        self._check()
        info = self.streams.get_topic(stream)
        await self.broker.get_queue(queue)
        if queue.startswith(HIDDEN_PREFIX):
            raise errors.InvalidArgument("bridge queues cannot be fed")
        async with self._lock:
            feed = Feed(stream, queue, key, start)
            old = self.feeds.get(feed.id)
            if old is not None:
                feed.start = old.start
                if old == feed:
                    return old
                w = self._workers.pop(feed.id, None)
                if w is not None:
                    await self._stop([w])
            elif start == "end":
                await self.streams.commit(
                    feed.group,
                    {
                        (stream, p): (self.streams.offsets(stream, p).high_watermark, None)
                        for p in range(info.partitions)
                    },
                )
            await self.streams.save_bridge(feed.id, json.dumps(asdict(feed)))
            self.feeds[feed.id] = feed
            self._start_feed(feed)
            log.info("bridge %s started (key -> %s)", feed.id, key)
            return feed

    async def unfeed(self, stream: str, queue: str) -> None:
        self._check()
        feed = self.feeds.get(Feed(stream, queue).id)
        if feed is None:
            raise errors.NotFound(f"stream {stream!r} does not feed queue {queue!r}")
        await self._drop_feed(feed)

    async def bind(
        self,
        exchange: str,
        stream: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> StreamBinding:
        """Append every message ``exchange`` routes with this binding to ``stream``."""
        self._check()
        self.streams.get_topic(stream)
        queue = hidden_queue(stream)
        await self.broker.declare_exchange(exchange, passive=True)
        async with self._lock:
            await self.broker.declare_queue(queue, QueueOptions(visibility_timeout=LEASE))
            await self.broker.bind(exchange, queue, routing_key, arguments)
            self._start_mover(stream)
        return StreamBinding(stream, exchange, routing_key, dict(arguments or {}))

    async def unbind(
        self,
        exchange: str,
        stream: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        """Remove that binding; with the stream's last binding gone, what is still in
        its bridge queue is moved and the queue deleted."""
        self._check()
        queue = hidden_queue(stream)
        async with self._lock:
            await self.broker.unbind(exchange, queue, routing_key, arguments)
            if await self.broker.list_bindings(queue=queue):
                return
            w = self._workers.pop("bind:" + stream, None)
            if w is not None:
                await self._stop([w])
            with contextlib.suppress(errors.NotFound):
                if stream in self.streams.topics:
                    await self._move(stream, queue, _Worker("drain"), drain=True)
                await self.broker.delete_queue(queue)

    async def list_bridges(self, stream: str | None = None) -> list[dict[str, Any]]:
        """Every bridge (of ``stream``) as a JSON-ready dict; feeds report their lag."""
        out: list[dict[str, Any]] = []
        for f in sorted(self.feeds.values(), key=lambda f: f.id):
            if stream is not None and f.stream != stream:
                continue
            out.append({"kind": "feed", **asdict(f), "lag": self.lag(f)})
        for q in await self.broker.list_queues(HIDDEN_PREFIX):
            name = q.name[len(HIDDEN_PREFIX) :]
            if stream is not None and name != stream:
                continue
            for b in await self.broker.list_bindings(queue=q.name):
                out.append(
                    {
                        "kind": "bind",
                        "stream": name,
                        "exchange": b.source,
                        "routing_key": b.routing_key,
                        "arguments": dict(b.arguments or {}),
                    }
                )
        return out

    def lag(self, feed: Feed) -> int:
        """Records of the stream not yet sent to the queue."""
        t = self.streams.topics.get(feed.stream)
        if t is None:
            return 0
        total = 0
        for p in range(len(t.partitions)):
            off = self.streams.offsets(feed.stream, p)
            got = self.streams.committed(feed.group, feed.stream, p)
            if got is not None:
                pos = got[0]
            else:
                pos = off.log_start if feed.start == "start" else off.high_watermark
            total += max(0, off.high_watermark - max(pos, off.log_start))
        return total

    def _check(self) -> None:
        if self._closed or self.streams.closed:
            raise errors.ClosedError("the bridges are closed")

    # -- feed: stream -> queue -----------------------------------------------------------
    def _start_feed(self, feed: Feed) -> None:
        w = _Worker(feed.id)
        self._workers[feed.id] = w
        w.task = asyncio.get_running_loop().create_task(self._run_feed(feed, w), name=feed.id)

    async def _run_feed(self, feed: Feed, w: _Worker) -> None:
        eng = self.streams
        positions: dict[int, int] = {}
        while not w.stop:
            try:
                topic = eng.get_topic(feed.stream)
                created_ms = int(topic.config.created_at * 1000)
                keys = []
                moved = False
                for p in range(topic.partitions):
                    keys.append((feed.stream, p))
                    if p not in positions:
                        got = eng.committed(feed.group, feed.stream, p)
                        off = eng.offsets(feed.stream, p)
                        if got is not None:
                            positions[p] = got[0]
                        else:
                            positions[p] = (
                                off.log_start if feed.start == "start" else off.high_watermark
                            )
                    moved |= await self._feed_partition(feed, w, p, positions, created_ms)
                    if w.stop:
                        return
                w.failures = 0
                if not moved:
                    await eng.wait(keys, 1.0)
            except asyncio.CancelledError:
                raise
            except errors.ClosedError:
                return
            except errors.ConveyorError as exc:  # stream or queue missing, queue full...
                positions.clear()
                await w.backoff(exc, "cannot move records")
            except Exception as exc:
                log.exception("bridge %s failed", feed.id)
                positions.clear()
                await w.backoff(exc, "failed")

    async def _feed_partition(
        self, feed: Feed, w: _Worker, p: int, positions: dict[int, int], created_ms: int
    ) -> bool:
        eng = self.streams
        pos = positions[p]
        try:
            data = eng.read(feed.stream, p, pos, READ_BYTES)
        except OffsetOutOfRange:
            off = eng.offsets(feed.stream, p)
            positions[p] = off.log_start if pos < off.log_start else off.high_watermark
            return True
        if not data:
            return False
        recs = eng.decode(feed.stream, p, data, pos)
        nxt = _next_offset(data, pos)
        w.busy = True
        try:
            for i in range(0, len(recs), BATCH):
                chunk = recs[i : i + BATCH]
                msgs = [record_to_message(feed, created_ms, r) for r in chunk]
                await self.broker.send_batch(feed.queue, msgs)
            await eng.commit(feed.group, {(feed.stream, p): (nxt, None)})
        finally:
            w.busy = False
        positions[p] = nxt
        return True

    # -- bind: exchange -> stream --------------------------------------------------------
    def _start_mover(self, stream: str) -> None:
        name = "bind:" + stream
        if name in self._workers:
            return
        w = _Worker(name)
        self._workers[name] = w
        queue = HIDDEN_PREFIX + stream
        w.task = asyncio.get_running_loop().create_task(
            self._run_mover(stream, queue, w), name=name
        )

    async def _run_mover(self, stream: str, queue: str, w: _Worker) -> None:
        while not w.stop:
            try:
                await self._move(stream, queue, w)
                w.failures = 0
            except asyncio.CancelledError:
                raise
            except errors.ClosedError:
                return
            except errors.ConveyorError as exc:
                await w.backoff(exc, "cannot append to the stream")
            except Exception as exc:
                log.exception("bridge %s failed", w.name)
                await w.backoff(exc, "failed")

    async def _move(self, stream: str, queue: str, w: _Worker, *, drain: bool = False) -> None:
        """Move one batch (``drain``: everything) from the bridge queue to the stream."""
        while True:
            got = await self.broker.receive(
                queue,
                BATCH,
                wait=0.0 if drain else 1.0,
                visibility_timeout=LEASE,
                session=True,
            )
            if not got:
                return
            w.busy = True
            try:
                receipts = [d.receipt for d in got if d.receipt is not None]
                try:
                    await self._append(stream, got)
                except BaseException:
                    with contextlib.suppress(errors.ConveyorError):
                        await self.broker.nack_batch(queue, receipts, delay=1.0)
                    raise
                await self.broker.ack_batch(queue, receipts)
            finally:
                w.busy = False
            if not drain:
                return

    async def _append(self, stream: str, got: list[Delivery]) -> None:
        n = self.streams.get_topic(stream).partitions
        by_part: dict[int, list[Any]] = {}
        for i, d in enumerate(got):
            rec = delivery_to_record(d)
            by_part.setdefault(partition_for(rec[0], n, d.sequence or i), []).append(rec)
        await asyncio.gather(
            *(self.streams.produce(stream, recs, p) for p, recs in by_part.items())
        )


def bridge_json(b: Feed | StreamBinding, lag: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "feed" if isinstance(b, Feed) else "bind", **asdict(b)}
    if lag is not None:
        out["lag"] = lag
    return out


__all__ = [
    "HIDDEN_PREFIX",
    "BridgeManager",
    "Feed",
    "StreamBinding",
    "bridge_json",
    "delivery_to_record",
    "feed_group",
    "hidden_queue",
    "record_to_message",
]
