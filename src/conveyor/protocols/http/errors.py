"""conveyor errors <-> HTTP status and the JSON error body.

Every client mistake is a 4xx with ``{"error": {"code": ..., "message": ...}}``; the
code is the stable ``ConveyorError.code`` so the remote client raises the same class
the engine raised.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from conveyor import errors
from conveyor.protocols.http.wire import ErrorDetail, ErrorOut

T = TypeVar("T")

#: Most specific first: the first class the error is an instance of wins.
_STATUS: tuple[tuple[type[errors.ConveyorError], int], ...] = (
    (errors.MessageTooLarge, 413),
    (errors.InvalidArgument, 400),
    (errors.NotFound, 404),
    (errors.ReceiptInvalid, 409),
    (errors.Conflict, 409),
    (errors.QueueFull, 429),
    (errors.LimitExceeded, 403),
    (errors.Unroutable, 422),
    (errors.Unauthorized, 401),
    (errors.StoreFull, 507),
    (errors.ClosedError, 503),
    (errors.StoreError, 500),
)


def status_for(exc: errors.ConveyorError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(code: str, message: str) -> bytes:
    return msgspec.json.encode(ErrorOut(error=ErrorDetail(code=code, message=message)))


def error_from_exception(exc: errors.ConveyorError) -> tuple[int, bytes]:
    """The status and body that answer ``exc``."""
    return status_for(exc), error_body(exc.code, exc.message or str(exc))


def exception_from_body(status: int, body: bytes) -> errors.ConveyorError:
    """Rebuild the exception a server answered with (the remote client's side)."""
    try:
        detail = msgspec.json.decode(body, type=ErrorOut).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        text = body[:200].decode("utf-8", "replace").strip()
        return _by_status(status)(f"HTTP {status}: {text}" if text else f"HTTP {status}")
    cls = errors.BY_CODE.get(detail.code) or _by_status(status)
    return cls(detail.message)


def _by_status(status: int) -> type[errors.ConveyorError]:
    return {
        400: errors.InvalidArgument,
        401: errors.Unauthorized,
        404: errors.NotFound,
        409: errors.Conflict,
        413: errors.MessageTooLarge,
        429: errors.QueueFull,
        503: errors.ClosedError,
        507: errors.StoreFull,
    }.get(status, errors.ConveyorError)


def decode_json(data: bytes, type: type[T]) -> T:
    """Decode a request body into ``type``, raising InvalidArgument on any mistake.

    An empty body reads as ``{}`` so that requests whose fields all have defaults may
    be sent without one.
    """
    if not data.strip():
        data = b"{}"
    try:
        return msgspec.json.decode(data, type=type)
    except msgspec.ValidationError as exc:
        raise errors.InvalidArgument(f"invalid request: {exc}") from None
    # msgspec raises UnicodeDecodeError, not DecodeError, for bad UTF-8 in a string.
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise errors.InvalidArgument(f"malformed JSON: {exc}") from None


def encode_json(obj: Any) -> bytes:
    return msgspec.json.encode(obj)
