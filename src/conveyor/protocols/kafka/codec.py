"""Framing, the advertised API versions, request decoding and response encoding.

Every request is ``int32 size`` + header + body. Only non-flexible versions are
advertised, so request headers are v1 and response headers v0; an ApiVersions
request at v3+ (flexible) is answered with UNSUPPORTED_VERSION in the v0 format, and
the client retries at a version from the list it carries.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from kafka.protocol.admin import (
    CreateTopicsRequest,
    CreateTopicsResponse,
    DeleteGroupsRequest,
    DeleteGroupsResponse,
    DeleteTopicsRequest,
    DeleteTopicsResponse,
    DescribeGroupsRequest,
    DescribeGroupsResponse,
    ListGroupsRequest,
    ListGroupsResponse,
)
from kafka.protocol.consumer import (
    FetchRequest,
    FetchResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    JoinGroupRequest,
    JoinGroupResponse,
    LeaveGroupRequest,
    LeaveGroupResponse,
    ListOffsetsRequest,
    ListOffsetsResponse,
    OffsetCommitRequest,
    OffsetCommitResponse,
    OffsetFetchRequest,
    OffsetFetchResponse,
    SyncGroupRequest,
    SyncGroupResponse,
)
from kafka.protocol.metadata import (
    ApiVersionsRequest,
    ApiVersionsResponse,
    FindCoordinatorRequest,
    FindCoordinatorResponse,
    MetadataRequest,
    MetadataResponse,
)
from kafka.protocol.producer import (
    InitProducerIdRequest,
    InitProducerIdResponse,
    ProduceRequest,
    ProduceResponse,
)

from conveyor.protocols.kafka.errors import UNSUPPORTED_VERSION

#: Largest request accepted (Kafka's socket.request.max.bytes).
MAX_FRAME = 100 * 1024 * 1024

#: api key -> (request class, response class, min version, max version).
API_VERSIONS: dict[int, tuple[Any, Any, int, int]] = {
    0: (ProduceRequest, ProduceResponse, 3, 8),
    1: (FetchRequest, FetchResponse, 4, 11),
    2: (ListOffsetsRequest, ListOffsetsResponse, 1, 5),
    3: (MetadataRequest, MetadataResponse, 1, 8),
    8: (OffsetCommitRequest, OffsetCommitResponse, 2, 7),
    9: (OffsetFetchRequest, OffsetFetchResponse, 1, 5),
    10: (FindCoordinatorRequest, FindCoordinatorResponse, 0, 2),
    11: (JoinGroupRequest, JoinGroupResponse, 0, 5),
    12: (HeartbeatRequest, HeartbeatResponse, 0, 3),
    13: (LeaveGroupRequest, LeaveGroupResponse, 0, 3),
    14: (SyncGroupRequest, SyncGroupResponse, 0, 3),
    15: (DescribeGroupsRequest, DescribeGroupsResponse, 0, 4),
    16: (ListGroupsRequest, ListGroupsResponse, 0, 2),
    18: (ApiVersionsRequest, ApiVersionsResponse, 0, 2),
    19: (CreateTopicsRequest, CreateTopicsResponse, 2, 4),
    20: (DeleteTopicsRequest, DeleteTopicsResponse, 1, 3),
    22: (InitProducerIdRequest, InitProducerIdResponse, 0, 1),
    42: (DeleteGroupsRequest, DeleteGroupsResponse, 0, 1),
}

_HEAD = struct.Struct(">hhi")
_SIZE = struct.Struct(">i")


class FrameTooLarge(Exception):
    pass


class UnsupportedRequest(Exception):
    """An API key or version conveyor does not serve."""

    def __init__(self, api_key: int, api_version: int, correlation_id: int) -> None:
        super().__init__(f"unsupported request: api key {api_key} version {api_version}")
        self.api_key = api_key
        self.api_version = api_version
        self.correlation_id = correlation_id


@dataclass(slots=True)
class Request:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    body: Any


class FrameReader:
    """Split a byte stream into request frames (without their size prefix)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (size,) = _SIZE.unpack_from(buf, pos)
            if size < 0 or size > MAX_FRAME:
                raise FrameTooLarge(f"request of {size} bytes")
            if n - pos - 4 < size:
                break
            frames.append(bytes(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return frames


def decode_request(frame: bytes) -> Request:
    """Decode one frame. Raises UnsupportedRequest (the caller answers ApiVersions with
    ``api_versions_response(error=True)`` and closes the connection otherwise)."""
    if len(frame) < 8:
        raise ValueError("request header too short")
    api_key, api_version, correlation_id = _HEAD.unpack_from(frame)
    entry = API_VERSIONS.get(api_key)
    if entry is None or not entry[2] <= api_version <= entry[3]:
        raise UnsupportedRequest(api_key, api_version, correlation_id)
    req = entry[0].decode(frame, version=api_version, header=True)
    return Request(api_key, api_version, correlation_id, req.header.client_id, req)


def encode_response(req: Request, resp: Any) -> bytes:
    resp.API_VERSION = req.api_version
    resp.with_header(correlation_id=req.correlation_id)
    data: bytes = resp.encode(header=True, framed=True)
    return data


def api_versions_response(correlation_id: int, version: int, *, error: bool = False) -> bytes:
    """ApiVersions: the table above; with ``error``, UNSUPPORTED_VERSION in v0 format."""
    keys = [
        ApiVersionsResponse.ApiVersion(api_key=k, min_version=lo, max_version=hi)
        for k, (_, _, lo, hi) in sorted(API_VERSIONS.items())
    ]
    v = 0 if error else version
    resp = ApiVersionsResponse(
        error_code=UNSUPPORTED_VERSION if error else 0,
        api_keys=keys,
        throttle_time_ms=0,
        version=v,
    )
    resp.with_header(correlation_id=correlation_id)
    data: bytes = resp.encode(header=True, framed=True)
    return data


_I32 = struct.Struct(">i")
_FETCH_PART = struct.Struct(">ihqq")  # partition, error, high watermark, last stable
_Q = struct.Struct(">q")


def encode_fetch_response(
    correlation_id: int,
    version: int,
    topics: list[tuple[str, list[tuple[int, int, int, int, bytes]]]],
    *,
    throttle_time_ms: int = 0,
) -> bytes:
    """A framed FetchResponse (v4-v11) without building kafka-python objects: the fetch
    path's hot spot was encoding them (the profile in benchmarks/results/kafka.md).
    ``topics``: (name, [(partition, error code, high watermark, log start, records)]);
    no aborted transactions, no preferred replica, session id 0. The record bytes are
    copied once, into the joined frame."""
    if not 4 <= version <= 11:
        raise ValueError(f"FetchResponse v{version} is not encoded here")
    out: list[bytes] = [b"", _I32.pack(correlation_id), _I32.pack(throttle_time_ms)]
    if version >= 7:
        out.append(struct.pack(">hi", 0, 0))  # error code, session id
    out.append(_I32.pack(len(topics)))
    for name, parts in topics:
        raw = name.encode()
        out.append(struct.pack(">h", len(raw)) + raw + _I32.pack(len(parts)))
        for index, code, hw, start, records in parts:
            head = _FETCH_PART.pack(index, code, hw, hw)
            if version >= 5:
                head += _Q.pack(start)
            head += _I32.pack(-1)  # aborted transactions: null
            if version >= 11:
                head += _I32.pack(-1)  # preferred read replica
            out.append(head + _I32.pack(len(records)))
            out.append(records)
    size = sum(len(b) for b in out)
    out[0] = _I32.pack(size)
    return b"".join(out)
