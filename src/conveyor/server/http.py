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
from aiohttp.http_exceptions import HttpProcessingError

from conveyor import errors
from conveyor.logutil import Throttle, suffix
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
from conveyor.protocols.sqs import errors as sqs_errors
from conveyor.server.config import ServerConfig
from conveyor.server.metrics import Metrics
from conveyor.server.sqs import SqsConfig, error_response, handle_sqs, is_sqs_request

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
        self._stopped: asyncio.Future[Any] | None = None

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

    def _max_messages(self, n: int) -> int:
        cap = self.config.max_messages_per_receive
        if n > cap:
            raise errors.InvalidArgument(
                f"max_messages is {n}; this server returns at most {cap} messages per call"
                " (setting max_messages_per_receive)"
            )
        return n

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
        n = self._max_messages(_int_param(request, "max_messages", 10))
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
            self._max_messages(body.max_messages),
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
        if self._stopped is None:
            # One watcher shared by every long poll (a task per call cost ~20 µs).
            self._stopped = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait((task, self._stopped), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()  # this handler was cancelled: the poll must not outlive it
            raise
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


_server_error_log = Throttle()


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.ConveyorError as exc:
        status, body = error_from_exception(exc)
        line = ("%s %s -> %d %s: %s", request.method, request.path, status, exc.code, exc)
        if status >= 500:  # a full disk fails every request: one line a second per code
            _server_error_log.log(log, logging.WARNING, exc.code, *line)
        else:
            log.info(*line)
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
    except ConnectionResetError as exc:
        # The client went away while we read its request (or a shutdown closed an idle
        # keep-alive connection): nobody is left to answer, and nothing was done.
        log.info("%s %s: connection lost (%s)", request.method, request.path, exc)
        # An answer aiohttp cannot deliver is dropped quietly; re-raising would make it
        # log the disconnect as a server error with a traceback.
        return web.Response(
            status=400, body=error_body("connection_lost", str(exc)), content_type=JSON
        )
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.Response(
            status=500, body=error_body("internal", "internal server error"), content_type=JSON
        )


# -- connection limit ----------------------------------------------------------------

#: Answered even on a connection beyond the limit (then closed), so health checks and
#: scrapes still see a saturated server.
_ALWAYS_ANSWERED = frozenset({"/healthz", "/metrics"})
#: Bodies up to this size are read before a refusal, so closing the connection does not
#: reset it under the client's feet (unread data makes the kernel send RST).
_DRAIN_LIMIT = 64 * 1024
_limit_log = Throttle()


class ConnectionLimit:
    """``max_connections`` for the HTTP listener.

    A connection is admitted at its first request when fewer than ``limit`` of the
    connections opened before it are still open (aiohttp's ``Server.connections`` is in
    accept order); requests on a connection that is not are answered 503 with
    Retry-After, in the protocol they speak (native JSON or SQS), and the connection is
    closed. An admitted connection stays admitted. HTTP/1.1 handles one request at a
    time per connection, so this also bounds concurrent long polls.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Set once the listener runs (``attach_server``).
        self.server: web.Server | None = None
        self._admitted: set[object] = set()

    def admit(self, request: web.Request) -> bool:
        proto = request.protocol
        if proto in self._admitted:
            return True
        server = self.server
        if server is None or self.limit <= 0:
            return True
        conns = server.connections
        if len(self._admitted) > 2 * len(conns) + 64:
            self._admitted.intersection_update(conns)  # forget closed connections
        if len(conns) <= self.limit or any(c is proto for c in conns[: self.limit]):
            self._admitted.add(proto)
            return True
        return False

    def open_connections(self) -> int:
        return len(self.server.connections) if self.server is not None else 0


CONNECTION_LIMIT = web.AppKey("conveyor.connection_limit", ConnectionLimit)


def attach_server(app: web.Application, server: web.Server | None) -> None:
    """Give the connection limit the aiohttp server whose connections it counts."""
    limit = app.get(CONNECTION_LIMIT)
    if limit is not None:
        limit.server = server


def _connection_limit_middleware(limit: ConnectionLimit) -> Any:
    @web.middleware
    async def connection_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if limit.admit(request):
            return await handler(request)
        if request.path in _ALWAYS_ANSWERED:
            answered = await handler(request)
            answered.force_close()
            return answered
        admitted = _limit_log.admit("max_connections")
        if admitted is not None:
            log.warning(
                "refused a request from %s: %d HTTP connections open, max_connections is %d"
                + suffix(admitted),
                request.remote,
                limit.open_connections(),
                limit.limit,
            )
        if request.content_length is not None and request.content_length <= _DRAIN_LIMIT:
            with contextlib.suppress(Exception):
                await request.read()
        message = f"too many connections: this server serves at most {limit.limit} at once"
        response: web.Response
        if not request.path.startswith("/v1/") and is_sqs_request(request):
            response = error_response(
                request, sqs_errors.SqsError(sqs_errors.SERVICE_UNAVAILABLE, message)
            )
        else:
            response = web.Response(
                status=503, body=error_body("too_many_connections", message), content_type=JSON
            )
        response.headers["Retry-After"] = "1"
        response.force_close()
        return response

    return connection_limit


# -- log hygiene -----------------------------------------------------------------------


class MalformedRequestFilter(logging.Filter):
    """aiohttp answers a request its parser rejects with 400 and logs it at ERROR with
    the parser's traceback, so a peer sending garbage fills the log. This filter turns
    each into one WARNING line, at most one a second per kind of error with a count of
    those not logged. Other errors aiohttp logs (a handler's exception) are untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.throttle = Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno < logging.ERROR or not isinstance(exc, HttpProcessingError):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.WARNING):
            return False
        kind = type(exc).__name__
        admitted = self.throttle.admit(kind)
        if admitted is None:
            return False
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        detail = " ".join(str(exc.message or exc).split())[:200]
        record.msg = "malformed HTTP request from %s answered %s: %s: %s" + suffix(admitted)
        record.args = (remote, exc.code or 400, kind, detail)
        record.levelno = logging.WARNING
        record.levelname = logging.getLevelName(logging.WARNING)
        record.exc_info = None
        record.exc_text = None
        return True


_malformed_filter = MalformedRequestFilter()


def install_log_filters() -> None:
    """Demote aiohttp's per-request parser tracebacks (idempotent)."""
    logging.getLogger("aiohttp.server").addFilter(_malformed_filter)


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
    limit = ConnectionLimit(config.max_connections)
    if config.max_connections > 0:
        middlewares.append(_connection_limit_middleware(limit))  # outermost: before any work
    sqs = _sqs_middleware(broker, config)
    if config.sqs_access_keys:
        middlewares.append(sqs)  # outermost: SQS requests carry AWS signatures
    middlewares.append(_errors)
    if config.token:
        middlewares.append(_auth_middleware(config.token))
    if not config.sqs_access_keys:
        middlewares.append(sqs)  # behind the token check, when one is set
    app = web.Application(middlewares=middlewares, client_max_size=config.max_request_size)
    app[CONNECTION_LIMIT] = limit
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/metrics", api.metrics_route)
    app.router.add_get("/v1/openapi.json", api.openapi)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, getattr(api, route.operation))
    # The paths SQS clients send to ("/" and queue URLs, "/<12-digit account>/<queue>"):
    # the SQS middleware answers them, but aiohttp routes before middlewares run, and a
    # request no route matches costs a MatchInfoError and an HTTPNotFound built per
    # request (~8% of the server's CPU under boto3 load). Requests that are not SQS
    # reach this handler and get the 404 they got before.
    for method in ("GET", "POST"):
        app.router.add_route(method, "/", _not_found)
        app.router.add_route(method, r"/{account:\d+}/{queue}", _not_found)
    assert set(BY_OPERATION) <= set(dir(api))
    return app


async def _not_found(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound()
