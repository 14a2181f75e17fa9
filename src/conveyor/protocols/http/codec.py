"""Bodies and header values as JSON.

Bodies are bytes; JSON has no bytes. A body that is valid UTF-8 travels as a plain
string (``"body": "hello"``); any other body travels base64 with a marker beside it
(``"body": "AAE=", "body_encoding": "base64"``). Header values that are bytes become
``{"$base64": "..."}`` objects, recursively inside nested tables and arrays, so the
AMQP header tables that carry bytes survive a round trip through the HTTP API.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from conveyor.errors import InvalidArgument

BodyEncoding = Literal["utf-8", "base64"]
BYTES_MARKER = "$base64"


def encode_body(body: bytes) -> tuple[str, BodyEncoding]:
    """Return the JSON string for ``body`` and the marker that says how to read it."""
    try:
        return body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii"), "base64"


def decode_body(text: str, encoding: BodyEncoding = "utf-8") -> bytes:
    if encoding == "base64":
        return _b64decode(text, "body")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument("body is not valid UTF-8 text; send it base64") from None


def encode_value(value: Any) -> Any:
    """Make a header value JSON-safe (bytes -> ``{"$base64": ...}``)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {BYTES_MARKER: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): encode_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode_value(v) for v in value]
    return value


def decode_value(value: Any) -> Any:
    """Inverse of :func:`encode_value`."""
    if isinstance(value, dict):
        if len(value) == 1 and BYTES_MARKER in value:
            raw = value[BYTES_MARKER]
            if not isinstance(raw, str):
                raise InvalidArgument(f"{BYTES_MARKER} must hold a base64 string")
            return _b64decode(raw, "header value")
        return {k: decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


def encode_headers(headers: dict[str, Any]) -> dict[str, Any]:
    return {k: encode_value(v) for k, v in headers.items()}


def decode_headers(headers: dict[str, Any]) -> dict[str, Any]:
    return {k: decode_value(v) for k, v in headers.items()}


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(f"{what} is not valid base64: {exc}") from None
