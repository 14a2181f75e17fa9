"""The blocking client API: the asyncio API driven from a private event-loop thread.

One implementation (client/aio.py) serves both; each blocking call submits the
coroutine to the connection's loop and waits for it, so embedded and remote
connections behave the same in threads and in plain scripts.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from conveyor.client.aio import (
    AsyncConnection,
    AsyncExchange,
    AsyncMessage,
    AsyncQueue,
    Sendable,
    connect_async,
)
from conveyor.errors import ClosedError
from conveyor.model import AckResult, Binding, Delivery, ExchangeInfo, QueueInfo, QueueStats

if TYPE_CHECKING:
    from conveyor.streams.client import Stream

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="conveyor-client", daemon=True
        )
        self._thread.start()
        self.closed = False

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.closed:
            coro.close()
            raise ClosedError("the connection is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Message:
    __slots__ = ("_lt", "_m")

    def __init__(self, lt: _LoopThread, m: AsyncMessage) -> None:
        self._lt = lt
        self._m = m

    def __getattr__(self, name: str) -> Any:
        return getattr(self._m.delivery, name)

    def __repr__(self) -> str:
        return repr(self._m)

    @property
    def delivery(self) -> Delivery:
        return self._m.delivery

    @property
    def body(self) -> bytes:
        return self._m.body

    @property
    def id(self) -> str:
        return self._m.id

    @property
    def receipt(self) -> str:
        return self._m.receipt

    @property
    def headers(self) -> dict[str, Any]:
        return self._m.headers

    def text(self, encoding: str = "utf-8") -> str:
        return self._m.text(encoding)

    def ack(self) -> None:
        self._lt.call(self._m.ack())

    def nack(self, delay: float = 0.0, *, requeue: bool = True) -> None:
        self._lt.call(self._m.nack(delay, requeue=requeue))

    def extend(self, timeout: float) -> None:
        self._lt.call(self._m.extend(timeout))


def _r(m: Message | str) -> str:
    return m if isinstance(m, str) else m.receipt


class Queue:
    def __init__(self, lt: _LoopThread, q: AsyncQueue) -> None:
        self._lt = lt
        self._q = q
        self.name = q.name

    def __repr__(self) -> str:
        return repr(self._q)

    def send(self, body: Sendable, **kw: Any) -> str:
        return self._lt.call(self._q.send(body, **kw))

    def send_batch(self, items: Iterable[Sendable]) -> list[str]:
        return self._lt.call(self._q.send_batch(list(items)))

    def receive(
        self, max_messages: int = 1, wait: float = 0.0, visibility_timeout: float | None = None
    ) -> list[Message]:
        got = self._lt.call(self._q.receive(max_messages, wait, visibility_timeout))
        return [Message(self._lt, m) for m in got]

    def ack(self, receipt: Message | str) -> None:
        self._lt.call(self._q.ack(_r(receipt)))

    def nack(self, receipt: Message | str, *, delay: float = 0.0, requeue: bool = True) -> None:
        self._lt.call(self._q.nack(_r(receipt), delay=delay, requeue=requeue))

    def extend(self, receipt: Message | str, timeout: float) -> None:
        self._lt.call(self._q.extend(_r(receipt), timeout))

    def ack_batch(self, receipts: Iterable[Message | str]) -> AckResult:
        return self._lt.call(self._q.ack_batch([_r(r) for r in receipts]))

    def nack_batch(
        self, receipts: Iterable[Message | str], *, delay: float = 0.0, requeue: bool = True
    ) -> AckResult:
        return self._lt.call(
            self._q.nack_batch([_r(r) for r in receipts], delay=delay, requeue=requeue)
        )

    def stats(self) -> QueueStats:
        return self._lt.call(self._q.stats())

    def info(self) -> QueueInfo:
        return self._lt.call(self._q.info())

    def update(self, **options: Any) -> QueueInfo:
        return self._lt.call(self._q.update(**options))

    def peek(self, max_messages: int = 10) -> list[Delivery]:
        return self._lt.call(self._q.peek(max_messages))

    def purge(self) -> int:
        return self._lt.call(self._q.purge())

    def delete(self, *, if_unused: bool = False, if_empty: bool = False) -> int:
        return self._lt.call(self._q.delete(if_unused=if_unused, if_empty=if_empty))

    def redrive(self, to: str | None = None, max_messages: int | None = None) -> int:
        return self._lt.call(self._q.redrive(to, max_messages))

    def consume(
        self,
        handler: Callable[[Message], Any],
        *,
        concurrency: int = 1,
        retry_delay: float = 1.0,
        stop: threading.Event | None = None,
        wait: float = 1.0,
    ) -> None:
        """Blocking consume loop: ``handler`` runs in worker threads (``concurrency`` of
        them); returns when ``stop`` is set. See AsyncQueue.consume for the contract."""
        lt = self._lt
        stop = stop or threading.Event()

        async def run() -> None:
            aio_stop = asyncio.Event()

            async def watch() -> None:
                while not stop.is_set():
                    await asyncio.sleep(0.05)
                aio_stop.set()

            async def call(m: AsyncMessage) -> None:
                await asyncio.to_thread(handler, Message(lt, m))

            watcher = asyncio.create_task(watch())
            try:
                await self._q.consume(
                    call,
                    concurrency=concurrency,
                    retry_delay=retry_delay,
                    stop=aio_stop,
                    wait=wait,
                )
            finally:
                watcher.cancel()

        # Handlers call back into this loop (ack); run the loop's work off this thread.
        lt.call(run())


class Exchange:
    def __init__(self, lt: _LoopThread, x: AsyncExchange) -> None:
        self._lt = lt
        self._x = x
        self.name = x.name
        self.type = x.type

    def __repr__(self) -> str:
        return repr(self._x)

    def bind(
        self,
        queue: Queue | Exchange | str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        self._lt.call(self._x.bind(_target(queue), routing_key, arguments))

    def unbind(
        self,
        queue: Queue | Exchange | str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        self._lt.call(self._x.unbind(_target(queue), routing_key, arguments))

    def publish(self, body: Sendable, routing_key: str = "", **kw: Any) -> int:
        return self._lt.call(self._x.publish(body, routing_key, **kw))

    def publish_batch(self, items: Iterable[tuple[Sendable, str]]) -> list[int]:
        return self._lt.call(self._x.publish_batch(list(items)))

    def bindings(self) -> list[Binding]:
        return self._lt.call(self._x.bindings())

    def bind_stream(
        self, stream: Any, routing_key: str = "", arguments: dict[str, Any] | None = None
    ) -> None:
        """See AsyncExchange.bind_stream: what this binding routes is appended to ``stream``."""
        self._lt.call(self._x.bind_stream(stream, routing_key, arguments))

    def unbind_stream(
        self, stream: Any, routing_key: str = "", arguments: dict[str, Any] | None = None
    ) -> None:
        self._lt.call(self._x.unbind_stream(stream, routing_key, arguments))

    def delete(self) -> None:
        self._lt.call(self._x.delete())


def _target(t: Queue | Exchange | str) -> AsyncQueue | AsyncExchange | str:
    if isinstance(t, Queue):
        return t._q
    if isinstance(t, Exchange):
        return t._x
    return t


class Connection:
    """A blocking connection; ``conveyor.connect(url)`` returns one."""

    def __init__(self, url: str = "./conveyor-data", **kw: Any) -> None:
        self._lt = _LoopThread()
        try:
            self._conn: AsyncConnection = self._lt.call(connect_async(url, **kw))
        except BaseException:
            self._lt.stop()
            raise

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._lt.closed:
            try:
                self._lt.call(self._conn.close())
            finally:
                self._lt.stop()

    @property
    def async_connection(self) -> AsyncConnection:
        return self._conn

    def queue(self, name: str, **options: Any) -> Queue:
        return Queue(self._lt, self._lt.call(self._conn.queue(name, **options)))

    def get_queue(self, name: str) -> Queue:
        return Queue(self._lt, self._lt.call(self._conn.get_queue(name)))

    def queues(self, prefix: str = "") -> list[QueueInfo]:
        return self._lt.call(self._conn.queues(prefix))

    def exchange(self, name: str, type: str = "direct", **kw: Any) -> Exchange:
        return Exchange(self._lt, self._lt.call(self._conn.exchange(name, type, **kw)))

    def get_exchange(self, name: str) -> Exchange:
        return Exchange(self._lt, self._lt.call(self._conn.get_exchange(name)))

    def exchanges(self) -> list[ExchangeInfo]:
        return self._lt.call(self._conn.exchanges())

    def stream(self, name: str, partitions: int | None = None, **config: Any) -> Stream:
        """A stream (Kafka-style topic), created if missing (see AsyncConnection.stream)."""
        from conveyor.streams.client import Stream

        return Stream(self._lt, self._lt.call(self._conn.stream(name, partitions, **config)))

    def bindings(self, exchange: str | None = None, queue: str | None = None) -> list[Binding]:
        return self._lt.call(self._conn.bindings(exchange, queue))


def connect(url: str = "./conveyor-data", **kw: Any) -> Connection:
    """Open a blocking connection (see ``connect_async`` for the URLs)."""
    return Connection(url, **kw)
