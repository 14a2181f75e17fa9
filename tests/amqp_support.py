"""A real conveyor AMQP server for tests: Broker + AmqpServer on an ephemeral port,
running on its own event loop in a background thread (so blocking clients such as
pika's BlockingConnection can talk to it from the test thread)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from conveyor.broker import Broker
from conveyor.server.amqp import AmqpServer

T = TypeVar("T")


class RunningAmqp:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, broker: Broker, server: AmqpServer, port: int
    ) -> None:
        self.loop = loop
        self.broker = broker
        self.server = server
        self.port = port
        self.host = "127.0.0.1"
        self.url = f"amqp://guest:guest@127.0.0.1:{port}/"

    def call(self, coro: Awaitable[T], timeout: float = 10.0) -> T:
        """Run a coroutine on the server's loop (e.g. a Broker call) and wait for it."""

        async def wrap() -> T:
            return await coro

        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(wrap(), self.loop)
        return fut.result(timeout)


@contextmanager
def amqp_server(url: str = "memory://", **kwargs: Any) -> Iterator[RunningAmqp]:
    loop = asyncio.new_event_loop()
    ready: concurrent.futures.Future[RunningAmqp] = concurrent.futures.Future()
    stop = asyncio.Event()

    async def main() -> None:
        try:
            broker = await Broker.open(url, durability="none")
            server = AmqpServer(broker, **kwargs)
            port = await server.start("127.0.0.1", 0)
        except BaseException as exc:
            ready.set_exception(exc)
            raise
        ready.set_result(RunningAmqp(loop, broker, server, port))
        await stop.wait()
        await server.close()
        await broker.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    running = ready.result(15)
    try:
        yield running
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        loop.close()
