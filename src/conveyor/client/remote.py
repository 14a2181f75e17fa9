"""The Broker API over the native HTTP API: ``RemoteBroker`` (sync) and
``RemoteBroker`` (async) have the engine's method names, arguments, results and
exceptions, so the embedded client's Connection/Queue/Exchange work on top of either.

Both share one table of calls (``_Calls``): each method builds a ``_Call`` (method,
path, JSON body, how to read the answer) and the twin only runs it. Transport:

- keep-alive connection pooling (one aiohttp session per broker object; aiohttp's
  client, not httpx's AsyncClient, because it sustains ~8x the requests per second
  under concurrency on this project's machines);
- retries with backoff: a failure to connect is retried for every call (nothing was
  sent); a connection lost mid-call is retried only for idempotent calls;
- long polls: a receive with ``wait`` gets a read timeout of ``wait`` + a margin;
- errors: the server's ``{"error": {"code": ...}}`` becomes the same ConveyorError
  class the engine raised; an unreachable server is Unavailable.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
import msgspec

from conveyor import errors
from conveyor.model import (
    AckResult,
    Binding,
    Delivery,
    ExchangeInfo,
    NewMessage,
    PublishResult,
    QueueInfo,
    QueueOptions,
    QueueStats,
    SendResult,
)
from conveyor.protocols.http import encode_json, exception_from_body, exchange_to_path, wire
from conveyor.protocols.http.codec import encode_headers

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
#: Added to a long poll's ``wait`` for its read timeout.
LONG_POLL_MARGIN = 15.0
DEFAULT_RETRIES = 3
_BACKOFF = (0.05, 0.2, 0.5, 1.0, 2.0)

#: Never reached the server: always safe to retry.
_NOT_SENT = (aiohttp.ClientConnectorError,)
#: Lost mid-call: the server may or may not have acted on the request.
_MAYBE_SENT = (aiohttp.ClientError, TimeoutError)


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    method: str
    path: str
    read: Callable[[bytes], T]
    body: bytes | None = None
    params: dict[str, str] | None = None
    idempotent: bool = False
    timeout: float | None = None


def _q(name: str) -> str:
    return "/v1/queues/" + quote(name, safe="")


def _x(name: str) -> str:
    return "/v1/exchanges/" + quote(exchange_to_path(name), safe="")


# Cached: building a Decoder costs more than decoding a small answer, and every call
# asks for one.
@functools.cache
def _decoder(t: type[T]) -> Callable[[bytes], T]:
    dec = msgspec.json.Decoder(t)
    return dec.decode


def _none(_: bytes) -> None:
    return None


@functools.cache
def _field(t: type[Any], name: str) -> Callable[[bytes], Any]:
    dec = msgspec.json.Decoder(t)
    return lambda data: getattr(dec.decode(data), name)


def _deliveries(data: bytes) -> list[Delivery]:
    return [m.to_model() for m in _MESSAGES.decode(data).messages]


_MESSAGES = msgspec.json.Decoder(wire.MessageList)


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _check_name(name: object, what: str) -> None:
    # Names become URL path segments, so they are validated before they are sent.
    from conveyor.model import check_name

    check_name(name, what)


class _Calls:
    """Each Broker method as an HTTP call description."""

    @staticmethod
    def declare_queue(
        name: str, options: QueueOptions | None = None, *, passive: bool = False
    ) -> _Call[QueueInfo]:
        _check_name(name, "queue")
        if passive:
            return _Call("GET", _q(name), _decoder(QueueInfo), idempotent=True)
        body = None if options is None else encode_json(options)
        return _Call("PUT", _q(name), _decoder(QueueInfo), body, idempotent=True)

    @staticmethod
    def get_queue(name: str) -> _Call[QueueInfo]:
        _check_name(name, "queue")
        return _Call("GET", _q(name), _decoder(QueueInfo), idempotent=True)

    @staticmethod
    def list_queues(prefix: str = "") -> _Call[list[QueueInfo]]:
        params = {"prefix": prefix} if prefix else None
        return _Call(
            "GET", "/v1/queues", _field(wire.QueueList, "queues"), params=params, idempotent=True
        )

    @staticmethod
    def update_queue(name: str, options: QueueOptions) -> _Call[QueueInfo]:
        _check_name(name, "queue")
        return _Call("PATCH", _q(name), _decoder(QueueInfo), encode_json(options), idempotent=True)

    @staticmethod
    def delete_queue(name: str, *, if_unused: bool = False, if_empty: bool = False) -> _Call[int]:
        _check_name(name, "queue")
        params = {"if_unused": _bool(if_unused), "if_empty": _bool(if_empty)}
        return _Call("DELETE", _q(name), _field(wire.DeletedOut, "deleted"), params=params)

    @staticmethod
    def purge_queue(name: str) -> _Call[int]:
        _check_name(name, "queue")
        return _Call("POST", _q(name) + "/purge", _field(wire.PurgedOut, "purged"))

    @staticmethod
    def peek(name: str, max_messages: int = 10) -> _Call[list[Delivery]]:
        _check_name(name, "queue")
        return _Call(
            "GET", _q(name) + "/peek", _deliveries, params={"max_messages": str(max_messages)},
            idempotent=True,
        )  # fmt: skip

    @staticmethod
    def stats(name: str) -> _Call[QueueStats]:
        _check_name(name, "queue")
        return _Call("GET", _q(name) + "/stats", _decoder(QueueStats), idempotent=True)

    @staticmethod
    def send(queue: str, msg: NewMessage) -> _Call[SendResult]:
        _check_name(queue, "queue")
        body = encode_json(wire.MessageIn.from_model(msg))
        return _Call("POST", _q(queue) + "/messages", _decoder(SendResult), body)

    @staticmethod
    def send_batch(queue: str, msgs: Sequence[NewMessage]) -> _Call[list[SendResult]]:
        _check_name(queue, "queue")
        body = encode_json(wire.SendBatchIn(messages=[wire.MessageIn.from_model(m) for m in msgs]))
        return _Call(
            "POST", _q(queue) + "/messages/batch", _field(wire.SendBatchOut, "results"), body
        )

    @staticmethod
    def receive(
        queue: str,
        max_messages: int = 1,
        *,
        wait: float = 0.0,
        visibility_timeout: float | None = None,
        auto_ack: bool = False,
    ) -> _Call[list[Delivery]]:
        _check_name(queue, "queue")
        body = encode_json(
            wire.ReceiveIn(
                max_messages=max_messages,
                wait=wait,
                visibility_timeout=visibility_timeout,
                auto_ack=auto_ack,
            )
        )
        timeout = None
        if isinstance(wait, int | float) and wait > 0:
            timeout = float(wait) + LONG_POLL_MARGIN
        return _Call("POST", _q(queue) + "/receive", _deliveries, body, timeout=timeout)

    @staticmethod
    def ack(queue: str, receipt: str) -> _Call[None]:
        body = encode_json(wire.ReceiptIn(receipt=receipt))
        return _Call("POST", _q(queue) + "/ack", _none, body, idempotent=True)

    @staticmethod
    def ack_batch(queue: str, receipts: Sequence[str]) -> _Call[AckResult]:
        body = encode_json(wire.ReceiptsIn(receipts=list(receipts)))
        return _Call("POST", _q(queue) + "/ack/batch", _decoder(AckResult), body, idempotent=True)

    @staticmethod
    def nack(queue: str, receipt: str, *, delay: float = 0.0, requeue: bool = True) -> _Call[None]:
        body = encode_json(wire.NackIn(receipt=receipt, delay=delay, requeue=requeue))
        return _Call("POST", _q(queue) + "/nack", _none, body)

    @staticmethod
    def nack_batch(
        queue: str, receipts: Sequence[str], *, delay: float = 0.0, requeue: bool = True
    ) -> _Call[AckResult]:
        body = encode_json(wire.NackBatchIn(receipts=list(receipts), delay=delay, requeue=requeue))
        return _Call("POST", _q(queue) + "/nack/batch", _decoder(AckResult), body)

    @staticmethod
    def extend(queue: str, receipt: str, timeout: float) -> _Call[None]:
        body = encode_json(wire.ExtendIn(receipt=receipt, timeout=timeout))
        return _Call("POST", _q(queue) + "/extend", _none, body, idempotent=True)

    @staticmethod
    def extend_batch(queue: str, receipts: Sequence[str], timeout: float) -> _Call[AckResult]:
        body = encode_json(wire.ExtendBatchIn(receipts=list(receipts), timeout=timeout))
        return _Call(
            "POST", _q(queue) + "/extend/batch", _decoder(AckResult), body, idempotent=True
        )

    @staticmethod
    def redrive(
        dead_letter_queue: str, *, to: str | None = None, max_messages: int | None = None
    ) -> _Call[int]:
        _check_name(dead_letter_queue, "queue")
        body = encode_json(wire.RedriveIn(to=to, max_messages=max_messages))
        return _Call(
            "POST", _q(dead_letter_queue) + "/redrive", _field(wire.MovedOut, "moved"), body
        )

    @staticmethod
    def declare_exchange(
        name: str,
        type: str = "direct",
        *,
        durable: bool = True,
        auto_delete: bool = False,
        internal: bool = False,
        arguments: dict[str, Any] | None = None,
        passive: bool = False,
    ) -> _Call[ExchangeInfo]:
        if name != "":
            _check_name(name, "exchange")
        read = _exchange_info
        if passive:
            return _Call("GET", _x(name), read, idempotent=True)
        if type not in ("direct", "fanout", "topic", "headers"):
            raise errors.InvalidArgument(
                f"exchange type must be direct, fanout, topic or headers, got {type!r}"
            )
        body = encode_json(
            {
                "type": type,
                "durable": durable,
                "auto_delete": auto_delete,
                "internal": internal,
                "arguments": encode_headers(arguments or {}),
            }
        )
        return _Call("PUT", _x(name), read, body, idempotent=True)

    @staticmethod
    def get_exchange(name: str) -> _Call[ExchangeInfo]:
        return _Calls.declare_exchange(name, passive=True)

    @staticmethod
    def delete_exchange(name: str, *, if_unused: bool = False) -> _Call[None]:
        _check_name(name, "exchange")
        return _Call("DELETE", _x(name), _none, params={"if_unused": _bool(if_unused)})

    @staticmethod
    def list_exchanges() -> _Call[list[ExchangeInfo]]:
        return _Call("GET", "/v1/exchanges", _exchange_list, idempotent=True)

    @staticmethod
    def _binding(
        op: str, source: str, kind: str, destination: str, routing_key: str,
        arguments: dict[str, Any] | None,
    ) -> _Call[None]:  # fmt: skip
        body = encode_json(
            {
                kind: destination,
                "routing_key": routing_key,
                "arguments": encode_headers(arguments or {}),
            }
        )
        return _Call("POST", _x(source) + "/" + op, _none, body, idempotent=True)

    @staticmethod
    def bind(
        exchange: str, queue: str, routing_key: str = "", arguments: dict[str, Any] | None = None
    ) -> _Call[None]:
        return _Calls._binding("bind", exchange, "queue", queue, routing_key, arguments)

    @staticmethod
    def unbind(
        exchange: str, queue: str, routing_key: str = "", arguments: dict[str, Any] | None = None
    ) -> _Call[None]:
        return _Calls._binding("unbind", exchange, "queue", queue, routing_key, arguments)

    @staticmethod
    def bind_exchange(
        source: str, destination: str, routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> _Call[None]:  # fmt: skip
        return _Calls._binding("bind", source, "exchange", destination, routing_key, arguments)

    @staticmethod
    def unbind_exchange(
        source: str, destination: str, routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> _Call[None]:  # fmt: skip
        return _Calls._binding("unbind", source, "exchange", destination, routing_key, arguments)

    @staticmethod
    def list_bindings(
        *, exchange: str | None = None, queue: str | None = None
    ) -> _Call[list[Binding]]:
        params = {}
        if exchange is not None:
            params["exchange"] = exchange_to_path(exchange)
        if queue is not None:
            params["queue"] = queue
        return _Call("GET", "/v1/bindings", _binding_list, params=params, idempotent=True)

    @staticmethod
    def publish(exchange: str, msg: NewMessage, routing_key: str = "") -> _Call[PublishResult]:
        body = encode_json(wire.PublishIn.from_model(msg, routing_key))
        return _Call("POST", _x(exchange) + "/publish", _decoder(PublishResult), body)

    @staticmethod
    def publish_batch(
        exchange: str, items: Sequence[tuple[NewMessage, str]]
    ) -> _Call[list[PublishResult]]:
        body = encode_json(
            wire.PublishBatchIn(messages=[wire.PublishIn.from_model(m, k) for m, k in items])
        )
        return _Call(
            "POST", _x(exchange) + "/publish/batch", _field(wire.PublishBatchOut, "results"), body
        )


_EXCHANGE = msgspec.json.Decoder(ExchangeInfo)
_EXCHANGES = msgspec.json.Decoder(wire.ExchangeList)
_BINDINGS = msgspec.json.Decoder(wire.BindingList)


def _exchange_info(data: bytes) -> ExchangeInfo:
    return wire.exchange_in(_EXCHANGE.decode(data))


def _exchange_list(data: bytes) -> list[ExchangeInfo]:
    return [wire.exchange_in(x) for x in _EXCHANGES.decode(data).exchanges]


def _binding_list(data: bytes) -> list[Binding]:
    return [wire.binding_in(b) for b in _BINDINGS.decode(data).bindings]


def _normalize_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise errors.InvalidArgument(f"not an http(s) URL: {url!r}")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _headers(token: str | None) -> dict[str, str]:
    h = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        h["Authorization"] = f"Bearer {token}"
    return h


def _result(call: _Call[T], status: int, content: bytes) -> T:
    if status >= 400:
        raise exception_from_body(status, content)
    return call.read(content)


def _unreachable(url: str, exc: BaseException) -> errors.Unavailable:
    detail = str(exc) or type(exc).__name__
    return errors.Unavailable(f"cannot reach conveyor at {url}: {detail}")


def _may_retry(call: _Call[Any], exc: BaseException) -> bool:
    return isinstance(exc, _NOT_SENT) or (call.idempotent and isinstance(exc, _MAYBE_SENT))


def _delay(attempt: int) -> float:
    return _BACKOFF[min(attempt, len(_BACKOFF) - 1)]


class _Base:
    _url: str

    def consumer_count(self, name: str) -> int:
        """Not known to a remote client without a round trip; see ``stats().consumers``."""
        raise NotImplementedError("use stats(name).consumers over HTTP")

    def on_queue_deleted(self, callback: Callable[[str], None]) -> None:
        raise NotImplementedError("queue-deletion callbacks exist only in-process")

    @property
    def url(self) -> str:
        return self._url


class RemoteBroker(_Base):
    """The Broker API over HTTP (asyncio); the backend of ``connect("http://...")``."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        max_connections: int = 100,
    ) -> None:
        self._url = _normalize_url(url)
        self._retries = retries
        self._timeout = timeout
        self._headers = _headers(token)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> RemoteBroker:
        return cls(url, **kwargs)

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> RemoteBroker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use: a session belongs to the event loop that makes it.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                raise_for_status=False,
            )
        return self._session

    async def _request(self, call: _Call[Any]) -> tuple[int, bytes]:
        timeout = call.timeout if call.timeout is not None else self._timeout
        async with self._client().request(
            call.method,
            self._url + call.path,
            data=call.body,
            params=call.params,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            return response.status, await response.read()

    async def _run(self, call: _Call[T]) -> T:
        if self._closed:
            raise errors.ClosedError("the remote broker client is closed")
        attempt = 0
        while True:
            try:
                status, content = await self._request(call)
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt < self._retries and _may_retry(call, exc):
                    await asyncio.sleep(_delay(attempt))
                    attempt += 1
                    continue
                raise _unreachable(self._url, exc) from exc
            return _result(call, status, content)

    async def health(self) -> bool:
        try:
            status, _ = await self._request(_Call("GET", "/healthz", _none, idempotent=True))
        except (aiohttp.ClientError, TimeoutError):
            return False
        return status == 200

    # The Broker API (see docs/broker-api.md); each is one HTTP call.
    async def declare_queue(
        self, name: str, options: QueueOptions | None = None, *, passive: bool = False
    ) -> QueueInfo:
        return await self._run(_Calls.declare_queue(name, options, passive=passive))

    async def get_queue(self, name: str) -> QueueInfo:
        return await self._run(_Calls.get_queue(name))

    async def list_queues(self, prefix: str = "") -> list[QueueInfo]:
        return await self._run(_Calls.list_queues(prefix))

    async def update_queue(self, name: str, options: QueueOptions) -> QueueInfo:
        return await self._run(_Calls.update_queue(name, options))

    async def delete_queue(
        self, name: str, *, if_unused: bool = False, if_empty: bool = False
    ) -> int:
        return await self._run(_Calls.delete_queue(name, if_unused=if_unused, if_empty=if_empty))

    async def purge_queue(self, name: str) -> int:
        return await self._run(_Calls.purge_queue(name))

    async def peek(self, name: str, max_messages: int = 10) -> list[Delivery]:
        return await self._run(_Calls.peek(name, max_messages))

    async def stats(self, name: str) -> QueueStats:
        return await self._run(_Calls.stats(name))

    async def send(self, queue: str, msg: NewMessage) -> SendResult:
        return await self._run(_Calls.send(queue, msg))

    async def send_batch(self, queue: str, msgs: Sequence[NewMessage]) -> list[SendResult]:
        return await self._run(_Calls.send_batch(queue, msgs))

    async def receive(
        self,
        queue: str,
        max_messages: int = 1,
        *,
        wait: float = 0.0,
        visibility_timeout: float | None = None,
        auto_ack: bool = False,
    ) -> list[Delivery]:
        return await self._run(
            _Calls.receive(
                queue,
                max_messages,
                wait=wait,
                visibility_timeout=visibility_timeout,
                auto_ack=auto_ack,
            )
        )

    async def ack(self, queue: str, receipt: str) -> None:
        await self._run(_Calls.ack(queue, receipt))

    async def ack_batch(self, queue: str, receipts: Sequence[str]) -> AckResult:
        return await self._run(_Calls.ack_batch(queue, receipts))

    async def nack(
        self, queue: str, receipt: str, *, delay: float = 0.0, requeue: bool = True
    ) -> None:
        await self._run(_Calls.nack(queue, receipt, delay=delay, requeue=requeue))

    async def nack_batch(
        self, queue: str, receipts: Sequence[str], *, delay: float = 0.0, requeue: bool = True
    ) -> AckResult:
        return await self._run(_Calls.nack_batch(queue, receipts, delay=delay, requeue=requeue))

    async def extend(self, queue: str, receipt: str, timeout: float) -> None:
        await self._run(_Calls.extend(queue, receipt, timeout))

    async def extend_batch(self, queue: str, receipts: Sequence[str], timeout: float) -> AckResult:
        return await self._run(_Calls.extend_batch(queue, receipts, timeout))

    async def redrive(
        self, dead_letter_queue: str, *, to: str | None = None, max_messages: int | None = None
    ) -> int:
        return await self._run(_Calls.redrive(dead_letter_queue, to=to, max_messages=max_messages))

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
        return await self._run(
            _Calls.declare_exchange(
                name,
                type,
                durable=durable,
                auto_delete=auto_delete,
                internal=internal,
                arguments=arguments,
                passive=passive,
            )
        )

    async def get_exchange(self, name: str) -> ExchangeInfo:
        return await self._run(_Calls.get_exchange(name))

    async def delete_exchange(self, name: str, *, if_unused: bool = False) -> None:
        await self._run(_Calls.delete_exchange(name, if_unused=if_unused))

    async def list_exchanges(self) -> list[ExchangeInfo]:
        return await self._run(_Calls.list_exchanges())

    async def bind(
        self,
        exchange: str,
        queue: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        await self._run(_Calls.bind(exchange, queue, routing_key, arguments))

    async def unbind(
        self,
        exchange: str,
        queue: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        await self._run(_Calls.unbind(exchange, queue, routing_key, arguments))

    async def bind_exchange(
        self,
        source: str,
        destination: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        await self._run(_Calls.bind_exchange(source, destination, routing_key, arguments))

    async def unbind_exchange(
        self,
        source: str,
        destination: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        await self._run(_Calls.unbind_exchange(source, destination, routing_key, arguments))

    async def list_bindings(
        self, *, exchange: str | None = None, queue: str | None = None
    ) -> list[Binding]:
        return await self._run(_Calls.list_bindings(exchange=exchange, queue=queue))

    async def publish(self, exchange: str, msg: NewMessage, routing_key: str = "") -> PublishResult:
        return await self._run(_Calls.publish(exchange, msg, routing_key))

    async def publish_batch(
        self, exchange: str, items: Sequence[tuple[NewMessage, str]]
    ) -> list[PublishResult]:
        return await self._run(_Calls.publish_batch(exchange, items))
