"""The Amazon SQS API on the HTTP listener: SQS requests -> Broker calls.

``conveyor.protocols.sqs`` parses and encodes; this module authenticates, maps SQS
concepts onto engine queues and calls the Broker. Engine errors become SQS errors at
one boundary (``_engine_error``). Semantics live in the engine; the only SQS state
kept here is what SQS has and the engine does not: message move tasks and the
once-a-minute purge limit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import logging
import re
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from conveyor import errors
from conveyor.broker.broker import parse_receipt
from conveyor.model import Delivery, NewMessage, QueueInfo, QueueOptions
from conveyor.protocols.sqs import attributes as A
from conveyor.protocols.sqs import codec, sigv4
from conveyor.protocols.sqs import errors as E
from conveyor.protocols.sqs import messages as M
from conveyor.protocols.sqs import names as N
from conveyor.protocols.sqs import shapes as S
from conveyor.protocols.sqs.errors import SqsError
from conveyor.protocols.sqs.names import QueueRef

if TYPE_CHECKING:
    from conveyor.broker import Broker

log = logging.getLogger("conveyor.server.sqs")

MAX_BATCH = 10
_BATCH_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,80}$")
_DEDUP_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
_SYSTEM_ATTRIBUTES = (
    "SenderId",
    "SentTimestamp",
    "ApproximateReceiveCount",
    "ApproximateFirstReceiveTimestamp",
    "SequenceNumber",
    "MessageDeduplicationId",
    "MessageGroupId",
    "AWSTraceHeader",
    "DeadLetterQueueSourceArn",
)


@dataclass
class SqsConfig:
    account_id: str = "000000000000"
    region: str = "us-east-1"
    #: access key id -> secret key. None: signatures are accepted without checking.
    access_keys: dict[str, str] | None = None
    #: Seconds between two PurgeQueue calls on one queue (AWS: 60); 0 disables the limit.
    purge_interval: float = 60.0


# -- request detection ----------------------------------------------------------------


def is_sqs_request(request: web.Request) -> bool:
    """True for SQS requests: ``X-Amz-Target: AmazonSQS.*``, or query-protocol calls
    (``Action=`` in the URL, or a form-encoded POST)."""
    target = request.headers.get("X-Amz-Target")
    if target is not None:
        return target.startswith(codec.TARGET_PREFIX)
    if "Action" in request.query:
        return True
    return request.method == "POST" and request.content_type == "application/x-www-form-urlencoded"


# -- per-broker state -----------------------------------------------------------------


@dataclass
class _MoveTask:
    handle: str
    source: QueueRef
    source_arn: str
    destination_arn: str | None
    rate: int | None
    to_move: int
    started: float
    moved: int = 0
    status: str = "RUNNING"
    failure: str | None = None
    task: asyncio.Task[None] | None = None


@dataclass
class _State:
    purged: dict[str, float] = field(default_factory=dict)
    tasks: list[_MoveTask] = field(default_factory=list)


_STATES: weakref.WeakKeyDictionary[Any, _State] = weakref.WeakKeyDictionary()


def _state(broker: Broker) -> _State:
    st = _STATES.get(broker)
    if st is None:
        st = _STATES[broker] = _State()
    return st


# -- entry point ----------------------------------------------------------------------


async def handle_sqs(broker: Broker, request: web.Request, config: SqsConfig) -> web.Response:
    request_id = str(uuid.uuid4())
    target = request.headers.get("X-Amz-Target")
    is_json = target is not None
    op = "Unknown"
    try:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise SqsError(
                E.INVALID_PARAMETER_VALUE,
                f"One or more parameters are invalid. Reason: {exc.text}",
            ) from None
        url_query = dict(request.query)
        if config.access_keys is None:
            signed = sigv4.read_signature(_signature_headers(request), url_query)
        else:
            headers = {k.lower(): v for k, v in request.headers.items()}
            signed = sigv4.read_signature(headers, url_query)
            if signed is None:
                raise SqsError(E.MISSING_AUTHENTICATION, "Request is missing Authentication Token")
            sigv4.verify(
                signed,
                config.access_keys.get(signed.credential.access_key),
                method=request.method,
                raw_path=request.raw_path.partition("?")[0],
                raw_query=request.query_string,
                headers=headers,
                body=body,
            )
        if target is not None:
            op = codec.operation_from_target(target)
            parsed = codec.parse_json_request(op, body)
        else:
            params = dict(url_query)
            if request.content_type == "application/x-www-form-urlencoded":
                params.update(codec.parse_form(body))
            if "QueueUrl" not in params and request.path.strip("/"):
                params["QueueUrl"] = request.path
            op, parsed = codec.parse_query_request(params)
        ctx = _Context(
            broker=broker,
            config=config,
            region=signed.credential.region if signed else config.region,
            request=request,
        )
        result = await _HANDLERS[op](ctx, parsed)
    except SqsError as exc:
        return _error(exc, is_json, request_id)
    except errors.ConveyorError as exc:
        return _error(_engine_error(exc), is_json, request_id)
    except Exception:
        log.exception("SQS %s failed", op)
        return _error(
            SqsError(E.INTERNAL_ERROR, "We encountered an internal error. Please try again."),
            is_json,
            request_id,
        )
    if is_json:
        return web.Response(
            body=codec.encode_json(result),
            content_type=codec.JSON_CONTENT_TYPE,
            headers={"x-amzn-RequestId": request_id},
        )
    return web.Response(
        body=codec.encode_xml(op, result, request_id),
        content_type=codec.XML_CONTENT_TYPE,
        headers={"x-amzn-RequestId": request_id},
    )


def _signature_headers(request: web.Request) -> dict[str, str]:
    """The headers :func:`sigv4.read_signature` reads, keyed lower-case.

    Without signature checking only these two are needed, so the per-request copy of
    every header (kept for ``verify``) is skipped. Like that copy, a repeated header
    gives its last value.
    """
    out = {}
    for key, name in (("authorization", "Authorization"), ("x-amz-date", "X-Amz-Date")):
        values = request.headers.getall(name, ())
        if values:
            out[key] = values[-1]
    return out


def error_response(request: web.Request, exc: SqsError) -> web.Response:
    """``exc`` in the protocol (JSON or query) of ``request``, for answers given before
    the request reaches :func:`handle_sqs` (the connection limit)."""
    is_json = request.headers.get("X-Amz-Target") is not None
    return _error(exc, is_json, str(uuid.uuid4()))


def _error(exc: SqsError, is_json: bool, request_id: str) -> web.Response:
    if is_json:
        status, extra, body = codec.error_json(exc)
        return web.Response(
            status=status,
            body=body,
            content_type=codec.JSON_CONTENT_TYPE,
            headers={"x-amzn-RequestId": request_id, **extra},
        )
    status, body = codec.error_xml(exc, request_id)
    return web.Response(
        status=status,
        body=body,
        content_type=codec.XML_CONTENT_TYPE,
        headers={"x-amzn-RequestId": request_id},
    )


def _engine_error(exc: errors.ConveyorError) -> SqsError:
    """The one place engine errors become SQS errors."""
    if isinstance(exc, errors.QueueNotFound):
        return E.no_queue()
    if isinstance(exc, errors.MessageTooLarge):
        return SqsError(
            E.INVALID_PARAMETER_VALUE,
            f"One or more parameters are invalid. Reason: {exc.message}",
        )
    if isinstance(exc, errors.InvalidArgument):
        return SqsError(E.INVALID_PARAMETER_VALUE, exc.message or "Invalid parameter value.")
    if isinstance(exc, errors.ReceiptInvalid):
        return SqsError(E.RECEIPT_HANDLE_IS_INVALID, "The input receipt handle is invalid.")
    if isinstance(exc, errors.QueueExists):
        return SqsError(E.QUEUE_NAME_EXISTS, exc.message)
    if isinstance(exc, errors.QueueFull):
        return SqsError(E.OVER_LIMIT, exc.message)
    if isinstance(exc, errors.LimitExceeded):
        return SqsError(E.OVER_LIMIT, exc.message)
    if isinstance(exc, errors.Unauthorized):
        return SqsError(E.INVALID_CLIENT_TOKEN_ID, exc.message)
    if isinstance(exc, errors.ClosedError):
        return SqsError(E.SERVICE_UNAVAILABLE, "The service is shutting down.")
    if isinstance(exc, errors.StoreFull):
        return SqsError(
            E.SERVICE_UNAVAILABLE, "The broker's storage is full; the message was not stored."
        )
    return SqsError(E.INTERNAL_ERROR, "We encountered an internal error. Please try again.")


# -- helpers --------------------------------------------------------------------------


@dataclass
class _Context:
    broker: Broker
    config: SqsConfig
    region: str
    request: web.Request

    @property
    def base_url(self) -> str:
        # Only the operations that answer with a queue URL need it: not built per request.
        return f"{self.request.scheme}://{self.request.host}"

    @property
    def account(self) -> str:
        return self.config.account_id

    @property
    def default_region(self) -> str:
        return self.config.region

    def ref(self, name: str) -> QueueRef:
        return QueueRef(self.region, self.account, name)

    def resolve(self, queue_url: str) -> tuple[QueueRef, str]:
        # Long URLs are not cached, so the cache stays small whatever clients send.
        resolve = _resolve_cached if len(queue_url) <= _MAX_CACHED_URL else _resolve
        return resolve(queue_url, self.default_region, self.region, self.account)

    def url(self, ref: QueueRef) -> str:
        return N.queue_url(self.base_url, ref, self.default_region)

    def ref_of_engine(self, engine: str) -> QueueRef | None:
        parsed = N.from_engine_name(engine, self.default_region)
        if parsed is None:
            return None
        return QueueRef(parsed[0], self.account, parsed[1])

    def arn_of(self, engine: str) -> str | None:
        ref = self.ref_of_engine(engine)
        return N.queue_arn(ref) if ref else None

    def engine_of_arn(self, ref: QueueRef) -> str:
        return ref.engine_name(self.default_region)

    async def info(self, engine: str) -> QueueInfo:
        return await self.broker.get_queue(engine)


def _resolve(
    queue_url: str, default_region: str, region: str, account: str
) -> tuple[QueueRef, str]:
    ref = N.parse_queue_url(queue_url, default_region, region, account)
    return ref, ref.engine_name(default_region)


# Every message operation names its queue by URL and clients repeat the same few, so
# the parse (urlsplit, unquote, name check: ~2 us) is cached. Errors are raised again
# each time: lru_cache keeps no exceptions.
_resolve_cached = functools.lru_cache(maxsize=1024)(_resolve)
_MAX_CACHED_URL = 512


def _bounded(name: str, value: int | None, low: int, high: int, reason: str) -> int | None:
    if value is not None and not (low <= value <= high):
        raise E.invalid_value(name, value, reason)
    return value


def _check_batch(entries: list[Any], entry_name: str) -> None:
    if not entries:
        raise SqsError(E.EMPTY_BATCH, f"There should be at least one {entry_name} in the request.")
    if len(entries) > MAX_BATCH:
        raise SqsError(
            E.TOO_MANY_ENTRIES,
            f"Maximum number of entries per request are {MAX_BATCH}. You have sent {len(entries)}.",
        )
    seen: set[str] = set()
    for entry in entries:
        if not _BATCH_ID_RE.match(entry.id):
            raise SqsError(
                E.INVALID_BATCH_ENTRY_ID,
                "A batch entry id can only contain alphanumeric characters, hyphens and "
                "underscores. It can be at most 80 letters long.",
            )
        if entry.id in seen:
            raise SqsError(E.BATCH_IDS_NOT_DISTINCT, f"Id {entry.id} repeated.")
        seen.add(entry.id)


def _failed(entry_id: str, exc: SqsError) -> S.BatchResultErrorEntry:
    return S.BatchResultErrorEntry(
        id=entry_id, sender_fault=exc.sender_fault, code=exc.code, message=exc.message
    )


def _sequence(n: int) -> str:
    return f"{n:020d}"


def _receipt_ok(handle: str) -> bool:
    try:
        parse_receipt(handle)
    except errors.ReceiptInvalid:
        return False
    return True


def _bad_receipt(handle: str) -> SqsError:
    return SqsError(
        E.RECEIPT_HANDLE_IS_INVALID,
        f'The input receipt handle "{handle}" is not a valid receipt handle.',
    )


# -- queues ---------------------------------------------------------------------------


async def _dead_letter_checks(
    ctx: _Context, options: QueueOptions, source: QueueRef, fifo: bool
) -> None:
    """A RedrivePolicy's target must exist, be of the same type and allow this source."""
    if options.dead_letter is None:
        return
    try:
        dlq = await ctx.info(options.dead_letter)
    except errors.QueueNotFound:
        raise SqsError(
            E.INVALID_PARAMETER_VALUE,
            "Value for parameter RedrivePolicy is invalid. Reason: Dead letter target does "
            "not exist.",
        ) from None
    if dlq.options.fifo != fifo:
        raise SqsError(
            E.INVALID_PARAMETER_VALUE,
            "Value for parameter RedrivePolicy is invalid. Reason: Dead-letter queue must be "
            "same type of queue as the source.",
        )
    if not A.redrive_allowed(A.setting(dlq.options, "RedriveAllowPolicy", ""), N.queue_arn(source)):
        raise SqsError(
            E.INVALID_PARAMETER_VALUE,
            "Value for parameter RedrivePolicy is invalid. Reason: The dead-letter queue's "
            "RedriveAllowPolicy does not allow this source queue.",
        )


def _parse_fifo_flag(attrs: Mapping[str, str]) -> bool:
    value = attrs.get("FifoQueue")
    if value is None:
        return False
    if value.lower() not in ("true", "false"):
        raise SqsError(E.INVALID_ATTRIBUTE_VALUE, "Invalid value for the parameter FifoQueue.")
    return value.lower() == "true"


async def create_queue(ctx: _Context, req: S.CreateQueueRequest) -> S.CreateQueueResult:
    fifo = _parse_fifo_flag(req.attributes)
    N.check_queue_name(req.queue_name, fifo)
    ref = ctx.ref(req.queue_name)
    engine = ref.engine_name(ctx.default_region)
    A.check_tags(req.tags)
    options = A.apply_attributes(
        A.new_queue_options(fifo),
        req.attributes,
        fifo=fifo,
        dead_letter_name=ctx.engine_of_arn,
        now=time.time(),
    )
    for _ in range(2):
        try:
            existing = await ctx.info(engine)
        except errors.QueueNotFound:
            pass
        else:
            for name, given in req.attributes.items():
                current = A.current_value(name, existing.options, ctx.arn_of)
                if not A.same_value(name, given, current):
                    raise SqsError(
                        E.QUEUE_NAME_EXISTS,
                        "A queue already exists with the same name and a different value "
                        f"for attribute {name}",
                    )
            if existing.options.fifo != fifo:
                raise SqsError(
                    E.QUEUE_NAME_EXISTS,
                    "A queue already exists with the same name and a different value for "
                    "attribute FifoQueue",
                )
            return S.CreateQueueResult(queue_url=ctx.url(ref))
        await _dead_letter_checks(ctx, options, ref, fifo)
        if req.tags:
            options = A.with_tags(options, req.tags)
        try:
            await ctx.broker.declare_queue(engine, options)
        except errors.QueueExists:
            continue  # created concurrently: compare with that one
        return S.CreateQueueResult(queue_url=ctx.url(ref))
    raise SqsError(E.QUEUE_NAME_EXISTS, "A queue already exists with the same name.")


async def delete_queue(ctx: _Context, req: S.DeleteQueueRequest) -> None:
    _, engine = ctx.resolve(req.queue_url)
    await ctx.broker.delete_queue(engine)
    _state(ctx.broker).purged.pop(engine, None)


async def get_queue_url(ctx: _Context, req: S.GetQueueUrlRequest) -> S.GetQueueUrlResult:
    if not N.is_valid_name(req.queue_name):
        raise E.no_queue()
    ref = ctx.ref(req.queue_name)
    await ctx.info(ref.engine_name(ctx.default_region))
    return S.GetQueueUrlResult(queue_url=ctx.url(ref))


def _page(
    names: list[str], max_results: int | None, next_token: str | None
) -> tuple[list[str], str | None]:
    """Sorted names -> one page and the token for the next."""
    _bounded(
        "MaxResults", max_results, 1, 1000, "MaxResults must be an integer between 1 and 1000."
    )
    start = 0
    if next_token:
        try:
            after = base64.urlsafe_b64decode(next_token.encode("ascii")).decode("utf-8")
        except (binascii.Error, UnicodeError, ValueError):
            raise E.invalid_value(
                "NextToken", next_token, "Invalid or expired next token."
            ) from None
        while start < len(names) and names[start] <= after:
            start += 1
    limit = max_results or 1000
    page = names[start : start + limit]
    token = None
    if max_results is not None and start + limit < len(names):
        token = base64.urlsafe_b64encode(page[-1].encode("utf-8")).decode("ascii")
    return page, token


async def list_queues(ctx: _Context, req: S.ListQueuesRequest) -> S.ListQueuesResult:
    prefix = req.queue_name_prefix or ""
    refs: dict[str, QueueRef] = {}
    for info in await ctx.broker.list_queues():
        ref = ctx.ref_of_engine(info.name)
        if ref is not None and ref.region == ctx.region and ref.name.startswith(prefix):
            refs[ref.name] = ref
    page, token = _page(sorted(refs), req.max_results, req.next_token)
    return S.ListQueuesResult(queue_urls=[ctx.url(refs[n]) for n in page], next_token=token)


async def get_queue_attributes(
    ctx: _Context, req: S.GetQueueAttributesRequest
) -> S.GetQueueAttributesResult:
    ref, engine = ctx.resolve(req.queue_url)
    info = await ctx.info(engine)
    names = req.attribute_names
    stats = None
    if any(n == "All" or n.startswith("Approximate") for n in names):
        stats = await ctx.broker.stats(engine)
    attrs = A.queue_attributes(ref, info.options, info.created_at, stats, names, ctx.arn_of)
    return S.GetQueueAttributesResult(attributes=attrs)


async def set_queue_attributes(ctx: _Context, req: S.SetQueueAttributesRequest) -> None:
    ref, engine = ctx.resolve(req.queue_url)
    info = await ctx.info(engine)
    options = A.apply_attributes(
        info.options,
        req.attributes,
        fifo=info.options.fifo,
        dead_letter_name=ctx.engine_of_arn,
        now=time.time(),
    )
    if "RedrivePolicy" in req.attributes:
        if options.dead_letter == engine:
            raise E.invalid_value(
                "RedrivePolicy",
                req.attributes["RedrivePolicy"],
                "A queue cannot be its own dead-letter queue.",
            )
        await _dead_letter_checks(ctx, options, ref, info.options.fifo)
    await ctx.broker.update_queue(engine, options)


async def purge_queue(ctx: _Context, req: S.PurgeQueueRequest) -> None:
    _, engine = ctx.resolve(req.queue_url)
    await ctx.info(engine)
    st = _state(ctx.broker)
    now = time.monotonic()
    last = st.purged.get(engine)
    interval = ctx.config.purge_interval
    if interval > 0 and last is not None and now - last < interval:
        raise SqsError(
            E.PURGE_IN_PROGRESS,
            f"Only one PurgeQueue operation on {engine} is allowed every {int(interval)} seconds.",
        )
    st.purged[engine] = now
    await ctx.broker.purge_queue(engine)


async def tag_queue(ctx: _Context, req: S.TagQueueRequest) -> None:
    _, engine = ctx.resolve(req.queue_url)
    info = await ctx.info(engine)
    if not req.tags:
        raise E.missing("Tags")
    A.check_tags(req.tags)
    await ctx.broker.update_queue(engine, A.with_tags(info.options, req.tags))


async def untag_queue(ctx: _Context, req: S.UntagQueueRequest) -> None:
    _, engine = ctx.resolve(req.queue_url)
    info = await ctx.info(engine)
    await ctx.broker.update_queue(engine, A.with_tags(info.options, {}, req.tag_keys))


async def list_queue_tags(ctx: _Context, req: S.ListQueueTagsRequest) -> S.ListQueueTagsResult:
    _, engine = ctx.resolve(req.queue_url)
    info = await ctx.info(engine)
    return S.ListQueueTagsResult(tags=A.tags_of(info.options))


async def list_dead_letter_source_queues(
    ctx: _Context, req: S.ListDeadLetterSourceQueuesRequest
) -> S.ListDeadLetterSourceQueuesResult:
    _, engine = ctx.resolve(req.queue_url)
    await ctx.info(engine)
    refs: dict[str, QueueRef] = {}
    for info in await ctx.broker.list_queues():
        if info.options.dead_letter == engine:
            ref = ctx.ref_of_engine(info.name)
            if ref is not None:
                refs[f"{ref.region}/{ref.name}"] = ref
    page, token = _page(sorted(refs), req.max_results, req.next_token)
    return S.ListDeadLetterSourceQueuesResult(
        queue_urls=[ctx.url(refs[k]) for k in page], next_token=token
    )


async def add_permission(ctx: _Context, req: S.AddPermissionRequest) -> None:
    ref, engine = ctx.resolve(req.queue_url)
    info = await ctx.info(engine)
    policy = A.add_permission(
        A.setting(info.options, "Policy", ""),
        req.label,
        req.aws_account_ids,
        req.actions,
        N.queue_arn(ref),
    )
    options = A.apply_attributes(
        info.options,
        {"Policy": policy},
        fifo=info.options.fifo,
        dead_letter_name=ctx.engine_of_arn,
        now=time.time(),
    )
    await ctx.broker.update_queue(engine, options)


async def remove_permission(ctx: _Context, req: S.RemovePermissionRequest) -> None:
    _, engine = ctx.resolve(req.queue_url)
    info = await ctx.info(engine)
    policy = A.remove_permission(A.setting(info.options, "Policy", ""), req.label)
    options = A.apply_attributes(
        info.options,
        {"Policy": policy},
        fifo=info.options.fifo,
        dead_letter_name=ctx.engine_of_arn,
        now=time.time(),
    )
    await ctx.broker.update_queue(engine, options)


# -- sending --------------------------------------------------------------------------


class _Prepared(msgspec.Struct):
    message: NewMessage
    md5_body: str
    md5_attributes: str | None
    md5_system: str | None


def _prepare(
    options: QueueOptions,
    body: str,
    delay: int | None,
    attributes: dict[str, S.MessageAttributeValue],
    system: dict[str, S.MessageAttributeValue],
    dedup_id: str | None,
    group_id: str | None,
    encoded: bytes | None = None,
) -> _Prepared:
    """Validate one SendMessage(Batch entry) against its queue and build the message.

    ``encoded``: the body's UTF-8, when the caller has it already (the batch does).
    """
    M.check_body(body)
    if encoded is None:
        encoded = body.encode("utf-8")
    _bounded("DelaySeconds", delay, 0, 900, "DelaySeconds must be >= 0 and <= 900.")
    size = len(encoded) + M.check_attributes(attributes)
    trace: str | None = None
    for name, value in system.items():
        if name != "AWSTraceHeader":
            raise SqsError(
                E.INVALID_PARAMETER_VALUE, f"Message system attribute name '{name}' is invalid."
            )
        if value.data_type != "String" or not value.string_value:
            raise SqsError(
                E.INVALID_PARAMETER_VALUE,
                "Message system attribute 'AWSTraceHeader' must have a non-empty String value.",
            )
        trace = value.string_value
    limit = options.max_message_size or A.DEFAULT_MAX_SIZE
    if size > limit:
        raise SqsError(
            E.INVALID_PARAMETER_VALUE,
            f"One or more parameters are invalid. Reason: Message must be shorter than "
            f"{limit} bytes.",
        )
    if options.fifo:
        if delay:
            raise E.invalid_value(
                "DelaySeconds",
                delay,
                "The request include parameter that is not valid for this queue type.",
            )
        if group_id is None:
            raise E.missing("MessageGroupId")
        if dedup_id is None:
            if not A.flag(options, "ContentBasedDeduplication"):
                raise SqsError(
                    E.INVALID_PARAMETER_VALUE,
                    "The queue should either have ContentBasedDeduplication enabled or "
                    "MessageDeduplicationId provided explicitly",
                )
            dedup_id = hashlib.sha256(encoded).hexdigest()
    elif dedup_id is not None:
        raise E.invalid_value(
            "MessageDeduplicationId",
            dedup_id,
            "The request include parameter that is not valid for this queue type",
        )
    for pname, pvalue in (("MessageDeduplicationId", dedup_id), ("MessageGroupId", group_id)):
        if pvalue is not None and not _DEDUP_RE.match(pvalue):
            raise E.invalid_value(
                pname,
                pvalue,
                f"{pname} can only include alphanumeric and punctuation characters. 1 to 128 "
                "in length.",
            )
    message = NewMessage(
        body=encoded,
        headers=M.attributes_to_headers(attributes, trace),
        delay=float(delay) if delay is not None else None,
        dedup_id=dedup_id,
        group_id=group_id,
    )
    return _Prepared(
        message,
        M.md5_hex(encoded),
        M.md5_of_attributes(attributes),
        M.md5_of_attributes(system),
    )


async def send_message(ctx: _Context, req: S.SendMessageRequest) -> S.SendMessageResult:
    _, engine = ctx.resolve(req.queue_url)
    info = await ctx.info(engine)
    p = _prepare(
        info.options,
        req.message_body,
        req.delay_seconds,
        req.message_attributes,
        req.message_system_attributes,
        req.message_deduplication_id,
        req.message_group_id,
    )
    sent = await ctx.broker.send(engine, p.message)
    return S.SendMessageResult(
        md5_of_message_body=p.md5_body,
        md5_of_message_attributes=p.md5_attributes,
        md5_of_message_system_attributes=p.md5_system,
        message_id=sent.id,
        sequence_number=_sequence(sent.sequence) if info.options.fifo else None,
    )


async def send_message_batch(
    ctx: _Context, req: S.SendMessageBatchRequest
) -> S.SendMessageBatchResult:
    _, engine = ctx.resolve(req.queue_url)
    _check_batch(req.entries, "SendMessageBatchRequestEntry")
    info = await ctx.info(engine)
    encoded = [e.message_body.encode("utf-8") for e in req.entries]
    total = sum(map(len, encoded))
    limit = A.DEFAULT_MAX_SIZE
    if total > limit:
        raise SqsError(
            E.BATCH_REQUEST_TOO_LONG,
            f"Batch requests cannot be longer than {limit} bytes. You have sent {total} bytes.",
        )
    failed: list[S.BatchResultErrorEntry] = []
    ready: list[tuple[S.SendMessageBatchRequestEntry, _Prepared]] = []
    for entry, data in zip(req.entries, encoded, strict=True):
        try:
            p = _prepare(
                info.options,
                entry.message_body,
                entry.delay_seconds,
                entry.message_attributes,
                entry.message_system_attributes,
                entry.message_deduplication_id,
                entry.message_group_id,
                data,
            )
        except SqsError as exc:
            failed.append(_failed(entry.id, exc))
        else:
            ready.append((entry, p))
    successful: list[S.SendMessageBatchResultEntry] = []
    if ready:
        try:
            results = await ctx.broker.send_batch(engine, [p.message for _, p in ready])
            outcomes: list[Any] = list(results)
        except (errors.InvalidArgument, errors.QueueFull):
            # Find out which entries the engine refuses, one at a time.
            outcomes = []
            for _, p in ready:
                try:
                    outcomes.append(await ctx.broker.send(engine, p.message))
                except (errors.InvalidArgument, errors.QueueFull) as exc:
                    outcomes.append(_engine_error(exc))
        for (entry, p), outcome in zip(ready, outcomes, strict=True):
            if isinstance(outcome, SqsError):
                failed.append(_failed(entry.id, outcome))
                continue
            successful.append(
                S.SendMessageBatchResultEntry(
                    id=entry.id,
                    message_id=outcome.id,
                    md5_of_message_body=p.md5_body,
                    md5_of_message_attributes=p.md5_attributes,
                    md5_of_message_system_attributes=p.md5_system,
                    sequence_number=_sequence(outcome.sequence) if info.options.fifo else None,
                )
            )
    return S.SendMessageBatchResult(successful=successful, failed=failed)


# -- receiving ------------------------------------------------------------------------


def _system_attributes(ctx: _Context, d: Delivery, wanted: set[str], fifo: bool) -> dict[str, str]:
    if not wanted:
        return {}
    every = "All" in wanted
    out: dict[str, str] = {}

    def want(name: str) -> bool:
        return every or name in wanted

    if want("SenderId"):
        out["SenderId"] = ctx.account
    if want("SentTimestamp"):
        out["SentTimestamp"] = str(int(d.sent_at * 1000))
    if want("ApproximateReceiveCount"):
        out["ApproximateReceiveCount"] = str(d.receive_count)
    if want("ApproximateFirstReceiveTimestamp"):
        first = d.first_received_at if d.first_received_at is not None else time.time()
        out["ApproximateFirstReceiveTimestamp"] = str(int(first * 1000))
    if fifo and want("SequenceNumber"):
        out["SequenceNumber"] = _sequence(d.sequence)
    if d.dedup_id is not None and want("MessageDeduplicationId"):
        out["MessageDeduplicationId"] = d.dedup_id
    if d.group_id is not None and want("MessageGroupId"):
        out["MessageGroupId"] = d.group_id
    trace = d.headers.get(M.TRACE_HEADER)
    if isinstance(trace, str) and want("AWSTraceHeader"):
        out["AWSTraceHeader"] = trace
    if d.deaths and want("DeadLetterQueueSourceArn"):
        arn = ctx.arn_of(d.deaths[0].queue)
        if arn is not None:
            out["DeadLetterQueueSourceArn"] = arn
    return out


async def receive_message(ctx: _Context, req: S.ReceiveMessageRequest) -> S.ReceiveMessageResult:
    _, engine = ctx.resolve(req.queue_url)
    n = _bounded(
        "MaxNumberOfMessages",
        req.max_number_of_messages,
        1,
        10,
        "Must be between 1 and 10, if provided.",
    )
    wait = _bounded(
        "WaitTimeSeconds", req.wait_time_seconds, 0, 20, "Must be >= 0 and <= 20, if provided."
    )
    visibility = _bounded(
        "VisibilityTimeout",
        req.visibility_timeout,
        0,
        43_200,
        "Must be >= 0 and <= 43200, if provided.",
    )
    info = await ctx.info(engine)
    if wait is None:
        wait = A.wait_time(info.options)
    deliveries = await ctx.broker.receive(
        engine,
        n or 1,
        wait=float(wait),
        visibility_timeout=float(visibility) if visibility is not None else None,
    )
    wanted = set(req.attribute_names) | set(req.message_system_attribute_names)
    names = req.message_attribute_names
    out = []
    for d in deliveries:
        try:
            body = d.body.decode("utf-8")
            md5_body = M.md5_hex(d.body)  # the stored bytes are the body's UTF-8
        except UnicodeDecodeError:
            body = d.body.decode("utf-8", "replace")
            md5_body = M.md5_of_body(body)
        # Without MessageAttributeNames no attribute is shown: skip the mapping.
        user = M.select_attributes(M.headers_to_attributes(d.headers), names) if names else {}
        assert d.receipt is not None
        out.append(
            S.Message(
                message_id=d.id,
                receipt_handle=d.receipt,
                md5_of_body=md5_body,
                body=body,
                attributes=_system_attributes(ctx, d, wanted, info.options.fifo),
                md5_of_message_attributes=M.md5_of_attributes(user),
                message_attributes=user,
            )
        )
    return S.ReceiveMessageResult(messages=out)


async def delete_message(ctx: _Context, req: S.DeleteMessageRequest) -> None:
    _, engine = ctx.resolve(req.queue_url)
    if not _receipt_ok(req.receipt_handle):
        raise _bad_receipt(req.receipt_handle)
    # As on SQS, deleting with an outdated receipt succeeds and deletes nothing.
    with contextlib.suppress(errors.ReceiptInvalid):
        await ctx.broker.ack(engine, req.receipt_handle)


async def delete_message_batch(
    ctx: _Context, req: S.DeleteMessageBatchRequest
) -> S.DeleteMessageBatchResult:
    _, engine = ctx.resolve(req.queue_url)
    _check_batch(req.entries, "DeleteMessageBatchRequestEntry")
    good: list[S.DeleteMessageBatchRequestEntry] = []
    failed: list[S.BatchResultErrorEntry] = []
    for e in req.entries:
        if _receipt_ok(e.receipt_handle):
            good.append(e)
        else:
            failed.append(_failed(e.id, _bad_receipt(e.receipt_handle)))
    if good:
        await ctx.broker.ack_batch(engine, [e.receipt_handle for e in good])
    else:
        await ctx.info(engine)
    return S.DeleteMessageBatchResult(
        successful=[S.BatchResultEntry(id=e.id) for e in good], failed=failed
    )


def _not_in_flight(handle: str) -> SqsError:
    return E.invalid_value(
        "ReceiptHandle",
        handle,
        "Message does not exist or is not available for visibility timeout change.",
    )


async def change_message_visibility(ctx: _Context, req: S.ChangeMessageVisibilityRequest) -> None:
    _, engine = ctx.resolve(req.queue_url)
    _bounded(
        "VisibilityTimeout",
        req.visibility_timeout,
        0,
        43_200,
        "Must be >= 0 and <= 43200, if provided.",
    )
    if not _receipt_ok(req.receipt_handle):
        raise _bad_receipt(req.receipt_handle)
    try:
        await ctx.broker.extend(engine, req.receipt_handle, float(req.visibility_timeout))
    except errors.ReceiptInvalid:
        raise _not_in_flight(req.receipt_handle) from None


async def change_message_visibility_batch(
    ctx: _Context, req: S.ChangeMessageVisibilityBatchRequest
) -> S.ChangeMessageVisibilityBatchResult:
    _, engine = ctx.resolve(req.queue_url)
    _check_batch(req.entries, "ChangeMessageVisibilityBatchRequestEntry")
    await ctx.info(engine)
    failed: list[S.BatchResultErrorEntry] = []
    by_timeout: dict[int, list[S.ChangeMessageVisibilityBatchRequestEntry]] = {}
    for e in req.entries:
        if not _receipt_ok(e.receipt_handle):
            failed.append(_failed(e.id, _bad_receipt(e.receipt_handle)))
        elif e.visibility_timeout is None:
            failed.append(_failed(e.id, E.missing("VisibilityTimeout")))
        elif not 0 <= e.visibility_timeout <= 43_200:
            failed.append(
                _failed(
                    e.id,
                    E.invalid_value(
                        "VisibilityTimeout",
                        e.visibility_timeout,
                        "Must be >= 0 and <= 43200, if provided.",
                    ),
                )
            )
        else:
            by_timeout.setdefault(e.visibility_timeout, []).append(e)
    successful: list[S.BatchResultEntry] = []
    for timeout, entries in by_timeout.items():
        res = await ctx.broker.extend_batch(
            engine, [e.receipt_handle for e in entries], float(timeout)
        )
        stale = set(res.failed)
        for e in entries:
            if e.receipt_handle in stale:
                failed.append(_failed(e.id, _not_in_flight(e.receipt_handle)))
            else:
                successful.append(S.BatchResultEntry(id=e.id))
    order = {e.id: i for i, e in enumerate(req.entries)}
    successful.sort(key=lambda s: order[s.id])
    failed.sort(key=lambda f: order[f.id])
    return S.ChangeMessageVisibilityBatchResult(successful=successful, failed=failed)


# -- message move tasks ---------------------------------------------------------------


def _task_handle(source_arn: str) -> str:
    doc = msgspec.json.encode({"taskId": str(uuid.uuid4()), "sourceArn": source_arn})
    return base64.b64encode(doc).decode("ascii")


async def _run_move(broker: Broker, task: _MoveTask, source: str, dest: str | None) -> None:
    try:
        while task.status == "RUNNING":
            chunk = task.rate or 1000
            n = await broker.redrive(source, to=dest, max_messages=chunk)
            task.moved += n
            if n < chunk:
                task.status = "COMPLETED"
                break
            if task.rate:
                await asyncio.sleep(1.0)
    except asyncio.CancelledError:
        task.status = "CANCELLED"
        raise
    except errors.ConveyorError as exc:
        task.status = "FAILED"
        task.failure = exc.message or type(exc).__name__
    except Exception as exc:  # pragma: no cover - logged, reported as FAILED
        log.exception("message move task failed")
        task.status = "FAILED"
        task.failure = type(exc).__name__
    if task.status == "CANCELLING":
        task.status = "CANCELLED"


async def start_message_move_task(
    ctx: _Context, req: S.StartMessageMoveTaskRequest
) -> S.StartMessageMoveTaskResult:
    source = N.parse_arn(req.source_arn, "SourceArn")
    source_engine = ctx.engine_of_arn(source)
    not_found = SqsError(
        E.RESOURCE_NOT_FOUND,
        "The resource that you specified for the SourceArn parameter doesn't exist.",
    )
    try:
        await ctx.info(source_engine)
    except errors.QueueNotFound:
        raise not_found from None
    queues = await ctx.broker.list_queues()
    if not any(q.options.dead_letter == source_engine for q in queues):
        raise E.invalid_value(
            "SourceArn", req.source_arn, "Source queue must be configured as a Dead Letter Queue."
        )
    dest_engine = None
    if req.destination_arn:
        dest_engine = ctx.engine_of_arn(N.parse_arn(req.destination_arn, "DestinationArn"))
        try:
            await ctx.info(dest_engine)
        except errors.QueueNotFound:
            raise SqsError(
                E.RESOURCE_NOT_FOUND,
                "The resource that you specified for the DestinationArn parameter doesn't exist.",
            ) from None
    rate = _bounded(
        "MaxNumberOfMessagesPerSecond",
        req.max_number_of_messages_per_second,
        1,
        500,
        "Must be between 1 and 500.",
    )
    st = _state(ctx.broker)
    if any(t.source_arn == req.source_arn and t.status == "RUNNING" for t in st.tasks):
        raise E.invalid_value(
            "SourceArn",
            req.source_arn,
            "There is already a task running. Only one active task is allowed for a source "
            "queue arn at a given time.",
        )
    stats = await ctx.broker.stats(source_engine)
    task = _MoveTask(
        handle=_task_handle(req.source_arn),
        source=source,
        source_arn=req.source_arn,
        destination_arn=req.destination_arn,
        rate=rate,
        to_move=stats.ready,
        started=time.time(),
    )
    task.task = asyncio.create_task(_run_move(ctx.broker, task, source_engine, dest_engine))
    st.tasks.append(task)
    del st.tasks[:-100]  # keep the recent history only
    return S.StartMessageMoveTaskResult(task_handle=task.handle)


async def cancel_message_move_task(
    ctx: _Context, req: S.CancelMessageMoveTaskRequest
) -> S.CancelMessageMoveTaskResult:
    for task in _state(ctx.broker).tasks:
        if task.handle == req.task_handle and task.status == "RUNNING":
            task.status = "CANCELLING"
            if task.task is not None:
                task.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task.task
            task.status = "CANCELLED"
            return S.CancelMessageMoveTaskResult(approximate_number_of_messages_moved=task.moved)
    raise SqsError(E.RESOURCE_NOT_FOUND, "Task does not exist.")


async def list_message_move_tasks(
    ctx: _Context, req: S.ListMessageMoveTasksRequest
) -> S.ListMessageMoveTasksResult:
    source = N.parse_arn(req.source_arn, "SourceArn")
    try:
        await ctx.info(ctx.engine_of_arn(source))
    except errors.QueueNotFound:
        raise SqsError(
            E.RESOURCE_NOT_FOUND,
            "The resource that you specified for the SourceArn parameter doesn't exist.",
        ) from None
    limit = _bounded("MaxResults", req.max_results, 1, 10, "Must be between 1 and 10.") or 1
    tasks = [t for t in reversed(_state(ctx.broker).tasks) if t.source_arn == req.source_arn]
    results = []
    for t in tasks[:limit]:
        running = t.status == "RUNNING"
        results.append(
            S.ListMessageMoveTasksResultEntry(
                task_handle=t.handle if running else None,
                status=t.status,
                source_arn=t.source_arn,
                destination_arn=t.destination_arn,
                max_number_of_messages_per_second=t.rate,
                approximate_number_of_messages_moved=t.moved,
                approximate_number_of_messages_to_move=t.to_move if running else None,
                failure_reason=t.failure,
                started_timestamp=int(t.started * 1000),
            )
        )
    return S.ListMessageMoveTasksResult(results=results)


_Handler = Callable[[_Context, Any], Awaitable[S.Shape | None]]

_HANDLERS: dict[str, _Handler] = {
    "AddPermission": add_permission,
    "CancelMessageMoveTask": cancel_message_move_task,
    "ChangeMessageVisibility": change_message_visibility,
    "ChangeMessageVisibilityBatch": change_message_visibility_batch,
    "CreateQueue": create_queue,
    "DeleteMessage": delete_message,
    "DeleteMessageBatch": delete_message_batch,
    "DeleteQueue": delete_queue,
    "GetQueueAttributes": get_queue_attributes,
    "GetQueueUrl": get_queue_url,
    "ListDeadLetterSourceQueues": list_dead_letter_source_queues,
    "ListMessageMoveTasks": list_message_move_tasks,
    "ListQueueTags": list_queue_tags,
    "ListQueues": list_queues,
    "PurgeQueue": purge_queue,
    "ReceiveMessage": receive_message,
    "RemovePermission": remove_permission,
    "SendMessage": send_message,
    "SendMessageBatch": send_message_batch,
    "SetQueueAttributes": set_queue_attributes,
    "StartMessageMoveTask": start_message_move_task,
    "TagQueue": tag_queue,
    "UntagQueue": untag_queue,
}

__all__ = ["SqsConfig", "error_response", "handle_sqs", "is_sqs_request"]
