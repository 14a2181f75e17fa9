"""The sans-I/O half of the native HTTP API: codecs, wire shapes, errors, OpenAPI."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor import errors
from conveyor.model import Delivery, NewMessage, Properties
from conveyor.protocols.http import (
    ROUTES,
    decode_body,
    decode_json,
    encode_body,
    error_from_exception,
    exception_from_body,
    exchange_from_path,
    exchange_to_path,
    openapi_document,
    status_for,
    wire,
)
from conveyor.protocols.http.codec import decode_headers, encode_headers

header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(st.binary())
def test_any_body_round_trips(body: bytes) -> None:
    text, encoding = encode_body(body)
    wire_text = msgspec.json.decode(msgspec.json.encode(text))
    assert decode_body(wire_text, encoding) == body


def test_text_bodies_travel_plain_and_binary_ones_base64() -> None:
    assert encode_body(b"hello \xc3\xa9") == ("hello é", "utf-8")
    assert encode_body(b"\xff\x00") == ("/wA=", "base64")


@given(st.dictionaries(st.text(), header_values, max_size=5))
def test_headers_with_bytes_round_trip_through_json(headers: dict[str, Any]) -> None:
    encoded = msgspec.json.decode(msgspec.json.encode(encode_headers(headers)))
    assert decode_headers(encoded) == headers


def test_bytes_header_marker() -> None:
    assert encode_headers({"k": b"\x00\x01"}) == {"k": {"$base64": "AAE="}}


@pytest.mark.parametrize(
    "data",
    [b"{", b"[]", b'{"body": 1}', b'{"body": "x", "priority": "high"}', b'{"bdy": "x"}',
     b'{"body": "@@", "body_encoding": "base64"}', b'{"body": "x", "body_encoding": "rot13"}',
     b"\xff\xfe", b'{"body": "x", "headers": {"h": {"$base64": 5}}}'],
)  # fmt: skip
def test_bad_requests_are_invalid_argument_never_anything_else(data: bytes) -> None:
    with pytest.raises(errors.InvalidArgument):
        decode_json(data, wire.MessageIn).to_model()


@given(st.binary(max_size=200))
def test_fuzz_message_parser_only_raises_invalid_argument(data: bytes) -> None:
    with contextlib.suppress(errors.InvalidArgument):
        decode_json(data, wire.MessageIn).to_model()


def test_empty_body_reads_as_defaults() -> None:
    assert decode_json(b"", wire.ReceiveIn) == wire.ReceiveIn()


def test_message_in_to_model_and_back() -> None:
    msg = NewMessage(
        body=b"\x00bin",
        headers={"a": 1, "b": b"raw", "c": [b"x", {"d": b"y"}]},
        properties=Properties(content_type="application/octet-stream"),
        priority=3,
        delay=1.5,
        ttl=10,
        dedup_id="d",
        group_id="g",
    )
    data = msgspec.json.encode(wire.MessageIn.from_model(msg))
    assert decode_json(data, wire.MessageIn).to_model() == msg


def test_delivery_out_and_back() -> None:
    d = Delivery(
        id="1", queue="q", body=b"\xff", headers={"h": b"v"}, properties=Properties(type="t"),
        priority=1, sent_at=1.0, receive_count=2, first_received_at=1.5, receipt="r",
    )  # fmt: skip
    data = msgspec.json.encode(wire.MessageOut.from_model(d))
    assert msgspec.json.decode(data, type=wire.MessageOut).to_model() == d


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (errors.InvalidArgument("x"), 400),
        (errors.InvalidName("x"), 400),
        (errors.MessageTooLarge("x"), 413),
        (errors.QueueNotFound("x"), 404),
        (errors.ExchangeNotFound("x"), 404),
        (errors.QueueExists("x"), 409),
        (errors.ReceiptInvalid("x"), 409),
        (errors.QueueFull("x"), 429),
        (errors.Unauthorized("x"), 401),
        (errors.StoreFull("x"), 507),
        (errors.StoreCorrupt("x"), 500),
        (errors.ClosedError("x"), 503),
    ],
)
def test_error_status_and_round_trip(exc: errors.ConveyorError, status: int) -> None:
    assert status_for(exc) == status
    got_status, body = error_from_exception(exc)
    assert got_status == status
    again = exception_from_body(got_status, body)
    assert type(again) is type(exc)
    assert again.message == "x"


def test_unknown_error_body_maps_by_status() -> None:
    assert isinstance(exception_from_body(404, b"<html>"), errors.NotFound)
    assert type(exception_from_body(502, b"bad gateway")) is errors.ConveyorError


def test_default_exchange_has_a_path_name() -> None:
    assert exchange_to_path("") == "amq.default"
    assert exchange_from_path("amq.default") == ""
    assert exchange_from_path("x") == "x"


def test_openapi_covers_every_route_with_schemas() -> None:
    doc = openapi_document("test")
    assert doc["openapi"].startswith("3.")
    ops = {op["operationId"] for path in doc["paths"].values() for op in path.values()}
    assert ops == {r.operation for r in ROUTES}
    schemas = doc["components"]["schemas"]
    text = msgspec.json.encode(doc).decode()
    for ref in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
        assert ref in schemas
