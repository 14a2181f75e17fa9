"""Native HTTP routes for streams, added to the HTTP app next to the queue API.

    GET    /v1/streams                                   list topics
    PUT    /v1/streams/{topic}        {"partitions", "config"}  create (200 if it exists)
    GET    /v1/streams/{topic}                           partitions with their offsets
    DELETE /v1/streams/{topic}
    POST   /v1/streams/{topic}/records  {"records": [{"value", "key", "headers",
                                        "partition", "timestamp"}]}  -> offsets
    GET    /v1/streams/{topic}/partitions/{p}/records?offset=&max_records=&wait=
    GET    /v1/streams/{topic}/partitions/{p}/offset?timestamp=   offset for a time (ms)
    POST   /v1/streams/{topic}/fetch   {"positions": {"<p>": offset}, "max_records", "wait",
                                        "group", "member_id", "generation"}
    GET    /v1/streams/{topic}/groups/{group}/offsets
    POST   /v1/streams/{topic}/groups/{group}/offsets    {"offsets": {"<p>": offset},
                                                          "member_id", "generation"}
    POST   /v1/streams/{topic}/groups/{group}/join   {"member_id", "session_timeout",
                                                      "from_start"}
    POST   /v1/streams/{topic}/groups/{group}/leave  {"member_id"}

Bridges (conveyor.streams.bridges), when the server passes its queue engine:

    GET    /v1/bridges                                   every bridge
    GET    /v1/streams/{topic}/bridges                   this stream's bridges
    PUT    /v1/streams/{topic}/feeds/{queue}  {"key", "start"}   feed the stream to a queue
    DELETE /v1/streams/{topic}/feeds/{queue}
    POST   /v1/streams/{topic}/bind    {"exchange", "routing_key", "arguments"}
    POST   /v1/streams/{topic}/unbind  {"exchange", "routing_key", "arguments"}

``fetch`` is what remote consumers poll: records from the first listed partition that
has any (a position outside the log restarts at the log start), waiting up to
``wait`` s; with a member it also heartbeats and answers ``"rejoin": true`` when the
group rebalances.

Values, keys and header values are UTF-8 strings; with ``"encoding": "base64"`` in
the request (or ``?encoding=base64``) they are base64 instead.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from conveyor.errors import Conflict, InvalidArgument
from conveyor.protocols.http.codec import decode_headers, encode_headers
from conveyor.streams import GroupError, OffsetOutOfRange, StreamEngine, StreamRecord, streams_dir
from conveyor.streams.bridges import BridgeManager
from conveyor.streams.client import join_group
from conveyor.streams.groups import NONE
from conveyor.streams.records import partition_for

if TYPE_CHECKING:
    from conveyor.broker import Broker

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


def _float(request: web.Request, name: str, default: float) -> float:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise InvalidArgument(f"{name} must be a number") from None


def _num(b: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = b.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise InvalidArgument(f"{name} must be a number")
    return max(lo, min(float(v), hi))


def _str(b: dict[str, Any], name: str, default: str = "") -> str:
    v = b.get(name, default)
    if not isinstance(v, str):
        raise InvalidArgument(f"{name} must be a string")
    return v


def add_stream_routes(
    app: web.Application, streams: StreamEngine, broker: Broker | None = None
) -> None:
    """The stream routes; with ``broker``, also the bridges, which then run in this
    server (started and stopped with the app)."""
    counter = [0]
    bridges = BridgeManager(streams, broker) if broker is not None else None
    if bridges is not None:
        bridge_manager = bridges

        async def start_bridges(_: web.Application) -> None:
            await bridge_manager.start()

        async def stop_bridges(_: web.Application) -> None:
            await bridge_manager.close()

        app.on_startup.append(start_bridges)
        app.on_cleanup.append(stop_bridges)

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

    def partition(request: web.Request) -> int:
        try:
            return int(request.match_info["partition"])
        except ValueError:
            raise InvalidArgument("partition must be an integer") from None

    async def read(request: web.Request) -> web.Response:
        name = request.match_info["topic"]
        part = partition(request)
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
        if "member_id" in b:  # a group member's commit: its generation must be current
            member = _str(b, "member_id")
            generation = int(_num(b, "generation", -1, -1, 2**31))
            code = streams.groups.check_commit(group, generation, member)
            if code != NONE:
                raise Conflict(f"commit refused (Kafka error {code}): the group rebalanced")
        await streams.commit(group, {(name, int(p)): (int(o), None) for p, o in offsets.items()})
        return _json({"ok": True})

    async def offset_for_time(request: web.Request) -> web.Response:
        name = request.match_info["topic"]
        ts = _int(request, "timestamp", -1)
        found = streams.offset_for_time(name, partition(request), ts)
        if found is None:
            return _json({"offset": None, "timestamp": None})
        return _json({"offset": found[0], "timestamp": found[1]})

    async def fetch(request: web.Request) -> web.Response:
        name = request.match_info["topic"]
        b = await body(request)
        b64 = b.get("encoding") == "base64"
        raw = b.get("positions")
        if not isinstance(raw, dict):
            raise InvalidArgument('positions must be an object {"<partition>": offset}')
        try:
            positions = [(int(p), int(o)) for p, o in raw.items()]
        except (TypeError, ValueError):
            raise InvalidArgument("partitions and offsets must be integers") from None
        max_records = int(_num(b, "max_records", 100, 1, 10000))
        wait = _num(b, "wait", 0.0, 0.0, 60.0)
        group = _str(b, "group")
        member = _str(b, "member_id")
        generation = int(_num(b, "generation", -1, -1, 2**31))
        deadline = time.monotonic() + wait
        streams.get_topic(name)
        while True:
            if member and streams.groups.heartbeat(group, generation, member) != NONE:
                return _json({"records": [], "rejoin": True})
            for p, off in positions:
                try:
                    data = streams.read(name, p, off, 1 << 20)
                except OffsetOutOfRange:
                    off = streams.offsets(name, p).log_start
                    data = streams.read(name, p, off, 1 << 20)
                recs = streams.decode(name, p, data, off)[:max_records]
                if recs:
                    return _json({"records": [record_json(r, b64) for r in recs], "rejoin": False})
            left = deadline - time.monotonic()
            if left <= 0:
                return _json({"records": [], "rejoin": False})
            await streams.wait([(name, p) for p, _ in positions], min(left, 1.0))

    async def join(request: web.Request) -> web.Response:
        name = request.match_info["topic"]
        group = request.match_info["group"]
        b = await body(request)
        streams.get_topic(name)
        try:
            joined = await join_group(
                streams,
                name,
                group,
                _str(b, "member_id"),
                session_timeout=_num(b, "session_timeout", 10.0, 0.1, 3600.0),
                from_start=bool(b.get("from_start", True)),
                client_id="conveyor-http",
                client_host=request.remote or "",
            )
        except GroupError as exc:
            raise Conflict(f"{exc} (Kafka error {exc.kafka_code})") from None
        return _json(
            {
                "member_id": joined.member_id,
                "generation": joined.generation,
                "assignment": joined.assignment,
                "positions": {str(p): o for p, o in joined.positions.items()},
            }
        )

    async def leave(request: web.Request) -> web.Response:
        b = await body(request)
        member = _str(b, "member_id")
        if member:
            streams.groups.leave(request.match_info["group"], [member])
        return _json({"ok": True})

    r = app.router
    r.add_get("/v1/streams/{topic}/partitions/{partition}/offset", offset_for_time)
    r.add_post("/v1/streams/{topic}/fetch", fetch)
    r.add_post("/v1/streams/{topic}/groups/{group}/join", join)
    r.add_post("/v1/streams/{topic}/groups/{group}/leave", leave)
    if bridges is not None:
        _add_bridge_routes(app, bridges, body)
    r.add_get("/v1/streams", list_topics)
    r.add_put("/v1/streams/{topic}", create)
    r.add_get("/v1/streams/{topic}", get)
    r.add_delete("/v1/streams/{topic}", delete)
    r.add_post("/v1/streams/{topic}/records", produce)
    r.add_get("/v1/streams/{topic}/partitions/{partition}/records", read)
    r.add_get("/v1/streams/{topic}/groups/{group}/offsets", group_offsets)
    r.add_post("/v1/streams/{topic}/groups/{group}/offsets", commit)


def _add_bridge_routes(app: web.Application, bridges: BridgeManager, body: Any) -> None:
    async def list_all(request: web.Request) -> web.Response:
        return _json({"bridges": await bridges.list_bridges()})

    async def list_stream(request: web.Request) -> web.Response:
        name = request.match_info["topic"]
        bridges.streams.get_topic(name)
        return _json({"bridges": await bridges.list_bridges(name)})

    async def feed(request: web.Request) -> web.Response:
        b = await body(request)
        name, queue = request.match_info["topic"], request.match_info["queue"]
        f = await bridges.feed(
            name, queue, key=_str(b, "key", "header"), start=_str(b, "start", "start")
        )
        return _json({"kind": "feed", "stream": f.stream, "queue": f.queue, "key": f.key,
                      "start": f.start, "lag": bridges.lag(f)})  # fmt: skip

    async def unfeed(request: web.Request) -> web.Response:
        await bridges.unfeed(request.match_info["topic"], request.match_info["queue"])
        return _json({"ok": True})

    async def binding(request: web.Request) -> tuple[str, str, str, dict[str, Any]]:
        b = await body(request)
        args = b.get("arguments") or {}
        if not isinstance(args, dict):
            raise InvalidArgument("arguments must be an object")
        exchange = _str(b, "exchange")
        if not exchange:
            raise InvalidArgument("exchange is required")
        return exchange, request.match_info["topic"], _str(b, "routing_key"), decode_headers(args)

    async def bind(request: web.Request) -> web.Response:
        exchange, name, key, args = await binding(request)
        sb = await bridges.bind(exchange, name, key, args or None)
        return _json({"kind": "bind", "stream": sb.stream, "exchange": sb.exchange,
                      "routing_key": sb.routing_key,
                      "arguments": encode_headers(sb.arguments)})  # fmt: skip

    async def unbind(request: web.Request) -> web.Response:
        exchange, name, key, args = await binding(request)
        await bridges.unbind(exchange, name, key, args or None)
        return _json({"ok": True})

    r = app.router
    r.add_get("/v1/bridges", list_all)
    r.add_get("/v1/streams/{topic}/bridges", list_stream)
    r.add_put("/v1/streams/{topic}/feeds/{queue}", feed)
    r.add_delete("/v1/streams/{topic}/feeds/{queue}", unfeed)
    r.add_post("/v1/streams/{topic}/bind", bind)
    r.add_post("/v1/streams/{topic}/unbind", unbind)
