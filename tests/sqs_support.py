"""A real conveyor SQS endpoint for boto3 tests.

``InProcessSqs`` runs a Broker and an aiohttp app (the SQS handler on an ephemeral
port) on an event loop in a background thread, so synchronous boto3 clients can talk
to it over real HTTP while tests also reach the Broker directly (``srv.call(coro)``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import boto3
from aiohttp import web
from botocore.config import Config

from conveyor.broker import Broker
from conveyor.server.sqs import SqsConfig, handle_sqs, is_sqs_request

T = TypeVar("T")

KEY_ID = "AKIDEXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


class InProcessSqs:
    def __init__(self, config: SqsConfig | None = None, url: str = "memory://") -> None:
        self.config = config or SqsConfig(purge_interval=0)
        self.store_url = url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.broker: Broker
        self.port = 0

    def start(self) -> InProcessSqs:
        self.thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.broker = await Broker.open(self.store_url, durability="none")

        async def endpoint(request: web.Request) -> web.StreamResponse:
            if not is_sqs_request(request):
                return web.Response(status=404, text="not an SQS request")
            return await handle_sqs(self.broker, request, self.config)

        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", endpoint)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.broker.close()

    def stop(self) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T] | Awaitable[T], timeout: float = 30) -> T:
        async def run() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, region: str = "us-east-1", **kw: Any) -> Any:
        return make_client(self.url, region, **kw)


def make_client(
    url: str,
    region: str = "us-east-1",
    key: str = KEY_ID,
    secret: str = SECRET,
    **config: Any,
) -> Any:
    return boto3.client(
        "sqs",
        endpoint_url=url,
        region_name=region,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1}, **config),
    )
