"""The asyncio client API. Embedded and remote share it: the only difference is the
``backend``, an object with the Broker's methods (the engine itself, or an HTTP client
speaking to a server)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from conveyor import errors
from conveyor.model import (
    AckResult,
    Binding,
    Delivery,
    ExchangeInfo,
    NewMessage,
    Properties,
    PublishResult,
    QueueInfo,
    QueueOptions,
    QueueStats,
    SendResult,
)

if TYPE_CHECKING:
    from conveyor.streams.client import AsyncStream
    from conveyor.streams.remote import RemoteStream

log = logging.getLogger("conveyor.client")

Body = bytes | str
Sendable = Body | NewMessage | Mapping[str, Any]


class Backend(Protocol):
    """The Broker methods the client uses (conveyor.broker.Broker satisfies it)."""

    async def close(self) -> None: ...
    async def declare_queue(
        self, name: str, options: QueueOptions | None = None, *, passive: bool = False
    ) -> QueueInfo: ...
    async def get_queue(self, name: str) -> QueueInfo: ...
    async def list_queues(self, prefix: str = "") -> list[QueueInfo]: ...
    async def update_queue(self, name: str, options: QueueOptions) -> QueueInfo: ...
    async def delete_queue(
        self, name: str, *, if_unused: bool = False, if_empty: bool = False
    ) -> int: ...
    async def purge_queue(self, name: str) -> int: ...
    async def peek(self, name: str, max_messages: int = 10) -> list[Delivery]: ...
    async def stats(self, name: str) -> QueueStats: ...
    async def send_batch(self, queue: str, msgs: Sequence[NewMessage]) -> list[SendResult]: ...
    async def receive(
        self,
        queue: str,
        max_messages: int = 1,
        *,
        wait: float = 0.0,
        visibility_timeout: float | None = None,
        auto_ack: bool = False,
    ) -> list[Delivery]: ...
    async def ack_batch(self, queue: str, receipts: Sequence[str]) -> AckResult: ...
    async def nack_batch(
        self,
        queue: str,
        receipts: Sequence[str],
        *,
        delay: float = 0.0,
        requeue: bool = True,
    ) -> AckResult: ...
    async def extend_batch(
        self, queue: str, receipts: Sequence[str], timeout: float
    ) -> AckResult: ...
    async def redrive(
        self, dead_letter_queue: str, *, to: str | None = None, max_messages: int | None = None
    ) -> int: ...
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
    ) -> ExchangeInfo: ...
    async def delete_exchange(self, name: str, *, if_unused: bool = False) -> None: ...
    async def list_exchanges(self) -> list[ExchangeInfo]: ...
    async def bind(
        self,
        exchange: str,
        queue: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None: ...
    async def unbind(
        self,
        exchange: str,
        queue: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None: ...
    async def bind_exchange(
        self,
        source: str,
        destination: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None: ...
    async def unbind_exchange(
        self,
        source: str,
        destination: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None: ...
    async def list_bindings(
        self, *, exchange: str | None = None, queue: str | None = None
    ) -> list[Binding]: ...
    async def publish_batch(
        self, exchange: str, items: Sequence[tuple[NewMessage, str]]
    ) -> list[PublishResult]: ...


def make_message(
    body: Sendable,
    *,
    priority: int = 0,
    headers: Mapping[str, Any] | None = None,
    delay: float | None = None,
    ttl: float | None = None,
    dedup_id: str | None = None,
    group_id: str | None = None,
    properties: Properties | Mapping[str, Any] | None = None,
) -> NewMessage:
    """Build a NewMessage from what a user passes: bytes, str (UTF-8), a NewMessage, or
    a dict with the same keys as ``send``'s arguments."""
    if isinstance(body, NewMessage):
        return body
    if isinstance(body, Mapping):
        fields = dict(body)
        if "body" not in fields:
            raise errors.InvalidArgument("a message dict needs a 'body'")
        return make_message(fields.pop("body"), **fields)
    if isinstance(body, str):
        body = body.encode()
    if not isinstance(body, bytes | bytearray | memoryview):
        raise errors.InvalidArgument(f"body must be bytes or str, got {type(body).__name__}")
    if properties is None:
        props = Properties()
    elif isinstance(properties, Properties):
        props = properties
    else:
        try:
            props = Properties(**dict(properties))
        except TypeError as exc:
            raise errors.InvalidArgument(f"unknown message property: {exc}") from None
    return NewMessage(
        body=bytes(body),
        headers=dict(headers or {}),
        properties=props,
        priority=priority,
        delay=delay,
        ttl=ttl,
        dedup_id=dedup_id,
        group_id=group_id,
    )


class AsyncMessage:
    """A received message. ``ack``/``nack``/``extend`` act on this delivery's lease."""

    __slots__ = ("_queue", "delivery")

    def __init__(self, queue: AsyncQueue, delivery: Delivery) -> None:
        self._queue = queue
        self.delivery = delivery

    def __getattr__(self, name: str) -> Any:
        return getattr(self.delivery, name)

    def __repr__(self) -> str:
        d = self.delivery
        return f"<Message id={d.id} queue={d.queue} receive_count={d.receive_count}>"

    @property
    def body(self) -> bytes:
        return self.delivery.body

    @property
    def id(self) -> str:
        return self.delivery.id

    @property
    def receipt(self) -> str:
        if self.delivery.receipt is None:
            raise errors.InvalidArgument("this message was peeked, not received: no lease")
        return self.delivery.receipt

    @property
    def headers(self) -> dict[str, Any]:
        return self.delivery.headers

    def text(self, encoding: str = "utf-8") -> str:
        return self.delivery.body.decode(encoding)

    async def ack(self) -> None:
        await self._queue.ack(self.receipt)

    async def nack(self, delay: float = 0.0, *, requeue: bool = True) -> None:
        await self._queue.nack(self.receipt, delay=delay, requeue=requeue)

    async def extend(self, timeout: float) -> None:
        await self._queue.extend(self.receipt, timeout)


def _receipt(m: AsyncMessage | str) -> str:
    return m if isinstance(m, str) else m.receipt


def _one(res: AckResult, receipt: str) -> None:
    if res.failed:
        raise errors.ReceiptInvalid(
            f"receipt {receipt[:80]!r} is not the current lease of a message in this queue"
        )


class AsyncQueue:
    def __init__(self, conn: AsyncConnection, name: str) -> None:
        self._conn = conn
        self._b = conn.backend
        self.name = name

    def __repr__(self) -> str:
        return f"<Queue {self.name!r}>"

    async def send(self, body: Sendable, **kw: Any) -> str:
        (res,) = await self._b.send_batch(self.name, [make_message(body, **kw)])
        return res.id

    async def send_batch(self, items: Iterable[Sendable]) -> list[str]:
        msgs = [make_message(i) for i in items]
        return [r.id for r in await self._b.send_batch(self.name, msgs)]

    async def receive(
        self,
        max_messages: int = 1,
        wait: float = 0.0,
        visibility_timeout: float | None = None,
    ) -> list[AsyncMessage]:
        got = await self._b.receive(
            self.name, max_messages, wait=wait, visibility_timeout=visibility_timeout
        )
        return [AsyncMessage(self, d) for d in got]

    async def ack(self, receipt: AsyncMessage | str) -> None:
        r = _receipt(receipt)
        _one(await self._b.ack_batch(self.name, [r]), r)

    async def nack(
        self, receipt: AsyncMessage | str, *, delay: float = 0.0, requeue: bool = True
    ) -> None:
        r = _receipt(receipt)
        _one(await self._b.nack_batch(self.name, [r], delay=delay, requeue=requeue), r)

    async def extend(self, receipt: AsyncMessage | str, timeout: float) -> None:
        r = _receipt(receipt)
        _one(await self._b.extend_batch(self.name, [r], timeout), r)

    async def ack_batch(self, receipts: Iterable[AsyncMessage | str]) -> AckResult:
        return await self._b.ack_batch(self.name, [_receipt(r) for r in receipts])

    async def nack_batch(
        self, receipts: Iterable[AsyncMessage | str], *, delay: float = 0.0, requeue: bool = True
    ) -> AckResult:
        return await self._b.nack_batch(
            self.name, [_receipt(r) for r in receipts], delay=delay, requeue=requeue
        )

    async def stats(self) -> QueueStats:
        return await self._b.stats(self.name)

    async def info(self) -> QueueInfo:
        return await self._b.get_queue(self.name)

    async def update(self, **options: Any) -> QueueInfo:
        current = (await self._b.get_queue(self.name)).options
        return await self._b.update_queue(self.name, _options(current, options))

    async def peek(self, max_messages: int = 10) -> list[Delivery]:
        return await self._b.peek(self.name, max_messages)

    async def purge(self) -> int:
        return await self._b.purge_queue(self.name)

    async def delete(self, *, if_unused: bool = False, if_empty: bool = False) -> int:
        return await self._b.delete_queue(self.name, if_unused=if_unused, if_empty=if_empty)

    async def redrive(self, to: str | None = None, max_messages: int | None = None) -> int:
        """Move this (dead-letter) queue's messages back to where they came from."""
        return await self._b.redrive(self.name, to=to, max_messages=max_messages)

    async def consume(
        self,
        handler: Callable[[AsyncMessage], Awaitable[Any]],
        *,
        concurrency: int = 1,
        retry_delay: float = 1.0,
        stop: asyncio.Event | None = None,
        batch: int = 10,
        wait: float = 5.0,
    ) -> None:
        """Run ``handler`` on each message until ``stop`` is set (or the task is
        cancelled): ack on success, nack with ``retry_delay`` on an exception, and extend
        the lease while a handler runs past half its visibility timeout."""
        stop = stop or asyncio.Event()
        vis = (await self.info()).options.visibility_timeout
        slots = asyncio.Semaphore(concurrency)
        running: set[asyncio.Task[None]] = set()

        async def run(msg: AsyncMessage) -> None:
            try:
                keeper = asyncio.create_task(self._keep_lease(msg, vis))
                try:
                    await handler(msg)
                finally:
                    keeper.cancel()
                with contextlib.suppress(errors.ReceiptInvalid):
                    await msg.ack()
            except asyncio.CancelledError:
                with contextlib.suppress(errors.ConveyorError):
                    await msg.nack()
                raise
            except Exception:
                log.exception("handler failed for message %s; retrying in %ss", msg.id, retry_delay)
                with contextlib.suppress(errors.ConveyorError):
                    await msg.nack(delay=retry_delay)
            finally:
                slots.release()

        try:
            while not stop.is_set():
                await slots.acquire()
                free = 1
                while free < min(batch, concurrency) and not slots.locked():
                    await slots.acquire()
                    free += 1
                try:
                    poll = asyncio.create_task(self.receive(free, wait=wait))
                    stopper = asyncio.create_task(stop.wait())
                    await asyncio.wait({poll, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    stopper.cancel()
                    if not poll.done():
                        poll.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await poll
                        msgs: list[AsyncMessage] = []
                    else:
                        msgs = poll.result()
                except BaseException:
                    for _ in range(free):
                        slots.release()
                    raise
                for _ in range(free - len(msgs)):
                    slots.release()
                for m in msgs:
                    t = asyncio.create_task(run(m))
                    running.add(t)
                    t.add_done_callback(running.discard)
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _keep_lease(self, msg: AsyncMessage, vis: float) -> None:
        period = max(vis / 2, 0.05)
        with contextlib.suppress(errors.ConveyorError):
            while True:
                await asyncio.sleep(period)
                await msg.extend(vis)


def _options(base: QueueOptions | None, changes: Mapping[str, Any]) -> QueueOptions:
    import msgspec

    fields = msgspec.structs.asdict(base) if base is not None else {}
    fields.update(changes)
    try:
        return msgspec.convert(fields, QueueOptions)
    except msgspec.ValidationError as exc:
        raise errors.InvalidArgument(f"invalid queue option: {exc}") from None


class AsyncExchange:
    def __init__(self, conn: AsyncConnection, name: str, type: str) -> None:
        self._conn = conn
        self._b = conn.backend
        self.name = name
        self.type = type

    def __repr__(self) -> str:
        return f"<Exchange {self.name!r} {self.type}>"

    async def bind(
        self,
        queue: AsyncQueue | AsyncExchange | str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(queue, AsyncExchange):
            await self._b.bind_exchange(self.name, queue.name, routing_key, arguments)
        else:
            name = queue.name if isinstance(queue, AsyncQueue) else queue
            await self._b.bind(self.name, name, routing_key, arguments)

    async def unbind(
        self,
        queue: AsyncQueue | AsyncExchange | str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(queue, AsyncExchange):
            await self._b.unbind_exchange(self.name, queue.name, routing_key, arguments)
        else:
            name = queue.name if isinstance(queue, AsyncQueue) else queue
            await self._b.unbind(self.name, name, routing_key, arguments)

    async def publish(self, body: Sendable, routing_key: str = "", **kw: Any) -> int:
        """Publish; return how many queues received a copy (0: unroutable)."""
        (res,) = await self._b.publish_batch(self.name, [(make_message(body, **kw), routing_key)])
        return res.routed

    async def publish_batch(self, items: Iterable[tuple[Sendable, str]]) -> list[int]:
        pairs = [(make_message(b), k) for b, k in items]
        return [r.routed for r in await self._b.publish_batch(self.name, pairs)]

    async def bindings(self) -> list[Binding]:
        return await self._b.list_bindings(exchange=self.name)

    async def bind_stream(
        self, stream: Any, routing_key: str = "", arguments: dict[str, Any] | None = None
    ) -> None:
        """Append every message this exchange routes with this binding to ``stream`` (a
        stream or its name), at least once (see conveyor.streams.bridges)."""
        from conveyor.streams.client import bridges_for

        name = stream if isinstance(stream, str) else stream.name
        await (await bridges_for(self._conn)).bind(self.name, name, routing_key, arguments)

    async def unbind_stream(
        self, stream: Any, routing_key: str = "", arguments: dict[str, Any] | None = None
    ) -> None:
        from conveyor.streams.client import bridges_for

        name = stream if isinstance(stream, str) else stream.name
        await (await bridges_for(self._conn)).unbind(self.name, name, routing_key, arguments)

    async def delete(self) -> None:
        await self._b.delete_exchange(self.name)


class AsyncConnection:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def __aenter__(self) -> AsyncConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        from conveyor.streams.client import close_streams

        await close_streams(self)
        await self.backend.close()

    async def stream(
        self, name: str, partitions: int | None = None, **config: Any
    ) -> AsyncStream | RemoteStream:
        """A stream (Kafka-style topic), created if missing; ``config`` takes topic
        settings such as ``retention_ms``. On ``http://`` connections the same methods
        go over the server's HTTP API."""
        from conveyor.streams.client import open_stream

        return await open_stream(self, name, partitions, config or None)

    async def queue(self, name: str, **options: Any) -> AsyncQueue:
        """Create the queue (or get it). Options given must match an existing queue's."""
        opts = _options(None, options) if options else None
        info = await self.backend.declare_queue(name, opts)
        return AsyncQueue(self, info.name)

    async def get_queue(self, name: str) -> AsyncQueue:
        """An existing queue; QueueNotFound if there is none."""
        info = await self.backend.declare_queue(name, passive=True)
        return AsyncQueue(self, info.name)

    async def queues(self, prefix: str = "") -> list[QueueInfo]:
        return await self.backend.list_queues(prefix)

    async def exchange(self, name: str, type: str = "direct", **kw: Any) -> AsyncExchange:
        info = await self.backend.declare_exchange(name, type, **kw)
        return AsyncExchange(self, info.name, info.type)

    async def get_exchange(self, name: str) -> AsyncExchange:
        """An existing exchange; ExchangeNotFound if there is none."""
        info = await self.backend.declare_exchange(name, passive=True)
        return AsyncExchange(self, info.name, info.type)

    async def exchanges(self) -> list[ExchangeInfo]:
        return await self.backend.list_exchanges()

    async def bindings(
        self, exchange: str | None = None, queue: str | None = None
    ) -> list[Binding]:
        return await self.backend.list_bindings(exchange=exchange, queue=queue)


async def connect_async(url: str = "./conveyor-data", **kw: Any) -> AsyncConnection:
    """Open a connection: a directory / ``sqlite:///dir`` / ``memory://`` (embedded),
    ``postgresql://...`` (embedded over a shared database) or ``http://host:port``."""
    return AsyncConnection(await open_backend(url, **kw))


async def open_backend(url: str, **kw: Any) -> Backend:
    if url.startswith(("http://", "https://")):
        from conveyor.client.remote import RemoteBroker

        backend: Backend = await RemoteBroker.open(url, **kw)
        return backend
    from conveyor.broker import Broker

    return await Broker.open(url, **kw)
