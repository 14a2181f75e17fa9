"""The engine: queues, exchanges, routing, leases, timers. Every protocol calls this.

Everything here runs on one asyncio event loop. Durable state lives in the store; the
broker keeps only what makes the hot path cheap: queue options by name, an immutable
routing table, and the waiters of long polls and push consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from conveyor import errors
from conveyor.broker import scripts
from conveyor.broker.clock import Clock, SystemClock
from conveyor.broker.routing import RoutingTable
from conveyor.broker.scripts import QueueRef
from conveyor.broker.waiters import Waiters
from conveyor.model import (
    DEFAULT_EXCHANGE,
    EXCHANGE_TYPES,
    AckResult,
    Binding,
    Delivery,
    ExchangeInfo,
    Meta,
    NewMessage,
    Properties,
    PublishResult,
    QueueInfo,
    QueueOptions,
    QueueStats,
    SendResult,
    check_name,
    check_seconds,
)
from conveyor.store.base import DELAYED, READY, MessageRow, NewRow, QueueRow, Store, Tx

log = logging.getLogger("conveyor.broker")

DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
#: Lease tokens with this bit set belong to a connection (AMQP), not to a client's timer.
SESSION_TOKEN = 1 << 60
MAX_BATCH = 10_000
MAX_WAIT = 3600.0
MAX_DELAY = 10 * 365 * 86400.0
#: The exchanges RabbitMQ declares in every vhost; AMQP clients expect them.
STANDARD_EXCHANGES = {
    "amq.direct": "direct",
    "amq.fanout": "fanout",
    "amq.topic": "topic",
    "amq.headers": "headers",
    "amq.match": "headers",
}

_encode = msgspec.msgpack.Encoder().encode
_decode_meta = msgspec.msgpack.Decoder(Meta).decode
_decode_options = msgspec.msgpack.Decoder(QueueOptions).decode
_decode_exchange = msgspec.msgpack.Decoder(ExchangeInfo).decode
_decode_binding = msgspec.msgpack.Decoder(Binding).decode
#: tuple.__new__(NewRow, fields) is the same object as NewRow(*fields) without the
#: NamedTuple's generated Python-level __new__: measurably cheaper once per message.
_new_row = tuple.__new__


class _Queue:
    """Live, loop-side state of one queue."""

    __slots__ = (
        "consumers",
        "created_at",
        "id",
        "last_used",
        "name",
        "options",
        "polling",
        "ref",
        "waiters",
    )

    def __init__(self, qid: int, name: str, options: QueueOptions, created_at: float) -> None:
        self.id = qid
        self.name = name
        self.options = options
        self.created_at = created_at
        self.ref = QueueRef(qid, name, options)
        self.waiters = Waiters()
        self.consumers = 0  # registered push consumers (AMQP basic.consume)
        self.polling = 0  # long polls waiting that are not registered consumers
        self.last_used = created_at

    def info(self) -> QueueInfo:
        return QueueInfo(name=self.name, options=self.options, created_at=self.created_at)


def parse_receipt(receipt: str) -> tuple[int, int]:
    """(message id, lease token) from a receipt; ReceiptInvalid if it is malformed."""
    try:
        mid, tok = receipt.split(".", 1)
        return int(mid, 16), int(tok, 16)
    except (ValueError, AttributeError):
        raise errors.ReceiptInvalid(f"malformed receipt {str(receipt)[:80]!r}") from None


def make_receipt(mid: int, token: int) -> str:
    return f"{mid:x}.{token:x}"


class Broker:
    def __init__(
        self,
        store: Store,
        *,
        clock: Clock | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        timers: bool = True,
        max_queues: int | None = None,
    ) -> None:
        self.store = store
        #: Creating more queues than this raises LimitExceeded (None: no limit).
        self.max_queues = max_queues
        self.clock: Clock = clock or SystemClock()
        self.max_message_size = max_message_size
        self._queues: dict[str, _Queue] = {}
        self._by_id: dict[int, _Queue] = {}
        self._exchanges: dict[str, ExchangeInfo] = {}
        self._bindings: dict[tuple[Any, ...], Binding] = {}
        self._routing = RoutingTable({}, [])
        self._closed = False
        self._timers_enabled = timers
        self._timer_task: asyncio.Task[None] | None = None
        self._timer_wake: asyncio.Event | None = None
        self._next_due: float | None = None
        self._deleted_callbacks: list[Callable[[str], None]] = []
        self._lock = asyncio.Lock()  # serializes declare/delete of queues and exchanges
        self._sync_task: asyncio.Task[None] | None = None  # catalog reload (shared stores)
        self._sync_again = False
        self._catalog_version = -1  # the store's catalog version the cache reflects
        self._outside_changes: int | None = None  # see tick()

    # -- lifecycle ------------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        url: str = "memory://",
        *,
        durability: str = "fsync",
        clock: Clock | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        timers: bool = True,
        max_queues: int | None = None,
    ) -> Broker:
        from conveyor.store import open_store

        store = open_store(url, durability=durability)
        broker = cls(
            store,
            clock=clock,
            max_message_size=max_message_size,
            timers=timers,
            max_queues=max_queues,
        )
        try:
            await broker.start()
        except BaseException:
            await store.close()
            raise
        return broker

    async def start(self) -> None:
        def load(tx: Tx) -> tuple[list[Any], list[tuple[str, bytes]], list[bytes]]:
            return tx.list_queues(), tx.load_exchanges(), tx.load_bindings()

        queues, exchanges, bindings = await self.store.run(load)
        for row in queues:
            self._add_queue(row.id, row.name, _decode_options(row.options), row.created_at)
        for name, blob in exchanges:
            self._exchanges[name] = _decode_exchange(blob)
        for blob in bindings:
            b = _decode_binding(blob)
            self._bindings[b.key()] = b
        missing = {n: t for n, t in STANDARD_EXCHANGES.items() if n not in self._exchanges}
        if missing:
            for name, kind in missing.items():
                self._exchanges[name] = ExchangeInfo(name=name, type=kind)
            infos = [self._exchanges[n] for n in missing]
            await self.store.run(lambda tx: [tx.save_exchange(i.name, _encode(i)) for i in infos])
        self._rebuild_routing()
        if not self.store.shared:
            # This process is the store's only user, so no connection that held a
            # session lease survives: give those messages back now, as RabbitMQ
            # requeues unacked deliveries at restart, rather than after 30 minutes.
            released = await self.store.run(lambda tx: tx.release_session_leases(SESSION_TOKEN))
            if released:
                log.info("returned %d messages leased by connections before a restart", released)
        self._watch_store()
        if self._timers_enabled:
            self._timer_wake = asyncio.Event()
            self._timer_task = asyncio.get_running_loop().create_task(
                self._timer_loop(), name="conveyor-timers"
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for q in self._queues.values():
            q.waiters.notify_all()
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
        await self.store.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise errors.ClosedError("the broker is closed")

    def on_queue_deleted(self, callback: Callable[[str], None]) -> None:
        self._deleted_callbacks.append(callback)

    # -- other nodes (stores shared by several processes, e.g. PostgreSQL) ------------------
    def _watch_store(self) -> None:
        """Let the store tell us, from its listener thread, about messages other nodes
        made ready and about catalog changes (queues, exchanges, bindings)."""
        if not self.store.shared:
            return
        loop = asyncio.get_running_loop()

        def ready(qid: int | None, n: int) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self._remote_ready, qid, n)

        def catalog() -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._remote_catalog)

        self.store.set_ready_callback(ready)
        self.store.set_catalog_callback(catalog)

    def _remote_ready(self, qid: int | None, n: int) -> None:
        if self._closed:
            return
        if qid is None:  # notifications may have been missed: everyone looks again
            for q in self._queues.values():
                q.waiters.notify_all()
            return
        target = self._by_id.get(qid)
        if target is not None:
            target.waiters.notify(n)

    def _remote_catalog(self) -> None:
        if self._closed:
            return
        if self._sync_task is not None and not self._sync_task.done():
            self._sync_again = True
            return
        self._sync_task = asyncio.get_running_loop().create_task(
            self._sync_loop(), name="conveyor-catalog-sync"
        )

    async def _sync_loop(self) -> None:
        while not self._closed:
            self._sync_again = False
            try:
                await self._sync_catalog()
            except errors.ClosedError:
                return
            except Exception:
                log.exception("reloading queues and exchanges failed")
            if not self._sync_again:
                return

    async def _sync_catalog(self) -> None:
        """Make the cached queues, exchanges and bindings match the store."""

        def load(tx: Tx) -> tuple[int, list[Any], list[tuple[str, bytes]], list[bytes]]:
            return tx.catalog_version(), tx.list_queues(), tx.load_exchanges(), tx.load_bindings()

        async with self._lock:
            version, queues, exchanges, bindings = await self.store.run(load)
            self._catalog_version = version
            seen: set[str] = set()
            gone: list[_Queue] = []
            for row in queues:
                seen.add(row.name)
                opts = _decode_options(row.options)
                q = self._queues.get(row.name)
                if q is not None and q.id != row.id:  # deleted and created again
                    gone.append(q)
                    self._by_id.pop(q.id, None)
                    q = None
                if q is None:
                    self._add_queue(row.id, row.name, opts, row.created_at)
                elif q.options != opts:
                    q.options = opts
                    q.ref = QueueRef(q.id, q.name, opts)
                    q.waiters.notify_all()
            for name in [n for n in self._queues if n not in seen]:
                q = self._queues.pop(name)
                self._by_id.pop(q.id, None)
                gone.append(q)
            self._exchanges = {name: _decode_exchange(blob) for name, blob in exchanges}
            self._bindings = {b.key(): b for b in map(_decode_binding, bindings)}
            self._rebuild_routing()
        for q in gone:
            q.waiters.notify_all()
            for cb in list(self._deleted_callbacks):
                try:
                    cb(q.name)
                except Exception:
                    log.exception("queue-deleted callback failed")

    async def _catalog_miss(self, exchange: str) -> None:
        """An exchange is not cached: another node or process sharing the store may
        have just declared it, so reload before calling it missing."""
        if exchange and exchange not in self._exchanges:
            await self._sync_catalog()

    # -- queue registry ---------------------------------------------------------------------
    def _add_queue(self, qid: int, name: str, options: QueueOptions, created: float) -> _Queue:
        q = _Queue(qid, name, options, created)
        self._queues[name] = q
        self._by_id[qid] = q
        return q

    def _lookup(self, name: str) -> QueueRef | None:
        q = self._queues.get(name)
        return q.ref if q is not None else None

    async def _q(self, name: str) -> _Queue:
        self._check_open()
        q = self._queues.get(name)
        if q is None:
            check_name(name)
            # Another node (or process) may have created it: look in the store.
            row = await self.store.run(lambda tx: tx.queue_by_name(name), relaxed=True)
            if row is None:
                raise errors.QueueNotFound(f"queue {name!r} does not exist")
            q = self._queues.get(name) or self._add_queue(
                row.id, row.name, _decode_options(row.options), row.created_at
            )
        return q

    # -- queues -------------------------------------------------------------------------------
    async def declare_queue(
        self, name: str, options: QueueOptions | None = None, *, passive: bool = False
    ) -> QueueInfo:
        self._check_open()
        check_name(name)
        if options is not None:
            if not isinstance(options, QueueOptions):
                raise errors.InvalidArgument("options must be QueueOptions")
            options.validate()
        if passive:
            q = await self._q(name)
            q.last_used = self.clock.now()
            return q.info()
        async with self._lock:
            existing = self._queues.get(name)
            if existing is None:
                row = await self.store.run(lambda tx: tx.queue_by_name(name))
                if row is not None:
                    existing = self._add_queue(
                        row.id, row.name, _decode_options(row.options), row.created_at
                    )
            if existing is not None:
                if options is not None and options != existing.options:
                    raise errors.QueueExists(
                        f"queue {name!r} exists with different options"
                        f" ({_diff(existing.options, options)})"
                    )
                existing.last_used = self.clock.now()
                return existing.info()
            opts = options or QueueOptions()
            if opts.dead_letter is not None and opts.dead_letter == name:
                raise errors.InvalidArgument("a queue cannot be its own dead-letter queue")
            now = self.clock.now()
            blob = _encode(opts)
            dlq_missing = opts.dead_letter is not None and opts.dead_letter not in self._queues
            limit = self.max_queues

            def check_limit(tx: Tx) -> None:
                # Counted in the store, so several nodes over one database share the limit.
                if limit is not None and len(tx.list_queues()) + 1 + dlq_missing > limit:
                    raise errors.LimitExceeded(
                        f"cannot create queue {name!r}: the server allows at most {limit} queues"
                    )

            def create(tx: Tx) -> tuple[QueueRow, QueueRow | None, bool]:
                # Another process sharing the store may have created it since we
                # looked: then this is a redeclare, not a second queue.
                raced = tx.queue_by_name(name)
                if raced is not None:
                    return raced, None, True
                check_limit(tx)
                dlq: QueueRow | None = None
                if dlq_missing and opts.dead_letter is not None:
                    dlq = tx.queue_by_name(opts.dead_letter) or tx.create_queue(
                        opts.dead_letter, _encode(QueueOptions()), now
                    )
                return tx.create_queue(name, blob, now), dlq, False

            created, dlq_row, raced = await self.store.run(create)
            if dlq_row is not None and dlq_row.name not in self._queues:
                self._add_queue(
                    dlq_row.id, dlq_row.name, _decode_options(dlq_row.options), dlq_row.created_at
                )
            if raced:
                other = self._queues.get(name) or self._add_queue(
                    created.id, name, _decode_options(created.options), created.created_at
                )
                if options is not None and options != other.options:
                    raise errors.QueueExists(
                        f"queue {name!r} exists with different options"
                        f" ({_diff(other.options, options)})"
                    )
                return other.info()
            q = self._add_queue(created.id, name, opts, now)
            return q.info()

    async def get_queue(self, name: str) -> QueueInfo:
        return (await self._q(name)).info()

    async def list_queues(self, prefix: str = "") -> list[QueueInfo]:
        self._check_open()
        rows = await self.store.run(lambda tx: tx.list_queues(), relaxed=True)
        for row in rows:
            if row.name not in self._queues:
                self._add_queue(row.id, row.name, _decode_options(row.options), row.created_at)
        return [self._queues[r.name].info() for r in rows if r.name.startswith(prefix)]

    async def update_queue(self, name: str, options: QueueOptions) -> QueueInfo:
        q = await self._q(name)
        options.validate()
        if options.dead_letter == name:
            raise errors.InvalidArgument("a queue cannot be its own dead-letter queue")
        if options.fifo != q.options.fifo:
            raise errors.InvalidArgument("fifo cannot be changed after a queue is created")
        blob = _encode(options)
        await self.store.run(lambda tx: tx.update_queue(q.id, blob))
        q.options = options
        q.ref = QueueRef(q.id, q.name, options)
        q.waiters.notify_all()
        return q.info()

    async def delete_queue(
        self, name: str, *, if_unused: bool = False, if_empty: bool = False
    ) -> int:
        q = await self._q(name)
        if if_unused and q.consumers > 0:
            raise errors.Conflict(f"queue {name!r} in use by {q.consumers} consumer(s)")
        async with self._lock:
            doomed = [
                b
                for b in self._bindings.values()
                if b.destination_kind == "queue" and b.destination == name
            ]
            keys = [_encode(list(b.key())) for b in doomed]

            def drop(tx: Tx) -> int:
                if if_empty:
                    c = tx.counters(q.id)
                    if c.ready + c.in_flight + c.delayed:
                        raise errors.Conflict(f"queue {name!r} is not empty")
                for k in keys:
                    tx.delete_binding(k)
                return tx.delete_queue(q.id)

            n = await self.store.run(drop)
            for b in doomed:
                self._bindings.pop(b.key(), None)
            self._rebuild_routing()
            self._queues.pop(name, None)
            self._by_id.pop(q.id, None)
        q.waiters.notify_all()
        for cb in list(self._deleted_callbacks):
            try:
                cb(name)
            except Exception:
                log.exception("queue-deleted callback failed")
        return n

    async def purge_queue(self, name: str, *, in_flight: bool = False) -> int:
        """Delete waiting messages; with ``in_flight`` leased ones too (SQS semantics)."""
        q = await self._q(name)
        return await self.store.run(lambda tx: tx.purge(q.id, in_flight))

    async def peek(self, name: str, max_messages: int = 10) -> list[Delivery]:
        q = await self._q(name)
        n = _count("max_messages", max_messages)
        rows = await self.store.run(lambda tx: tx.peek(q.id, n), relaxed=True)
        return [_delivery(q.name, r, None) for r in rows]

    async def stats(self, name: str) -> QueueStats:
        q = await self._q(name)

        def read(tx: Tx) -> tuple[Any, float | None]:
            return tx.counters(q.id), tx.oldest_sent_at(q.id)

        c, oldest = await self.store.run(read, relaxed=True)
        now = self.clock.now()
        return QueueStats(
            ready=c.ready,
            in_flight=c.in_flight,
            delayed=c.delayed,
            dead_lettered=c.dead_total,
            oldest_age=max(0.0, now - oldest) if oldest is not None else 0.0,
            sent_total=c.sent_total,
            received_total=c.received_total,
            acked_total=c.acked_total,
            nacked_total=c.nacked_total,
            expired_total=c.expired_total,
            consumers=q.consumers + q.polling,
        )

    def consumer_count(self, name: str) -> int:
        q = self._queues.get(name)
        return 0 if q is None else q.consumers + q.polling

    def consumer_added(self, name: str) -> None:
        q = self._queues.get(name)
        if q is not None:
            q.consumers += 1

    def consumer_removed(self, name: str) -> None:
        q = self._queues.get(name)
        if q is not None:
            q.consumers = max(0, q.consumers - 1)
            q.last_used = self.clock.now()

    # -- sending ------------------------------------------------------------------------------
    def _row(self, q: _Queue, msg: NewMessage, now: float, exchange: str, key: str) -> NewRow:
        return self._rows(q, (msg,), now, exchange, key)[0]

    def _rows(
        self, q: _Queue, msgs: Sequence[NewMessage], now: float, exchange: str, key: str
    ) -> list[NewRow]:
        """Validate ``msgs`` bound for ``q`` and turn them into rows, in order (the first
        bad message raises). What depends only on the queue and the route is worked out
        once per batch: this loop runs for every message sent."""
        opts = q.options
        # The server's limit is a ceiling; a queue may only lower it.
        limit = min(opts.max_message_size or self.max_message_size, self.max_message_size)
        max_priority = opts.max_priority
        queue_delay = opts.delay
        queue_ttl = opts.message_ttl
        fifo = opts.fifo
        # The common case (no headers, no properties): the blob depends only on where
        # the message was published, so it is encoded once per route.
        plain_meta = _plain_meta(exchange, key)
        rows: list[NewRow] = []
        for msg in msgs:
            if not isinstance(msg, NewMessage):
                raise errors.InvalidArgument("expected a NewMessage")
            body = msg.body
            if not isinstance(body, bytes):
                raise errors.InvalidArgument(f"body must be bytes, got {type(body).__name__}")
            if len(body) > limit:
                raise errors.MessageTooLarge(
                    f"message body is {len(body)} bytes; the limit for queue {q.name!r} is {limit}"
                )
            priority = msg.priority
            if priority.__class__ is not int:  # bool is an int subclass: refuse it too
                raise errors.InvalidArgument("priority must be an integer")
            if priority < 0:
                priority = 0
            elif priority > max_priority:
                priority = max_priority
            delay = (
                queue_delay if msg.delay is None else check_seconds("delay", msg.delay, MAX_DELAY)
            )
            assert delay is not None
            ttl = None if msg.ttl is None else check_seconds("ttl", msg.ttl, MAX_DELAY)
            if queue_ttl is not None:
                ttl = queue_ttl if ttl is None else min(ttl, queue_ttl)
            dedup = msg.dedup_id
            if dedup is not None and (not isinstance(dedup, str) or not 0 < len(dedup) <= 128):
                raise errors.InvalidArgument("dedup_id must be a string of 1 to 128 characters")
            group = msg.group_id
            if group is not None and (not isinstance(group, str) or not 0 < len(group) <= 128):
                raise errors.InvalidArgument("group_id must be a string of 1 to 128 characters")
            if fifo and group is None:
                group = ""  # a FIFO queue without groups is one strictly ordered group
            headers = msg.headers
            if not headers and headers.__class__ is dict and msg.properties == _NO_PROPERTIES:
                meta = plain_meta
            else:
                meta = _meta_blob(headers, msg.properties, exchange, key)
            rows.append(
                _new_row(
                    NewRow,
                    (
                        DELAYED if delay > 0 else READY,
                        priority,
                        now + delay if delay > 0 else None,
                        now + ttl if ttl is not None else None,
                        now,
                        group,
                        dedup,
                        meta,
                        body,
                    ),
                )
            )
        return rows

    async def send(self, queue: str, msg: NewMessage) -> SendResult:
        return (await self.send_batch(queue, [msg]))[0]

    async def send_batch(self, queue: str, msgs: Sequence[NewMessage]) -> list[SendResult]:
        q = await self._q(queue)
        if not msgs:
            return []
        if len(msgs) > MAX_BATCH:
            raise errors.InvalidArgument(f"a batch holds at most {MAX_BATCH} messages")
        now = self.clock.now()
        rows = self._rows(q, msgs, now, DEFAULT_EXCHANGE, queue)
        ref = q.ref
        lookup, routing = self._lookup, self._routing
        q.last_used = now

        def script(tx: Tx) -> tuple[list[SendResult], dict[str, int]]:
            woken: dict[str, int] = {}
            results = _insert(tx, ref, rows, now, lookup, routing, woken)
            return [r for r in results if r is not None], woken

        results, woken = await self.store.run(script)
        self._after_insert(rows, woken)
        return results

    def _after_insert(self, rows: Sequence[NewRow], woken: dict[str, int]) -> None:
        for name, n in woken.items():
            wq = self._queues.get(name)
            if wq is not None:
                wq.waiters.notify(n)
        due = [r.visible_at for r in rows if r.visible_at is not None]
        due += [r.expires_at for r in rows if r.expires_at is not None]
        if due:
            self._schedule(min(due))

    # -- exchanges --------------------------------------------------------------------------------
    async def declare_exchange(
        self,
        name: str,
        type: str = "direct",
        *,
        durable: bool = True,
        auto_delete: bool = False,
        internal: bool = False,
        arguments: dict[str, Any] | None = None,
        passive: bool = False,
    ) -> ExchangeInfo:
        self._check_open()
        if name == DEFAULT_EXCHANGE:
            return ExchangeInfo(name="", type="direct")
        check_name(name, "exchange")
        await self._catalog_miss(name)
        existing = self._exchanges.get(name)
        if passive:
            if existing is None:
                raise errors.ExchangeNotFound(f"exchange {name!r} does not exist")
            return existing
        if type not in EXCHANGE_TYPES:
            raise errors.InvalidArgument(
                f"exchange type {type!r} is not one of {', '.join(EXCHANGE_TYPES)}"
            )
        info = ExchangeInfo(
            name=name,
            type=type,
            durable=durable,
            auto_delete=auto_delete,
            internal=internal,
            arguments=dict(arguments or {}),
        )
        if existing is not None:
            if (existing.type, existing.durable, existing.auto_delete, existing.internal) != (
                info.type,
                info.durable,
                info.auto_delete,
                info.internal,
            ):
                raise errors.ExchangeExists(
                    f"exchange {name!r} exists as type {existing.type!r}"
                    f" (durable={existing.durable}, auto_delete={existing.auto_delete})"
                )
            return existing
        try:
            blob = _encode(info)
        except (TypeError, ValueError) as exc:
            raise errors.InvalidArgument(f"exchange arguments cannot be stored: {exc}") from None
        async with self._lock:
            await self.store.run(lambda tx: tx.save_exchange(name, blob))
            self._exchanges[name] = info
            self._rebuild_routing()
        return info

    async def delete_exchange(self, name: str, *, if_unused: bool = False) -> None:
        self._check_open()
        if name == DEFAULT_EXCHANGE:
            raise errors.InvalidArgument("the default exchange cannot be deleted")
        await self._catalog_miss(name)
        if name not in self._exchanges:
            raise errors.ExchangeNotFound(f"exchange {name!r} does not exist")
        doomed = [
            b
            for b in self._bindings.values()
            if b.source == name or (b.destination_kind == "exchange" and b.destination == name)
        ]
        if if_unused and any(b.source == name for b in doomed):
            raise errors.Conflict(f"exchange {name!r} in use")
        keys = [_encode(list(b.key())) for b in doomed]

        def drop(tx: Tx) -> None:
            for k in keys:
                tx.delete_binding(k)
            tx.delete_exchange(name)

        async with self._lock:
            await self.store.run(drop)
            self._exchanges.pop(name, None)
            for b in doomed:
                self._bindings.pop(b.key(), None)
            self._rebuild_routing()

    async def list_exchanges(self) -> list[ExchangeInfo]:
        self._check_open()
        return [
            ExchangeInfo(name="", type="direct"),
            *sorted(self._exchanges.values(), key=lambda e: e.name),
        ]

    async def get_exchange(self, name: str) -> ExchangeInfo:
        return await self.declare_exchange(name, passive=True)

    async def bind(
        self,
        exchange: str,
        queue: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        await self._q(queue)
        await self._bind(
            Binding(
                source=exchange,
                destination=queue,
                destination_kind="queue",
                routing_key=routing_key,
                arguments=dict(arguments or {}),
            )
        )

    async def bind_exchange(
        self,
        source: str,
        destination: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        await self._catalog_miss(destination)
        self._exchange(destination)
        await self._bind(
            Binding(
                source=source,
                destination=destination,
                destination_kind="exchange",
                routing_key=routing_key,
                arguments=dict(arguments or {}),
            )
        )

    def _exchange(self, name: str) -> ExchangeInfo:
        self._check_open()
        if name == DEFAULT_EXCHANGE:
            raise errors.InvalidArgument("the default exchange cannot be bound")
        info = self._exchanges.get(name)
        if info is None:
            raise errors.ExchangeNotFound(f"exchange {name!r} does not exist")
        return info

    async def _bind(self, b: Binding) -> None:
        await self._catalog_miss(b.source)
        self._exchange(b.source)
        if not isinstance(b.routing_key, str) or len(b.routing_key) > 255:
            raise errors.InvalidArgument("routing key must be a string of at most 255 characters")
        key = b.key()
        if key in self._bindings:
            return
        try:
            blob = _encode(b)
        except (TypeError, ValueError) as exc:
            raise errors.InvalidArgument(f"binding arguments cannot be stored: {exc}") from None
        kblob = _encode(list(key))
        async with self._lock:
            await self.store.run(lambda tx: tx.save_binding(kblob, blob))
            self._bindings[key] = b
            self._rebuild_routing()

    async def unbind(
        self,
        exchange: str,
        queue: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        await self._unbind(
            Binding(
                source=exchange,
                destination=queue,
                destination_kind="queue",
                routing_key=routing_key,
                arguments=dict(arguments or {}),
            )
        )

    async def unbind_exchange(
        self,
        source: str,
        destination: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        await self._unbind(
            Binding(
                source=source,
                destination=destination,
                destination_kind="exchange",
                routing_key=routing_key,
                arguments=dict(arguments or {}),
            )
        )

    async def _unbind(self, b: Binding) -> None:
        await self._catalog_miss(b.source)
        self._exchange(b.source)
        key = b.key()
        if key not in self._bindings:
            return  # as in RabbitMQ, unbinding what is not bound is not an error
        kblob = _encode(list(key))
        async with self._lock:
            await self.store.run(lambda tx: tx.delete_binding(kblob))
            self._bindings.pop(key, None)
            self._rebuild_routing()

    async def list_bindings(
        self, *, exchange: str | None = None, queue: str | None = None
    ) -> list[Binding]:
        self._check_open()
        out = [
            b
            for b in self._bindings.values()
            if (exchange is None or b.source == exchange)
            and (queue is None or (b.destination_kind == "queue" and b.destination == queue))
        ]
        return sorted(out, key=lambda b: (b.source, b.destination, b.routing_key))

    def _rebuild_routing(self) -> None:
        self._routing = RoutingTable(self._exchanges, self._bindings.values())

    def route(self, exchange: str, routing_key: str, headers: dict[str, Any]) -> list[str]:
        """The queues a publish would reach (no side effects)."""
        return self._routing.route(exchange, routing_key, headers, self._queues.__contains__)

    async def publish(self, exchange: str, msg: NewMessage, routing_key: str = "") -> PublishResult:
        return (await self.publish_batch(exchange, [(msg, routing_key)]))[0]

    async def publish_batch(
        self, exchange: str, items: Sequence[tuple[NewMessage, str]]
    ) -> list[PublishResult]:
        """Publish several messages through one exchange in one transaction."""
        for _ in range(4):
            try:
                return await self._publish_batch(exchange, items)
            except _StaleCatalog:
                # Another node changed exchanges, bindings or queues since this one
                # cached them: route again with the current ones.
                await self._sync_catalog()
        return await self._publish_batch(exchange, items, check=False)

    async def _publish_batch(
        self, exchange: str, items: Sequence[tuple[NewMessage, str]], check: bool = True
    ) -> list[PublishResult]:
        self._check_open()
        await self._catalog_miss(exchange)
        if exchange != DEFAULT_EXCHANGE and exchange not in self._exchanges:
            raise errors.ExchangeNotFound(f"exchange {exchange!r} does not exist")
        if len(items) > MAX_BATCH:
            raise errors.InvalidArgument(f"a batch holds at most {MAX_BATCH} messages")
        now = self.clock.now()
        plan: list[list[tuple[QueueRef, NewRow]]] = []
        all_rows: list[NewRow] = []
        for msg, key in items:
            if not isinstance(key, str) or len(key) > 255:
                raise errors.InvalidArgument(
                    "routing key must be a string of at most 255 characters"
                )
            if not isinstance(msg, NewMessage):
                raise errors.InvalidArgument("expected a NewMessage")
            targets = self.route(exchange, key, msg.headers)
            per: list[tuple[QueueRef, NewRow]] = []
            for name in targets:
                q = self._queues[name]
                row = self._row(q, msg, now, exchange, key)
                per.append((q.ref, row))
                all_rows.append(row)
            plan.append(per)
        lookup, routing = self._lookup, self._routing
        version = self._catalog_version if check and self.store.shared else None
        # No target can refuse a copy (no max_length) and no copy needs a dedup check:
        # then each queue's copies can be stored with one insert.
        grouped = len(all_rows) > 1 and all(
            ref.options.max_length is None and row.dedup_id is None
            for per in plan
            for ref, row in per
        )

        def script(tx: Tx) -> tuple[list[PublishResult], dict[str, int]]:
            if version is not None and tx.catalog_version() != version:
                raise _StaleCatalog("the routing table changed on another node")
            woken: dict[str, int] = {}
            if grouped:
                return _publish_grouped(tx, plan, now, lookup, routing, woken), woken
            out: list[PublishResult] = []
            for per in plan:
                res = PublishResult(routed=0)
                for ref, row in per:
                    try:
                        got = _insert(tx, ref, [row], now, lookup, routing, woken)
                    except errors.QueueFull:
                        res.rejected.append(ref.name)
                        continue
                    r = got[0]
                    if r is not None:
                        res.routed += 1
                        res.ids[ref.name] = r.id
                out.append(res)
            return out, woken

        results, woken = await self.store.run(script)
        self._after_insert(all_rows, woken)
        return results

    # -- receiving ----------------------------------------------------------------------------
    async def receive(
        self,
        queue: str,
        max_messages: int = 1,
        *,
        wait: float = 0.0,
        visibility_timeout: float | None = None,
        auto_ack: bool = False,
        consumer: bool = False,
        session: bool = False,
    ) -> list[Delivery]:
        """Lease up to ``max_messages``; with ``wait``, long-poll until one is ready.

        Cancel-safe: if the caller is cancelled while a lease is being taken, the leased
        messages are released again (their receive count taken back). ``consumer``: the
        caller is a registered push consumer (``consumer_added``), so this poll is not
        counted again in consumer_count. ``session``: the lease belongs to a connection
        (AMQP), not to a timeout the client counts on; after a crash and restart of a
        single-node store such leases are released at once instead of at lease end.
        """
        q = await self._q(queue)
        n = _count("max_messages", max_messages)
        wait_s = check_seconds("wait", wait, MAX_WAIT) or 0.0
        vis = check_seconds("visibility_timeout", visibility_timeout, 12 * 3600)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        counted = wait_s > 0 and not consumer
        if counted:
            q.polling += 1
        try:
            while True:
                fut = q.waiters.register() if wait_s > 0 else None
                try:
                    got = await self._lease_safely(q, n, vis, auto_ack, session)
                    if got or fut is None:
                        return got
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self._closed:
                        return []
                    try:
                        await asyncio.wait_for(asyncio.shield(fut), remaining)
                    except TimeoutError:
                        return []
                    if self._closed:
                        return []
                    if self._queues.get(q.name) is not q:
                        raise errors.QueueNotFound(f"queue {q.name!r} was deleted")
                finally:
                    if fut is not None:
                        q.waiters.discard(fut)
        finally:
            if counted:
                q.polling -= 1

    async def _lease_safely(
        self, q: _Queue, n: int, vis: float | None, auto_ack: bool, session: bool = False
    ) -> list[Delivery]:
        task = asyncio.ensure_future(self._lease(q, n, vis, auto_ack, session))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The store script runs to completion regardless; give back what it leased
            # so nothing sits invisible for a whole lease with nobody holding it.
            with contextlib.suppress(Exception):
                got = await task
                receipts = [d.receipt for d in got if d.receipt is not None]
                if receipts and not self._closed:
                    leases = [parse_receipt(r) for r in receipts]
                    await self.store.run(
                        lambda tx: tx.release(q.id, leases, None, undo=True), relaxed=True
                    )
                    q.waiters.notify(len(receipts))
            raise

    async def _lease(
        self, q: _Queue, n: int, vis: float | None, auto_ack: bool, session: bool = False
    ) -> list[Delivery]:
        now = self.clock.now()
        q.last_used = now
        timeout = q.options.visibility_timeout if vis is None else vis
        until = now + timeout
        token = random.getrandbits(60) | (SESSION_TOKEN if session else 0)
        ref, lookup, routing = q.ref, self._lookup, self._routing
        # A lease lost to a power cut only means a redelivery, so it need not wait for
        # the disk; an auto-ack delivery deletes the message and must.
        rows, woken = await self.store.run(
            lambda tx: scripts.lease(tx, ref, n, now, until, token, auto_ack, lookup, routing),
            relaxed=not auto_ack,
        )
        for name, k in woken.items():
            wq = self._queues.get(name)
            if wq is not None:
                wq.waiters.notify(k)
        if rows and not auto_ack:
            self._schedule(until)
        name = q.name
        if auto_ack:
            return [_delivery(name, r, None) for r in rows]
        # make_receipt(r.id, token) with the token's half formatted once per receive.
        tail = f".{token:x}"
        return [_delivery(name, r, f"{r.id:x}{tail}") for r in rows]

    async def ack(self, queue: str, receipt: str) -> None:
        res = await self.ack_batch(queue, [receipt])
        if res.failed:
            raise errors.ReceiptInvalid(_stale(receipt))

    async def ack_batch(
        self, queue: str, receipts: Sequence[str], *, relaxed: bool = False
    ) -> AckResult:
        """``relaxed``: the caller tells no one the ack is stored (AMQP's Basic.Ack has no
        reply), so the commit need not wait for the disk; an ack lost to a power cut
        means a redelivery, as with a lease."""
        q = await self._q(queue)
        leases, bad = _parse_all(receipts)
        done = (
            await self.store.run(lambda tx: tx.ack(q.id, leases), relaxed=relaxed)
            if leases
            else set()
        )
        return _ack_result(receipts, leases, bad, done)

    async def nack(
        self, queue: str, receipt: str, *, delay: float = 0.0, requeue: bool = True
    ) -> None:
        res = await self.nack_batch(queue, [receipt], delay=delay, requeue=requeue)
        if res.failed:
            raise errors.ReceiptInvalid(_stale(receipt))

    async def nack_batch(
        self,
        queue: str,
        receipts: Sequence[str],
        *,
        delay: float = 0.0,
        requeue: bool = True,
    ) -> AckResult:
        q = await self._q(queue)
        d = check_seconds("delay", delay, MAX_DELAY) or 0.0
        leases, bad = _parse_all(receipts)
        now = self.clock.now()
        ref, lookup, routing = q.ref, self._lookup, self._routing

        def script(tx: Tx) -> tuple[set[int], dict[str, int]]:
            woken: dict[str, int] = {}
            if not requeue:
                rows = tx.leased_rows(ref.id, leases)
                tx.count(ref.id, "nacked", len(rows))
                scripts.dead_letter(tx, ref, rows, "rejected", now, lookup, routing, woken)
                return {r.id for r in rows}, woken
            done = tx.release(ref.id, leases, now + d if d > 0 else None)
            if d <= 0 and done:
                woken[ref.name] = len(done)
            return done, woken

        done, woken = await self.store.run(script, relaxed=True) if leases else (set(), {})
        for name, k in woken.items():
            wq = self._queues.get(name)
            if wq is not None:
                wq.waiters.notify(k)
        if d > 0 and done:
            self._schedule(now + d)
        return _ack_result(receipts, leases, bad, done)

    async def extend(self, queue: str, receipt: str, timeout: float) -> None:
        res = await self.extend_batch(queue, [receipt], timeout)
        if res.failed:
            raise errors.ReceiptInvalid(_stale(receipt))

    async def extend_batch(self, queue: str, receipts: Sequence[str], timeout: float) -> AckResult:
        q = await self._q(queue)
        t = check_seconds("timeout", timeout, 12 * 3600)
        assert t is not None
        leases, bad = _parse_all(receipts)
        until = self.clock.now() + t
        if t == 0:
            # Extending to zero makes the message visible at once (SQS semantics).
            done = await self.store.run(lambda tx: tx.release(q.id, leases, None), relaxed=True)
            if done:
                q.waiters.notify(len(done))
        else:
            done = await self.store.run(lambda tx: tx.extend(q.id, leases, until), relaxed=True)
            self._schedule(until)
        return _ack_result(receipts, leases, bad, done)

    async def redrive(
        self, dead_letter_queue: str, *, to: str | None = None, max_messages: int | None = None
    ) -> int:
        """Move dead-lettered messages back to the queue they died in (or ``to``)."""
        dlq = await self._q(dead_letter_queue)
        dest = await self._q(to) if to is not None else None
        limit = max_messages if max_messages is not None else 2**62
        _count("max_messages", max(1, min(limit, MAX_BATCH)))
        moved = 0
        while moved < limit:
            chunk = min(1000, limit - moved)
            refs = {name: q.ref for name, q in self._queues.items()}
            dest_ref = dest.ref if dest is not None else None
            now = self.clock.now()

            def script(
                tx: Tx,
                chunk: int = chunk,
                refs: dict[str, QueueRef] = refs,
                dest_ref: QueueRef | None = dest_ref,
                now: float = now,
            ) -> tuple[int, dict[str, int]]:
                rows = tx.peek(dlq.id, chunk)
                by_target: dict[int, list[tuple[int, bytes]]] = {}
                names: dict[int, str] = {}
                for r in rows:
                    meta = _decode_meta(r.meta)
                    target = dest_ref
                    if target is None and meta.deaths:
                        target = refs.get(meta.deaths[0].queue)
                    if target is None:
                        target = refs.get(meta.routing_key) if meta.routing_key else None
                    if target is None or target.id == dlq.id:
                        continue
                    by_target.setdefault(target.id, []).append((r.id, r.meta))
                    names[target.id] = target.name
                for tid, moves in by_target.items():
                    tx.move(moves, tid, None)
                return sum(len(m) for m in by_target.values()), {
                    names[t]: len(m) for t, m in by_target.items()
                }

            n, woken = await self.store.run(script)
            for name, k in woken.items():
                wq = self._queues.get(name)
                if wq is not None:
                    wq.waiters.notify(k)
            moved += n
            if n < chunk:
                break
        return moved

    # -- timers -------------------------------------------------------------------------------
    def _schedule(self, when: float) -> None:
        if self._next_due is None or when < self._next_due:
            self._next_due = when
            if self._timer_wake is not None:
                self._timer_wake.set()

    async def tick(self) -> None:
        """Run every timer that is due: delayed -> ready, expired leases -> ready,
        TTL expiry, dedup forgetting, unused-queue expiry. Tests call this after moving a
        FakeClock; the server runs it from a background task."""
        self._check_open()
        now = self.clock.now()
        by_id = {qid: q.ref for qid, q in self._by_id.items()}
        lookup, routing = self._lookup, self._routing

        def script(tx: Tx) -> tuple[dict[int, int], dict[str, int], float | None, int]:
            ready = tx.promote_delayed(now)
            for qid, k in tx.expire_leases(now).items():
                ready[qid] = ready.get(qid, 0) + k
            woken = scripts.expire(tx, now, by_id, lookup, routing)
            tx.forget_dedup(now)
            return ready, woken, tx.next_due(), tx.outside_changes()

        ready, woken, next_due, outside = await self.store.run(script, relaxed=True)
        if outside != self._outside_changes:
            first = self._outside_changes is None
            self._outside_changes = outside
            if not first and not self.store.shared:
                # Another process wrote to this store (an embedded directory shared by
                # several programs, or the CLI beside a server): its sends cannot wake
                # our long polls and its catalog changes are not in our cache, so look
                # again. (Shared stores such as PostgreSQL notify instead.)
                self._remote_ready(None, 0)
                self._remote_catalog()
        for qid, k in ready.items():
            q = self._by_id.get(qid)
            if q is not None:
                q.waiters.notify(k)
        for name, k in woken.items():
            wq = self._queues.get(name)
            if wq is not None:
                wq.waiters.notify(k)
        self._next_due = next_due
        await self._expire_unused(now)

    async def _expire_unused(self, now: float) -> None:
        for q in list(self._queues.values()):
            exp = q.options.expires
            if (
                exp is not None
                and q.consumers == 0
                and q.polling == 0
                and (now - q.last_used >= exp)
            ):
                log.info("deleting queue %s: unused for %.0f s", q.name, now - q.last_used)
                with contextlib.suppress(errors.NotFound):
                    await self.delete_queue(q.name)

    async def _timer_loop(self) -> None:
        assert self._timer_wake is not None
        while not self._closed:
            try:
                await self.tick()
            except errors.ClosedError:
                return
            except Exception:
                log.exception("timer round failed")
            now = self.clock.now()
            delay = 1.0
            if self._next_due is not None:
                delay = min(1.0, max(0.0, self._next_due - now))
            self._timer_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), delay + 0.001)
            if self._next_due is not None and self._next_due > self.clock.now():
                # Woken early for a later deadline: sleep on until it is due.
                rest = min(1.0, self._next_due - self.clock.now())
                if rest > 0:
                    self._timer_wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._timer_wake.wait(), rest + 0.001)


class _StaleCatalog(errors.ConveyorError):
    """A publish planned with a routing table older than the store's (shared stores)."""


def _insert(
    tx: Tx,
    ref: QueueRef,
    rows: Sequence[NewRow],
    now: float,
    lookup: scripts.Lookup,
    routing: RoutingTable,
    woken: dict[str, int],
) -> list[SendResult | None]:
    """Store rows in one queue with dedup and max_length applied."""
    for row in rows:
        if row.dedup_id is not None:
            return _insert_dedup(tx, ref, rows, now, lookup, routing, woken)
    # No dedup ids (the common case): every row is stored, in order.
    _refuse_if_full(tx, ref, len(rows))
    ids = tx.insert(ref.id, rows) if rows else []
    results: list[SendResult | None] = [SendResult(id=str(mid), sequence=mid) for mid in ids]
    _inserted(tx, ref, [row.state for row in rows].count(READY), now, lookup, routing, woken)
    return results


def _publish_grouped(
    tx: Tx,
    plan: Sequence[Sequence[tuple[QueueRef, NewRow]]],
    now: float,
    lookup: scripts.Lookup,
    routing: RoutingTable,
    woken: dict[str, int],
) -> list[PublishResult]:
    """publish_batch's inserts when every copy is stored (no max_length, no dedup
    ids): one insert per queue rather than one per copy, each queue's copies in
    publish order. The results read as the copy-by-copy inserts' would."""
    by_queue: dict[int, tuple[QueueRef, list[NewRow]]] = {}
    for per in plan:
        for ref, row in per:
            entry = by_queue.get(ref.id)
            if entry is None:
                entry = by_queue[ref.id] = (ref, [])
            entry[1].append(row)
    stored = {
        qid: iter(_insert(tx, ref, rows, now, lookup, routing, woken))
        for qid, (ref, rows) in by_queue.items()
    }
    out: list[PublishResult] = []
    for per in plan:
        res = PublishResult(routed=0)
        for ref, _row in per:
            r = next(stored[ref.id])
            assert r is not None  # no dedup ids: every copy is stored
            res.routed += 1
            res.ids[ref.name] = r.id
        out.append(res)
    return out


def _refuse_if_full(tx: Tx, ref: QueueRef, n: int) -> None:
    """QueueFull if storing ``n`` more messages would pass a reject-new max_length."""
    opts = ref.options
    if (
        opts.max_length is not None
        and opts.overflow == "reject-new"
        and n
        and tx.ready_count(ref.id) + n > opts.max_length
    ):
        raise errors.QueueFull(f"queue {ref.name!r} is full (max_length {opts.max_length})")


def _insert_dedup(
    tx: Tx,
    ref: QueueRef,
    rows: Sequence[NewRow],
    now: float,
    lookup: scripts.Lookup,
    routing: RoutingTable,
    woken: dict[str, int],
) -> list[SendResult | None]:
    """_insert for a batch with dedup ids: duplicates (in the store's window or earlier
    in the batch) are answered with the first message's id and not stored."""
    opts = ref.options
    results: list[SendResult | None] = [None] * len(rows)
    fresh: list[int] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row.dedup_id is not None:
            if row.dedup_id in seen:
                results[i] = SendResult(id="", stored=False)  # filled in below
                continue
            prior = tx.find_dedup(ref.id, row.dedup_id, now)
            if prior is not None:
                results[i] = SendResult(id=str(prior), stored=False, sequence=prior)
                continue
            seen[row.dedup_id] = i
        fresh.append(i)
    _refuse_if_full(tx, ref, len(fresh))
    ids = tx.insert(ref.id, [rows[i] for i in fresh]) if fresh else []
    for i, mid in zip(fresh, ids, strict=True):
        results[i] = SendResult(id=str(mid), sequence=mid)
    for i, row in enumerate(rows):
        res = results[i]
        if res is not None and not res.stored and not res.id and row.dedup_id is not None:
            first = results[seen[row.dedup_id]]
            assert first is not None
            results[i] = SendResult(id=first.id, stored=False, sequence=first.sequence)
    dedup = [
        (rows[i].dedup_id, int(r.id))
        for i in fresh
        if (r := results[i]) is not None and rows[i].dedup_id is not None
    ]
    if dedup:
        tx.remember_dedup(
            ref.id, [(d, m) for d, m in dedup if d is not None], now + opts.dedup_window
        )
    _inserted(tx, ref, sum(1 for i in fresh if rows[i].state == READY), now, lookup, routing, woken)
    return results


def _inserted(
    tx: Tx,
    ref: QueueRef,
    n_ready: int,
    now: float,
    lookup: scripts.Lookup,
    routing: RoutingTable,
    woken: dict[str, int],
) -> None:
    """After an insert: wake receivers, and apply drop-oldest overflow."""
    opts = ref.options
    if n_ready:
        woken[ref.name] = woken.get(ref.name, 0) + n_ready
    if opts.max_length is not None and opts.overflow == "drop-oldest":
        over = tx.ready_count(ref.id) - opts.max_length
        if over > 0:
            drop = tx.read_rows(tx.oldest_ready(ref.id, over))
            scripts.dead_letter(tx, ref, drop, "maxlen", now, lookup, routing, woken)


def _delivery(queue: str, r: MessageRow, receipt: str | None) -> Delivery:
    simple = _SIMPLE_META.get(r.meta)
    if simple is None:
        meta = _decode_meta(r.meta)
        if not meta.headers and not meta.deaths and meta.properties is not None:
            if len(_SIMPLE_META) >= _SIMPLE_META_MAX:
                _SIMPLE_META.clear()  # many distinct properties: start over
            # A copy: the decoded one goes to the caller, who may change it.
            template = msgspec.structs.replace(meta.properties)
            _SIMPLE_META[r.meta] = (template, meta.exchange, meta.routing_key)
        headers = meta.headers
        properties = meta.properties if meta.properties is not None else Properties()
        exchange, routing_key, deaths = meta.exchange, meta.routing_key, meta.deaths
    else:
        # Fresh copies: a caller may change what it was handed.
        headers, deaths = {}, []
        properties = msgspec.structs.replace(simple[0])
        exchange, routing_key = simple[1], simple[2]
    # At most 15 keyword arguments: with 16, CPython builds a dict for the call
    # (CALL_FUNCTION_EX), which made this constructor about five times slower.
    d = Delivery(
        id=str(r.id),
        queue=queue,
        body=r.body,
        headers=headers,
        properties=properties,
        priority=r.priority,
        sent_at=r.sent_at,
        receive_count=r.receive_count,
        first_received_at=r.first_received_at,
        receipt=receipt,
        group_id=r.group_id or None,
        dedup_id=r.dedup_id,
        exchange=exchange,
        routing_key=routing_key,
        sequence=r.id,
    )
    if deaths:
        d.deaths = deaths
    return d


#: Meta blobs without headers or deaths -- what nearly every message carries -- decoded:
#: blob -> (properties, exchange, routing key). Decoding a Meta costs about as much as
#: building the Delivery itself; this lookup is a small fraction of that. Brokers on
#: several event loops may share it: single dict operations are atomic.
_SIMPLE_META: dict[bytes, tuple[Properties, str, str]] = {}
_SIMPLE_META_MAX = 4096


def _count(name: str, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BATCH:
        raise errors.InvalidArgument(f"{name} must be an integer from 1 to {MAX_BATCH}")
    return n


_NO_PROPERTIES = Properties()


@functools.lru_cache(maxsize=4096)
def _plain_meta(exchange: str, key: str) -> bytes:
    return _encode(Meta(exchange=exchange, routing_key=key))


def _meta_blob(headers: Any, properties: Properties, exchange: str, key: str) -> bytes:
    """The stored meta of a message with headers or properties (checked here)."""
    if not isinstance(headers, dict) or not all(isinstance(k, str) for k in headers):
        raise errors.InvalidArgument("headers must be a mapping with string keys")
    try:
        return _encode(
            Meta(headers=headers, properties=properties, exchange=exchange, routing_key=key)
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise errors.InvalidArgument(f"headers or properties cannot be stored: {exc}") from None


def _parse_all(receipts: Sequence[str]) -> tuple[list[tuple[int, int]], set[str]]:
    """parse_receipt for each receipt: the parsed leases in order and the malformed
    receipts. Receipts from one receive share their token, so its hex is parsed once."""
    if len(receipts) > MAX_BATCH:
        raise errors.InvalidArgument(f"a batch holds at most {MAX_BATCH} receipts")
    leases: list[tuple[int, int]] = []
    bad: set[str] = set()
    tok_hex: str | None = None  # never equal to a receipt's half, so the first is parsed
    tok = 0
    for r in receipts:
        try:
            mid_hex, hex_ = r.split(".", 1)
            if hex_ != tok_hex:
                tok, tok_hex = int(hex_, 16), hex_
            leases.append((int(mid_hex, 16), tok))
        except (ValueError, AttributeError):
            bad.add(r)
    return leases, bad


def _ack_result(
    receipts: Sequence[str],
    leases: Sequence[tuple[int, int]],
    bad: set[str],
    done: set[int],
) -> AckResult:
    # ``leases`` holds the parsed receipts in order, skipping the malformed ones.
    if not bad:
        failed = [r for r, (mid, _) in zip(receipts, leases, strict=True) if mid not in done]
        return AckResult(ok=len(receipts) - len(failed), failed=failed)
    failed = []
    it = iter(leases)
    for r in receipts:
        if r in bad or next(it)[0] not in done:
            failed.append(r)
    return AckResult(ok=len(receipts) - len(failed), failed=failed)


def _stale(receipt: str) -> str:
    return (
        f"receipt {receipt[:80]!r} is not the current lease of a message in this queue"
        " (it was acked, redelivered, or belongs to another queue)"
    )


def _diff(a: QueueOptions, b: QueueOptions) -> str:
    da, db = msgspec.structs.asdict(a), msgspec.structs.asdict(b)
    parts = [f"{k}: {da[k]!r} != {db[k]!r}" for k in da if da[k] != db[k]]
    return "; ".join(parts) or "equal"


__all__ = ["Broker", "make_receipt", "parse_receipt"]
