"""The aiohttp application: native API under /v1, /healthz, /metrics, auth, errors.

Handlers decode with ``conveyor.protocols.http`` and call the Broker; nothing here
knows message semantics. Every ConveyorError becomes the JSON error body at one
boundary (``_errors``); anything else is logged and answered 500 with no detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from aiohttp import web

from conveyor import errors
from conveyor.protocols.http import (
    BY_OPERATION,
    ROUTES,
    decode_json,
    encode_json,
    error_body,
    error_from_exception,
    exchange_from_path,
    openapi_document,
    wire,
)
from conveyor.server.config import ServerConfig
from conveyor.server.metrics import Metrics
from conveyor.server.sqs import SqsConfig, handle_sqs, is_sqs_request

if TYPE_CHECKING:
    from conveyor.broker import Broker, FakeClock

log = logging.getLogger("conveyor.server.http")

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

JSON = "application/json"


class HttpApi:
    """Route handlers bound to one broker."""

    def __init__(
        self,
        broker: Broker,
        config: ServerConfig,
        metrics: Metrics,
        stopping: asyncio.Event,
        version: str,
    ) -> None:
        self.broker = broker
        self.config = config
        self.metrics = metrics
        self.stopping = stopping
        self.version = version
        self._openapi: bytes | None = None

    # -- plumbing ---------------------------------------------------------------

    @staticmethod
    async def _body(request: web.Request, type: type[T]) -> T:
        return decode_json(await request.read(), type)

    @staticmethod
    def _json(obj: Any, status: int = 200) -> web.Response:
        return web.Response(body=encode_json(obj), status=status, content_type=JSON)

    @staticmethod
    def _done() -> web.Response:
        return web.Response(status=204)

    @staticmethod
    def _queue(request: web.Request) -> str:
        return request.match_info["queue"]

    @staticmethod
    def _exchange(request: web.Request) -> str:
        return exchange_from_path(request.match_info["exchange"])

    # -- service routes ---------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        if self.stopping.is_set():
            return self._json({"status": "stopping"}, status=503)
        return self._json({"status": "ok", "version": self.version})

    async def metrics_route(self, request: web.Request) -> web.Response:
        body, content_type = await self.metrics.render(self.broker)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = encode_json(openapi_document(self.version))
        return web.Response(body=self._openapi, content_type=JSON)

    # -- queues -----------------------------------------------------------------

    async def listQueues(self, request: web.Request) -> web.Response:
        prefix = request.query.get("prefix", "")
        return self._json(wire.QueueList(queues=await self.broker.list_queues(prefix)))

    async def createQueue(self, request: web.Request) -> web.Response:
        # No body: get the queue, or create it with defaults (no options to compare).
        raw = await request.read()
        options = decode_json(raw, wire.QueueOptions) if raw.strip() else None
        return self._json(await self.broker.declare_queue(self._queue(request), options))

    async def getQueue(self, request: web.Request) -> web.Response:
        return self._json(await self.broker.get_queue(self._queue(request)))

    async def updateQueue(self, request: web.Request) -> web.Response:
        options = await self._body(request, wire.QueueOptions)
        return self._json(await self.broker.update_queue(self._queue(request), options))

    async def deleteQueue(self, request: web.Request) -> web.Response:
        n = await self.broker.delete_queue(
            self._queue(request),
            if_unused=_flag(request, "if_unused"),
            if_empty=_flag(request, "if_empty"),
        )
        return self._json(wire.DeletedOut(deleted=n))

    async def purgeQueue(self, request: web.Request) -> web.Response:
        return self._json(
            wire.PurgedOut(purged=await self.broker.purge_queue(self._queue(request)))
        )

    async def queueStats(self, request: web.Request) -> web.Response:
        return self._json(await self.broker.stats(self._queue(request)))

    async def peek(self, request: web.Request) -> web.Response:
        n = _int_param(request, "max_messages", 10)
        deliveries = await self.broker.peek(self._queue(request), n)
        return self._json(
            wire.MessageList(messages=[wire.MessageOut.from_model(d) for d in deliveries])
        )

    async def redrive(self, request: web.Request) -> web.Response:
        body = await self._body(request, wire.RedriveIn)
        moved = await self.broker.redrive(
            self._queue(request), to=body.to, max_messages=body.max_messages
        )
        return self._json(wire.MovedOut(moved=moved))

    # -- messages ---------------------------------------------------------------

    async def send(self, request: web.Request) -> web.Response:
        msg = (await self._body(request, wire.MessageIn)).to_model()
        return self._json(await self.broker.send(self._queue(request), msg))

    async def sendBatch(self, request: web.Request) -> web.Response:
        body = await self._body(request, wire.SendBatchIn)
        msgs = [m.to_model() for m in body.messages]
        results = await self.broker.send_batch(self._queue(request), msgs)
        return self._json(wire.SendBatchOut(results=results))

    async def receive(self, request: web.Request) -> web.Response:
        queue = self._queue(request)
        body = await self._body(request, wire.ReceiveIn)
        started = time.monotonic()
        call = self.broker.receive(
            queue,
            body.max_messages,
            wait=body.wait,
            visibility_timeout=body.visibility_timeout,
            auto_ack=body.auto_ack,
        )
        if body.wait > 0:
            deliveries = await self._unless_stopping(call)
        else:
            deliveries = await call
        self.metrics.observe_receive("http", time.monotonic() - started, deliveries)
        return self._json(
            wire.MessageList(messages=[wire.MessageOut.from_model(d) for d in deliveries])
        )

    async def _unless_stopping(self, call: Awaitable[list[T]]) -> list[T]:
        """Run a long poll, answering [] as soon as the server starts shutting down."""
        if self.stopping.is_set():
            with contextlib.suppress(Exception):
                call.close()  # type: ignore[attr-defined]
            return []
        task = asyncio.ensure_future(call)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                return await task
            return []
        return task.result()

    async def ack(self, request: web.Request) -> web.Response:
        body = await self._body(request, wire.ReceiptIn)
        await self.broker.ack(self._queue(request), body.receipt)
        return self._done()

    async def ackBatch(self, request: web.Request) -> web.Response:
        body = await self._body(request, wire.ReceiptsIn)
        return self._json(await self.broker.ack_batch(self._queue(request), body.receipts))

    async def nack(self, request: web.Request) -> web.Response:
        body = await self._body(request, wire.NackIn)
        await self.broker.nack(
            self._queue(request), body.receipt, delay=body.delay, requeue=body.requeue
        )
        return self._done()

    async def nackBatch(self, request: web.Request) -> web.Response:
        body = await self._body(request, wire.NackBatchIn)
        result = await self.broker.nack_batch(
            self._queue(request), body.receipts, delay=body.delay, requeue=body.requeue
        )
        return self._json(result)

    async def extend(self, request: web.Request) -> web.Response:
        body = await self._body(request, wire.ExtendIn)
        await self.broker.extend(self._queue(request), body.receipt, body.timeout)
        return self._done()

    async def extendBatch(self, request: web.Request) -> web.Response:
        body = await self._body(request, wire.ExtendBatchIn)
        return self._json(
            await self.broker.extend_batch(self._queue(request), body.receipts, body.timeout)
        )

    # -- exchanges --------------------------------------------------------------

    async def listExchanges(self, request: web.Request) -> web.Response:
        exchanges = [wire.exchange_out(x) for x in await self.broker.list_exchanges()]
        return self._json(wire.ExchangeList(exchanges=exchanges))

    async def declareExchange(self, request: web.Request) -> web.Response:
        body = await self._body(request, wire.ExchangeIn)
        info = await self.broker.declare_exchange(
            self._exchange(request),
            body.type,
            durable=body.durable,
            auto_delete=body.auto_delete,
            internal=body.internal,
            arguments=body.decoded_arguments() or None,
        )
        return self._json(wire.exchange_out(info))

    async def getExchange(self, request: web.Request) -> web.Response:
        info = await self.broker.declare_exchange(self._exchange(request), passive=True)
        return self._json(wire.exchange_out(info))

    async def deleteExchange(self, request: web.Request) -> web.Response:
        await self.broker.delete_exchange(
            self._exchange(request), if_unused=_flag(request, "if_unused")
        )
        return self._done()

    async def bind(self, request: web.Request) -> web.Response:
        await self._binding(request, unbind=False)
        return self._done()

    async def unbind(self, request: web.Request) -> web.Response:
        await self._binding(request, unbind=True)
        return self._done()

    async def _binding(self, request: web.Request, *, unbind: bool) -> None:
        body = await self._body(request, wire.BindIn)
        kind, destination = body.destination()
        source = self._exchange(request)
        args = body.decoded_arguments()
        b = self.broker
        if kind == "queue":
            fn = b.unbind if unbind else b.bind
            await fn(source, destination, body.routing_key, args)
        else:
            xfn = b.unbind_exchange if unbind else b.bind_exchange
            await xfn(source, destination, body.routing_key, args)

    async def publish(self, request: web.Request) -> web.Response:
        body = await self._body(request, wire.PublishIn)
        result = await self.broker.publish(
            self._exchange(request), body.to_model(), routing_key=body.routing_key
        )
        return self._json(result)

    async def publishBatch(self, request: web.Request) -> web.Response:
        body = await self._body(request, wire.PublishBatchIn)
        items = [(m.to_model(), m.routing_key) for m in body.messages]
        results = await self.broker.publish_batch(self._exchange(request), items)
        return self._json(wire.PublishBatchOut(results=results))

    async def listBindings(self, request: web.Request) -> web.Response:
        exchange = request.query.get("exchange")
        bindings = await self.broker.list_bindings(
            exchange=None if exchange is None else exchange_from_path(exchange),
            queue=request.query.get("queue"),
        )
        return self._json(wire.BindingList(bindings=[wire.binding_out(x) for x in bindings]))


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return False
    value = raw.lower()
    if value in ("", "1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise errors.InvalidArgument(f"query parameter {name!r} must be true or false, got {raw!r}")


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise errors.InvalidArgument(
            f"query parameter {name!r} must be an integer, got {raw!r}"
        ) from None


# -- middlewares ---------------------------------------------------------------

_OPEN_PATHS = frozenset({"/healthz"})


def _auth_middleware(token: str) -> Any:
    expected = ("Bearer " + token).encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.Response(
                    status=401,
                    body=error_body("unauthorized", "missing or wrong bearer token"),
                    content_type=JSON,
                    headers={"WWW-Authenticate": 'Bearer realm="conveyor"'},
                )
        return await handler(request)

    return auth


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.ConveyorError as exc:
        status, body = error_from_exception(exc)
        log_fn = log.warning if status >= 500 else log.info
        log_fn("%s %s -> %d %s: %s", request.method, request.path, status, exc.code, exc)
        return web.Response(status=status, body=body, content_type=JSON)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {
            404: "not_found",
            405: "method_not_allowed",
            413: "message_too_large",
        }.get(exc.status, "http_error")
        log.info("%s %s -> %d %s", request.method, request.path, exc.status, exc.reason)
        return web.Response(
            status=exc.status,
            body=error_body(code, exc.text or exc.reason),
            content_type=JSON,
            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.Response(
            status=500, body=error_body("internal", "internal server error"), content_type=JSON
        )


def add_test_routes(app: web.Application, broker: Broker, clock: FakeClock) -> None:
    """``POST /_test/advance {"seconds": s}``: move the fake clock and run due timers, so
    the conformance suite can run through the remote client. Only with ``--test-clock``."""

    async def advance(request: web.Request) -> web.Response:
        body = decode_json(await request.read(), _Advance)
        clock.advance(body.seconds)
        await broker.tick()
        return web.Response(status=204)

    app.router.add_post("/_test/advance", advance)


class _Advance(msgspec.Struct, forbid_unknown_fields=True):
    seconds: float


def _sqs_middleware(broker: Broker, config: ServerConfig) -> Any:
    """The Amazon SQS API shares the HTTP port: requests it recognizes (``X-Amz-Target``
    or ``Action``) outside ``/v1/`` go to the SQS adapter."""
    sqs_config = SqsConfig(
        account_id=config.sqs_account_id,
        region=config.sqs_region,
        access_keys=dict(config.sqs_access_keys) or None,
    )

    @web.middleware
    async def sqs(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/") and is_sqs_request(request):
            return await handle_sqs(broker, request, sqs_config)
        return await handler(request)

    return sqs


def build_app(
    broker: Broker,
    config: ServerConfig,
    *,
    metrics: Metrics,
    stopping: asyncio.Event,
    version: str,
) -> web.Application:
    api = HttpApi(broker, config, metrics, stopping, version)
    middlewares: list[Any] = []
    sqs = _sqs_middleware(broker, config)
    if config.sqs_access_keys:
        middlewares.append(sqs)  # outermost: SQS requests carry AWS signatures
    middlewares.append(_errors)
    if config.token:
        middlewares.append(_auth_middleware(config.token))
    if not config.sqs_access_keys:
        middlewares.append(sqs)  # behind the token check, when one is set
    app = web.Application(middlewares=middlewares, client_max_size=config.max_request_size)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/metrics", api.metrics_route)
    app.router.add_get("/v1/openapi.json", api.openapi)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, getattr(api, route.operation))
    assert set(BY_OPERATION) <= set(dir(api))
    return app
