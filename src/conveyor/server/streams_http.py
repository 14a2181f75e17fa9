"""Native HTTP routes for streams, added to the HTTP app next to the queue API.

    GET    /v1/streams                                   list topics
    PUT    /v1/streams/{topic}        {"partitions", "config"}  create (200 if it exists)
    GET    /v1/streams/{topic}                           partitions with their offsets
    DELETE /v1/streams/{topic}
    POST   /v1/streams/{topic}/records  {"records": [{"value", "key", "headers",
                                        "partition", "timestamp"}]}  -> offsets
    GET    /v1/streams/{topic}/partitions/{p}/records?offset=&max_records=&wait=
    GET    /v1/streams/{topic}/groups/{group}/offsets
    POST   /v1/streams/{topic}/groups/{group}/offsets    {"offsets": {"<p>": offset}}

Values, keys and header values are UTF-8 strings; with ``"encoding": "base64"`` in
the request (or ``?encoding=base64``) they are base64 instead.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

import msgspec
from aiohttp import web

from conveyor.errors import InvalidArgument
from conveyor.streams import StreamEngine, StreamRecord, streams_dir
from conveyor.streams.records import partition_for

log = logging.getLogger("conveyor.server")

JSON = "application/json"
_enc = msgspec.json.Encoder().encode


async def open_streams(data: str, durability: str) -> StreamEngine | None:
    """The stream engine for a server's ``--data`` (None, logged, when the store is not
    local: streams need a data directory)."""
    try:
        directory = streams_dir(data)
    except InvalidArgument as exc:
        log.warning("streams (and the Kafka listener) are off: %s", exc)
        return None
    return await StreamEngine.open(directory, durability)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_enc(obj), content_type=JSON)


def _b(value: Any, b64: bool) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument("keys, values and header values must be strings")
    if b64:
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise InvalidArgument("invalid base64") from None
    return value.encode()


def _s(value: bytes | None, b64: bool) -> str | None:
    if value is None:
        return None
    if b64:
        return base64.b64encode(value).decode()
    return value.decode("utf-8", "replace")


def record_json(r: StreamRecord, b64: bool) -> dict[str, Any]:
    return {
        "partition": r.partition,
        "offset": r.offset,
        "timestamp": r.timestamp,
        "key": _s(r.key, b64),
        "value": _s(r.value, b64),
        "headers": [[k, _s(v, b64)] for k, v in r.headers],
    }


def _int(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgument(f"{name} must be an integer") from None


def add_stream_routes(app: web.Application, streams: StreamEngine) -> None:
    counter = [0]

    async def body(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw:
            return {}
        try:
            obj = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise InvalidArgument(f"invalid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise InvalidArgument("the body must be a JSON object")
        return obj

    def topic_json(name: str) -> dict[str, Any]:
        info = streams.get_topic(name)
        parts = []
        for p in range(info.partitions):
            off = streams.offsets(name, p)
            parts.append(
                {"partition": p, "log_start": off.log_start, "high_watermark": off.high_watermark}
            )
        cfg = info.config
        return {
            "name": name,
            "partitions": parts,
            "config": {
                "retention.ms": cfg.retention_ms,
                "retention.bytes": cfg.retention_bytes,
                "segment.bytes": cfg.segment_bytes,
                "segment.ms": cfg.segment_ms,
            },
        }

    async def list_topics(request: web.Request) -> web.Response:
        return _json({"streams": [topic_json(t.name) for t in streams.list_topics()]})

    async def create(request: web.Request) -> web.Response:
        b = await body(request)
        name = request.match_info["topic"]
        existed = name in streams.topics
        await streams.create_topic(name, b.get("partitions"), b.get("config"), exist_ok=True)
        return _json(topic_json(name), 200 if existed else 201)

    async def get(request: web.Request) -> web.Response:
        return _json(topic_json(request.match_info["topic"]))

    async def delete(request: web.Request) -> web.Response:
        await streams.delete_topic(request.match_info["topic"])
        return _json({"ok": True})

    async def produce(request: web.Request) -> web.Response:
        b = await body(request)
        name = request.match_info["topic"]
        b64 = b.get("encoding") == "base64"
        records = b.get("records")
        if not isinstance(records, list) or not records:
            raise InvalidArgument("records must be a non-empty list")
        n = streams.get_topic(name).partitions
        groups: dict[int, list[tuple[int, Any]]] = {}
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                raise InvalidArgument("each record must be an object")
            key = _b(r.get("key"), b64)
            part = r.get("partition")
            if part is None:
                part = partition_for(key, n, counter[0])
                counter[0] += 1
            headers = [(str(k), _b(v, b64) or b"") for k, v in (r.get("headers") or [])]
            ts = r.get("timestamp")
            groups.setdefault(int(part), []).append(
                (i, (key, _b(r.get("value"), b64), headers, None if ts is None else int(ts)))
            )
        out: list[dict[str, int]] = [{} for _ in records]
        for part, items in groups.items():
            first = await streams.produce(name, [rec for _, rec in items], part)
            for j, (i, _) in enumerate(items):
                out[i] = {"partition": part, "offset": first + j}
        return _json({"offsets": out})

    async def read(request: web.Request) -> web.Response:
        name = request.match_info["topic"]
        try:
            part = int(request.match_info["partition"])
        except ValueError:
            raise InvalidArgument("partition must be an integer") from None
        b64 = request.query.get("encoding") == "base64"
        offset = _int(request, "offset", 0)
        max_records = max(1, min(_int(request, "max_records", 100), 10000))
        wait = min(float(request.query.get("wait", "0") or 0), 60.0)
        deadline = time.monotonic() + wait
        while True:
            data = streams.read(name, part, offset, 1 << 20)
            recs = streams.decode(name, part, data, offset)[:max_records]
            left = deadline - time.monotonic()
            if recs or left <= 0:
                break
            await streams.wait([(name, part)], left)
        off = streams.offsets(name, part)
        nxt = recs[-1].offset + 1 if recs else offset
        return _json(
            {
                "records": [record_json(r, b64) for r in recs],
                "next_offset": nxt,
                "high_watermark": off.high_watermark,
            }
        )

    async def group_offsets(request: web.Request) -> web.Response:
        name = request.match_info["topic"]
        group = request.match_info["group"]
        n = streams.get_topic(name).partitions
        out = {}
        for p in range(n):
            got = streams.committed(group, name, p)
            out[str(p)] = None if got is None else got[0]
        return _json({"group": group, "offsets": out})

    async def commit(request: web.Request) -> web.Response:
        name = request.match_info["topic"]
        group = request.match_info["group"]
        b = await body(request)
        offsets = b.get("offsets")
        if not isinstance(offsets, dict):
            raise InvalidArgument('offsets must be an object {"<partition>": offset}')
        streams.get_topic(name)
        await streams.commit(group, {(name, int(p)): (int(o), None) for p, o in offsets.items()})
        return _json({"ok": True})

    r = app.router
    r.add_get("/v1/streams", list_topics)
    r.add_put("/v1/streams/{topic}", create)
    r.add_get("/v1/streams/{topic}", get)
    r.add_delete("/v1/streams/{topic}", delete)
    r.add_post("/v1/streams/{topic}/records", produce)
    r.add_get("/v1/streams/{topic}/partitions/{partition}/records", read)
    r.add_get("/v1/streams/{topic}/groups/{group}/offsets", group_offsets)
    r.add_post("/v1/streams/{topic}/groups/{group}/offsets", commit)
