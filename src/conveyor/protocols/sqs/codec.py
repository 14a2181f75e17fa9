"""Bytes <-> typed SQS requests and results, for both wire protocols.

* AWS JSON 1.0 (current SDKs): ``X-Amz-Target: AmazonSQS.<Op>``, a JSON body in, JSON
  out, errors as ``{"__type", "message"}`` plus the ``x-amzn-query-error`` header.
* Query (older SDKs, botocore 1.32.6-1.34.89): form or URL parameters in, with
  ``Action=<Op>`` and flattened lists and maps, XML out.

Nothing here does I/O; the server hands in headers and bytes and gets bytes back.
"""

from __future__ import annotations

import base64
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Union
from urllib.parse import parse_qsl

import msgspec

from conveyor.protocols.sqs import errors as E
from conveyor.protocols.sqs.errors import SqsError
from conveyor.protocols.sqs.shapes import OPERATIONS, Shape

XML_NAMESPACE = "http://queue.amazonaws.com/doc/2012-11-05/"
JSON_CONTENT_TYPE = "application/x-amz-json-1.0"
XML_CONTENT_TYPE = "text/xml"
TARGET_PREFIX = "AmazonSQS."

# -- field introspection (shared by the form parser and the XML writer) ----------------

_SCALAR, _LIST, _MAP, _STRUCT = range(4)


@dataclass(frozen=True, slots=True)
class _Field:
    attr: str  # Python attribute
    json: str  # JSON member name
    xml: str  # query/XML name
    kind: int
    #: Element type of a list/map value, or the struct type itself.
    item: type[Any]
    map_names: tuple[str, str] = ("Name", "Value")


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _classify(tp: Any) -> tuple[int, type[Any]]:
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin is list:
        return _LIST, typing.get_args(tp)[0]
    if origin is dict:
        return _MAP, typing.get_args(tp)[1]
    if isinstance(tp, type) and issubclass(tp, Shape):
        return _STRUCT, tp
    return _SCALAR, tp


@cache
def _fields(cls: type[Shape]) -> tuple[_Field, ...]:
    out = []
    for f in msgspec.structs.fields(cls):
        kind, item = _classify(f.type)
        out.append(
            _Field(
                attr=f.name,
                json=f.encode_name,
                xml=cls.XML.get(f.encode_name, f.encode_name),
                kind=kind,
                item=item,
                map_names=cls.XML_MAP.get(f.encode_name, ("Name", "Value")),
            )
        )
    return tuple(out)


def _is_struct(tp: type[Any]) -> bool:
    return isinstance(tp, type) and issubclass(tp, Shape)


# -- requests -------------------------------------------------------------------------


def operation_from_target(target: str) -> str:
    """``AmazonSQS.SendMessage`` -> ``SendMessage`` (InvalidAction if unknown)."""
    if not target.startswith(TARGET_PREFIX):
        raise SqsError(E.INVALID_ACTION, f"Unknown target {target!r}.")
    return _check_operation(target[len(TARGET_PREFIX) :])


def _check_operation(op: str) -> str:
    if op not in OPERATIONS:
        raise SqsError(
            E.INVALID_ACTION, f"An invalid action or version was specified: {op or '(none)'}."
        )
    return op


def parse_json_request(op: str, body: bytes) -> Shape:
    """Decode a JSON 1.0 request body for ``op``."""
    request_type = OPERATIONS[_check_operation(op)][0]
    try:
        return msgspec.json.decode(body or b"{}", type=request_type)
    except msgspec.ValidationError as exc:
        raise _validation_error(exc) from None
    # msgspec raises UnicodeDecodeError, not DecodeError, for bad UTF-8 in a string.
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise SqsError(E.MALFORMED_REQUEST, f"The request body is not valid JSON: {exc}") from None


def parse_form(body: bytes | str) -> dict[str, str]:
    """``a=1&b=2`` -> dict; a repeated key keeps its last value."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    return dict(parse_qsl(text, keep_blank_values=True))


def parse_query_request(params: Mapping[str, str]) -> tuple[str, Shape]:
    """Decode query-protocol parameters (form body and/or URL query) into a request."""
    action = params.get("Action")
    if not action:
        raise SqsError(E.MISSING_ACTION, "The request must contain the parameter Action.")
    op = _check_operation(action)
    request_type = OPERATIONS[op][0]
    data = _from_tree(request_type, _tree(params))
    try:
        return op, msgspec.convert(data, request_type, strict=False)
    except msgspec.ValidationError as exc:
        raise _validation_error(exc) from None


def is_query_action(params: Mapping[str, str]) -> bool:
    return "Action" in params


_Tree = dict[str, Any]


def _tree(params: Mapping[str, str]) -> _Tree:
    """``{"A.1.Name": "x"}`` -> ``{"A": {"1": {"Name": "x"}}}``."""
    root: _Tree = {}
    for key, value in params.items():
        node = root
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        if parts[-1] not in node:
            node[parts[-1]] = value
    return root


def _indexed(node: Any) -> list[Any]:
    """Children of a flattened list/map node in index order (``.1``, ``.2``, ...)."""
    if not isinstance(node, dict):
        return []
    items = [(int(k), v) for k, v in node.items() if k.isdigit()]
    items.sort(key=lambda kv: kv[0])
    return [v for _, v in items]


def _value(tp: type[Any], node: Any) -> Any:
    if _is_struct(tp):
        return _from_tree(tp, node) if isinstance(node, dict) else None
    return node if isinstance(node, str) else None


def _from_tree(cls: type[Shape], node: _Tree) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in _fields(cls):
        sub = node.get(f.xml)
        if sub is None:
            continue
        if f.kind == _SCALAR:
            if isinstance(sub, str):
                out[f.json] = sub
        elif f.kind == _STRUCT:
            if isinstance(sub, dict):
                out[f.json] = _from_tree(f.item, sub)
        elif f.kind == _LIST:
            values = [_value(f.item, v) for v in _indexed(sub)]
            out[f.json] = [v for v in values if v is not None]
        else:
            key_name, value_name = f.map_names
            entries: dict[str, Any] = {}
            for entry in _indexed(sub):
                if not isinstance(entry, dict):
                    continue
                key = entry.get(key_name)
                value = _value(f.item, entry.get(value_name))
                if isinstance(key, str) and value is not None:
                    entries[key] = value
            out[f.json] = entries
    return out


def _validation_error(exc: msgspec.ValidationError) -> SqsError:
    text = str(exc)
    path = ""
    if " - at `$" in text:
        text, _, path = text.partition(" - at `$")
        path = path.rstrip("`").lstrip(".")
    if text.startswith("Object missing required field `"):
        name = text.split("`")[1]
        return E.missing(f"{path}.{name}" if path else name)
    where = path or "(request)"
    return SqsError(E.INVALID_PARAMETER_VALUE, f"Invalid value for parameter {where}: {text}.")


# -- results --------------------------------------------------------------------------

_json_encoder = msgspec.json.Encoder()


def encode_json(result: Shape | None) -> bytes:
    return b"{}" if result is None else _json_encoder.encode(result)


_XML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#xD;"})


def _xml_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value).translate(_XML_ESCAPES)


def _xml_value(tp: type[Any], value: Any, out: list[str]) -> None:
    if _is_struct(tp):
        _xml_struct(value, out)
    else:
        out.append(_xml_text(value))


def _xml_struct(obj: Shape, out: list[str]) -> None:
    for f in _fields(type(obj)):
        value = getattr(obj, f.attr)
        if value is None:
            continue
        tag = f.xml
        if f.kind == _SCALAR:
            out.append(f"<{tag}>{_xml_text(value)}</{tag}>")
        elif f.kind == _STRUCT:
            out.append(f"<{tag}>")
            _xml_struct(value, out)
            out.append(f"</{tag}>")
        elif f.kind == _LIST:
            for item in value:
                out.append(f"<{tag}>")
                _xml_value(f.item, item, out)
                out.append(f"</{tag}>")
        else:
            key_name, value_name = f.map_names
            for key, item in value.items():
                out.append(f"<{tag}><{key_name}>{_xml_text(key)}</{key_name}><{value_name}>")
                _xml_value(f.item, item, out)
                out.append(f"</{value_name}></{tag}>")


def encode_xml(op: str, result: Shape | None, request_id: str) -> bytes:
    out = [f'<?xml version="1.0"?><{op}Response xmlns="{XML_NAMESPACE}">']
    if result is not None:
        out.append(f"<{op}Result>")
        _xml_struct(result, out)
        out.append(f"</{op}Result>")
    out.append(
        f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata></{op}Response>"
    )
    return "".join(out).encode("utf-8")


# -- errors ---------------------------------------------------------------------------


def error_json(err: SqsError) -> tuple[int, dict[str, str], bytes]:
    """(status, extra headers, body) of a JSON-protocol error."""
    body = _json_encoder.encode(
        {"__type": f"{err.kind.namespace}#{err.kind.shape}", "message": err.message}
    )
    headers = {"x-amzn-query-error": f"{err.kind.query_code};{err.kind.fault}"}
    return err.status, headers, body


def error_xml(err: SqsError, request_id: str) -> tuple[int, bytes]:
    body = (
        f'<?xml version="1.0"?><ErrorResponse xmlns="{XML_NAMESPACE}"><Error>'
        f"<Type>{err.kind.fault}</Type><Code>{_xml_text(err.code)}</Code>"
        f"<Message>{_xml_text(err.message)}</Message><Detail/></Error>"
        f"<RequestId>{request_id}</RequestId></ErrorResponse>"
    )
    return err.status, body.encode("utf-8")


def shapes_of(op: str) -> tuple[type[Shape], type[Shape] | None]:
    return OPERATIONS[_check_operation(op)]


def all_operations() -> Iterable[str]:
    return OPERATIONS.keys()
