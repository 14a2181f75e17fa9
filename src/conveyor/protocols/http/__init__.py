"""The native HTTP/JSON API without I/O: wire shapes, codecs, errors, routes, OpenAPI."""

from conveyor.protocols.http.codec import decode_body, encode_body
from conveyor.protocols.http.errors import (
    decode_json,
    encode_json,
    error_body,
    error_from_exception,
    exception_from_body,
    status_for,
)
from conveyor.protocols.http.openapi import openapi_document
from conveyor.protocols.http.routes import (
    BY_OPERATION,
    DEFAULT_EXCHANGE_PATH,
    ROUTES,
    Route,
    exchange_from_path,
    exchange_to_path,
)

__all__ = [
    "BY_OPERATION",
    "DEFAULT_EXCHANGE_PATH",
    "ROUTES",
    "Route",
    "decode_body",
    "decode_json",
    "encode_body",
    "encode_json",
    "error_body",
    "error_from_exception",
    "exception_from_body",
    "exchange_from_path",
    "exchange_to_path",
    "openapi_document",
    "status_for",
]
