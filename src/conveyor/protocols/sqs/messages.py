"""SQS message bodies and attributes: validation, MD5s, and the mapping to headers.

Mapping (documented in docs/sqs.md):

==================================  ============================================
SQS MessageAttribute                conveyor header value
==================================  ============================================
``String``                          ``str``
``Number`` (canonical int/float)    ``int`` / ``float``
``Number`` (other text, e.g. 1.50)  ``str``, type kept in ``sqs:types``
``Binary``                          ``bytes``
``String.x`` / ``Number.x`` / ...   as the base type, full type in ``sqs:types``
MessageSystemAttribute              header ``sqs:AWSTraceHeader``
AWSTraceHeader
==================================  ============================================

Going back, header values map to ``String`` (str, bool as ``true``/``false``),
``Number`` (int, float) and ``Binary`` (bytes). Headers whose names are not valid SQS
attribute names (``sqs:*`` among them) are not shown as message attributes.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any

from conveyor.protocols.sqs import errors as E
from conveyor.protocols.sqs.errors import SqsError
from conveyor.protocols.sqs.shapes import MessageAttributeValue

TYPES_HEADER = "sqs:types"
TRACE_HEADER = "sqs:AWSTraceHeader"
MAX_ATTRIBUTES = 10

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,256}$")
_TYPE_RE = re.compile(r"^(String|Number|Binary)(\.[^\s]{1,255})?$")
# Characters SQS accepts in bodies and string values (XML 1.0 chars).
_BAD_CHAR_RE = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_INT_RE = re.compile(r"^-?[0-9]+$")
_NUMBER_RE = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_of_body(body: str) -> str:
    return md5_hex(body.encode("utf-8"))


def md5_of_attributes(attributes: Mapping[str, MessageAttributeValue]) -> str | None:
    """AWS's MD5OfMessageAttributes (None when there are none)."""
    if not attributes:
        return None
    out = bytearray()

    def put(data: bytes) -> None:
        out.extend(struct.pack(">I", len(data)))
        out.extend(data)

    for name in sorted(attributes):
        value = attributes[name]
        put(name.encode("utf-8"))
        put(value.data_type.encode("utf-8"))
        if value.binary_value is not None and value.data_type.startswith("Binary"):
            out.append(2)
            put(value.binary_value)
        elif value.string_value is not None:
            out.append(1)
            put(value.string_value.encode("utf-8"))
        elif value.binary_value is not None:
            out.append(2)
            put(value.binary_value)
        elif value.string_list_values:
            out.append(3)
            for s in value.string_list_values:
                put(s.encode("utf-8"))
        elif value.binary_list_values:
            out.append(4)
            for b in value.binary_list_values:
                put(b)
    return md5_hex(bytes(out))


def check_body(body: str) -> None:
    if not body:
        raise E.missing("MessageBody")
    if body.isascii() and body.isprintable():
        return  # only #x20-#x7E: all allowed; cheaper than the regex scan (measured)
    bad = _BAD_CHAR_RE.search(body)
    if bad:
        raise SqsError(
            E.INVALID_MESSAGE_CONTENTS,
            f"Invalid binary character '#x{ord(bad.group()):X}' was found in the message "
            "body, the set of allowed characters is #x9 | #xA | #xD | #x20 to #xD7FF | "
            "#xE000 to #xFFFD | #x10000 to #x10FFFF",
        )


def check_attribute_name(name: str, what: str = "Message (user) attribute") -> None:
    low = name.lower()
    if (
        not _NAME_RE.match(name)
        or name.startswith(".")
        or name.endswith(".")
        or ".." in name
        or low.startswith("aws.")
        or low.startswith("amazon.")
    ):
        raise SqsError(E.INVALID_PARAMETER_VALUE, f"{what} name '{name}' is invalid.")


def check_attributes(attributes: Mapping[str, MessageAttributeValue]) -> int:
    """Validate message attributes as SQS does; return their size in bytes."""
    if len(attributes) > MAX_ATTRIBUTES:
        raise SqsError(
            E.INVALID_PARAMETER_VALUE,
            f"Number of message attributes [{len(attributes)}] exceeds the allowed maximum "
            f"[{MAX_ATTRIBUTES}].",
        )
    size = 0
    for name, value in attributes.items():
        check_attribute_name(name)
        dtype = value.data_type
        if not dtype:
            raise SqsError(
                E.INVALID_PARAMETER_VALUE,
                f"The message attribute '{name}' must contain non-empty message attribute type.",
            )
        if not _TYPE_RE.match(dtype):
            raise SqsError(
                E.INVALID_PARAMETER_VALUE,
                f"The type of message (user) attribute '{name}' is invalid. You must use only "
                "the following supported type prefixes: Binary, Number, String.",
            )
        base = dtype.split(".", 1)[0]
        if value.string_list_values or value.binary_list_values:
            raise SqsError(
                E.INVALID_PARAMETER_VALUE,
                f"Message attribute list values in SendMessage operation are not supported "
                f"(attribute '{name}').",
            )
        if base == "Binary":
            if not value.binary_value:
                raise _empty(name, dtype)
            size += len(value.binary_value)
        else:
            if not value.string_value:
                raise _empty(name, dtype)
            if _BAD_CHAR_RE.search(value.string_value):
                raise SqsError(
                    E.INVALID_PARAMETER_VALUE,
                    f"Message (user) attribute '{name}' value contains invalid characters.",
                )
            if base == "Number" and not _NUMBER_RE.match(value.string_value.strip()):
                raise SqsError(
                    E.INVALID_PARAMETER_VALUE,
                    f"Could not cast message attribute '{name}' value to number.",
                )
            size += len(value.string_value.encode("utf-8"))
        size += len(name.encode("utf-8")) + len(dtype.encode("utf-8"))
    return size


def _empty(name: str, dtype: str) -> SqsError:
    return SqsError(
        E.INVALID_PARAMETER_VALUE,
        f"Message (user) attribute '{name}' must contain a non-empty value of message "
        f"attribute type '{dtype}'.",
    )


def _number_to_header(text: str) -> int | float | None:
    if _INT_RE.match(text):
        n = int(text)
        if str(n) == text and -(2**63) <= n < 2**63:
            return n
        return None
    try:
        f = float(text)
    except ValueError:
        return None
    return f if repr(f) == text else None


def attributes_to_headers(
    attributes: Mapping[str, MessageAttributeValue], trace_header: str | None = None
) -> dict[str, Any]:
    """SQS message attributes -> conveyor headers (see the table above)."""
    headers: dict[str, Any] = {}
    odd_types: list[str] = []
    for name, value in attributes.items():
        dtype = value.data_type
        base = dtype.split(".", 1)[0]
        header: Any
        if base == "Binary":
            header = value.binary_value or b""
            natural = "Binary"
        elif base == "Number":
            text = value.string_value or ""
            number = _number_to_header(text)
            header = text if number is None else number
            natural = "String" if number is None else "Number"
        else:
            header = value.string_value or ""
            natural = "String"
        headers[name] = header
        if dtype != natural:
            odd_types.append(f"{name}={dtype}")
    if odd_types:
        headers[TYPES_HEADER] = ";".join(odd_types)
    if trace_header is not None:
        headers[TRACE_HEADER] = trace_header
    return headers


def headers_to_attributes(headers: Mapping[str, Any]) -> dict[str, MessageAttributeValue]:
    """conveyor headers -> SQS message attributes (the inverse of the above)."""
    types: dict[str, str] = {}
    raw_types = headers.get(TYPES_HEADER)
    if isinstance(raw_types, str) and raw_types:
        for item in raw_types.split(";"):
            key, _, label = item.partition("=")
            types[key] = label
    out: dict[str, MessageAttributeValue] = {}
    for name, value in headers.items():
        if not _valid_name(name):
            continue
        dtype: str | None = types.get(name)
        text: str
        natural: str
        if isinstance(value, bytes | bytearray | memoryview):
            out[name] = MessageAttributeValue(
                data_type=dtype or "Binary", binary_value=bytes(value)
            )
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
            natural = "String"
        elif isinstance(value, int):
            text, natural = str(value), "Number"
        elif isinstance(value, float):
            text, natural = repr(value), "Number"
        elif isinstance(value, str):
            text, natural = value, "String"
        elif value is None:
            continue
        else:
            text, natural = str(value), "String"
        if not text:
            continue  # SQS has no empty attribute values
        out[name] = MessageAttributeValue(data_type=dtype or natural, string_value=text)
    return out


def _valid_name(name: str) -> bool:
    try:
        check_attribute_name(name)
    except SqsError:
        return False
    return True


def select_attributes(
    attributes: dict[str, MessageAttributeValue], wanted: Iterable[str]
) -> dict[str, MessageAttributeValue]:
    """Filter by ReceiveMessage's MessageAttributeNames (``All``, ``.*``, ``prefix.*``)."""
    names = list(wanted)
    if not names:
        return {}
    if "All" in names or ".*" in names:
        return attributes
    prefixes = [n[:-1] for n in names if n.endswith(".*")]
    exact = set(names)
    return {
        k: v for k, v in attributes.items() if k in exact or any(k.startswith(p) for p in prefixes)
    }
