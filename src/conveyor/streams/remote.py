"""Streams over a server's native HTTP API: what ``conveyor.connect("http://...")
.stream(name)`` returns. The methods are the embedded client's (AsyncStream,
AsyncStreamConsumer in conveyor.streams.client); each is one HTTP call to the
``/v1/streams`` routes (server/streams_http.py), made through the connection's
RemoteBroker (its aiohttp session, retries and error mapping). Keys, values and
header values travel base64-encoded, so any bytes round-trip.

A remote consumer joins its group through the server (same ``conveyor`` protocol
type as embedded consumers, so both can share a group), polls with the ``fetch``
route (which also heartbeats) and commits with its generation checked.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

import msgspec

from conveyor import errors
from conveyor.client.remote import LONG_POLL_MARGIN, RemoteBroker, _Call
from conveyor.streams.engine import PartitionOffsets, StreamRecord
from conveyor.streams.errors import GroupError
from conveyor.streams.groups import REBALANCE_IN_PROGRESS
from conveyor.streams.member import GroupMember

Value = bytes | str

_dec = msgspec.json.Decoder()
_enc = msgspec.json.Encoder()


def _json(data: bytes) -> Any:
    return _dec.decode(data) if data else None


def _t(name: str) -> str:
    return "/v1/streams/" + quote(name, safe="")


def _b64(v: Value | None) -> str | None:
    if v is None:
        return None
    return base64.b64encode(v.encode() if isinstance(v, str) else v).decode()


def _unb64(v: str | None) -> bytes | None:
    return None if v is None else base64.b64decode(v)


def _record(topic: str, r: dict[str, Any]) -> StreamRecord:
    return StreamRecord(
        topic,
        int(r["partition"]),
        int(r["offset"]),
        int(r["timestamp"]),
        _unb64(r["key"]),
        _unb64(r["value"]),
        [(str(k), _unb64(v)) for k, v in r["headers"]],
    )


def _queue_name(queue: Any) -> str:
    return queue if isinstance(queue, str) else str(queue.name)


class RemoteStreams:
    """The stream and bridge calls of one remote connection."""

    def __init__(self, broker: RemoteBroker) -> None:
        self.broker = broker

    async def close(self) -> None:
        return None  # the session is the RemoteBroker's

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        idempotent: bool = False,
        timeout: float | None = None,
    ) -> Any:
        data = None if body is None else _enc.encode(body)
        return await self.broker._run(
            _Call(method, path, _json, data, params, idempotent=idempotent, timeout=timeout)
        )

    async def open_stream(
        self, name: str, partitions: int | None = None, config: dict[str, Any] | None = None
    ) -> RemoteStream:
        body: dict[str, Any] = {}
        if partitions is not None:
            body["partitions"] = partitions
        if config:
            body["config"] = config
        got = await self.call("PUT", _t(name), body, idempotent=True)
        return RemoteStream(self, name, len(got["partitions"]))

    # -- bridges (the BridgeApi of conveyor.streams.client) ------------------------------
    async def feed(
        self, stream: str, queue: str, *, key: str = "header", start: str = "start"
    ) -> dict[str, Any]:
        path = _t(stream) + "/feeds/" + quote(queue, safe="")
        result: dict[str, Any] = await self.call(
            "PUT", path, {"key": key, "start": start}, idempotent=True
        )
        return result

    async def unfeed(self, stream: str, queue: str) -> None:
        await self.call("DELETE", _t(stream) + "/feeds/" + quote(queue, safe=""))

    async def bind(
        self,
        exchange: str,
        stream: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = _binding(exchange, routing_key, arguments)
        result: dict[str, Any] = await self.call(
            "POST", _t(stream) + "/bind", body, idempotent=True
        )
        return result

    async def unbind(
        self,
        exchange: str,
        stream: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        body = _binding(exchange, routing_key, arguments)
        await self.call("POST", _t(stream) + "/unbind", body, idempotent=True)

    async def list_bridges(self, stream: str | None = None) -> list[dict[str, Any]]:
        path = "/v1/bridges" if stream is None else _t(stream) + "/bridges"
        got = await self.call("GET", path, idempotent=True)
        return list(got["bridges"])


def _binding(exchange: str, routing_key: str, arguments: dict[str, Any] | None) -> dict[str, Any]:
    """The body of the bind and unbind routes."""
    from conveyor.protocols.http.codec import encode_headers

    return {
        "exchange": exchange,
        "routing_key": routing_key,
        "arguments": encode_headers(arguments or {}),
    }


class RemoteStream:
    """AsyncStream's methods over HTTP."""

    def __init__(self, api: RemoteStreams, name: str, partitions: int) -> None:
        self.api = api
        self.name = name
        self._partitions = partitions

    def __repr__(self) -> str:
        return f"<RemoteStream {self.name!r}>"

    @property
    def partitions(self) -> int:
        """The partition count (topics never change it, so it is read at open)."""
        return self._partitions

    async def produce(
        self,
        value: Value | None,
        *,
        key: Value | None = None,
        headers: Mapping[str, Value] | Iterable[tuple[str, Value]] | None = None,
        partition: int | None = None,
        timestamp: int | None = None,
    ) -> tuple[int, int]:
        """Append one record; returns (partition, offset) once it is durable."""
        item = {
            "value": value,
            "key": key,
            "headers": headers,
            "partition": partition,
            "timestamp": timestamp,
        }
        return (await self.produce_batch([item]))[0]

    async def produce_batch(self, items: Iterable[Mapping[str, Any]]) -> list[tuple[int, int]]:
        records = []
        for item in items:
            hdrs = item.get("headers") or ()
            pairs = hdrs.items() if isinstance(hdrs, Mapping) else hdrs
            rec: dict[str, Any] = {
                "value": _b64(item.get("value")),
                "key": _b64(item.get("key")),
                "headers": [[str(k), _b64(v) or ""] for k, v in pairs],
            }
            if item.get("partition") is not None:
                rec["partition"] = int(item["partition"])
            if item.get("timestamp") is not None:
                rec["timestamp"] = int(item["timestamp"])
            records.append(rec)
        if not records:
            return []
        got = await self.api.call(
            "POST", _t(self.name) + "/records", {"records": records, "encoding": "base64"}
        )
        return [(int(o["partition"]), int(o["offset"])) for o in got["offsets"]]

    async def read(
        self,
        offset: int = 0,
        *,
        partition: int = 0,
        max_records: int = 100,
        wait: float = 0.0,
    ) -> list[StreamRecord]:
        """Records from ``offset`` on; waits up to ``wait`` seconds for the first one."""
        params = {
            "offset": str(offset),
            "max_records": str(max_records),
            "wait": str(wait),
            "encoding": "base64",
        }
        got = await self.api.call(
            "GET",
            f"{_t(self.name)}/partitions/{partition}/records",
            params=params,
            idempotent=True,
            timeout=wait + LONG_POLL_MARGIN if wait > 0 else None,
        )
        return [_record(self.name, r) for r in got["records"]]

    async def offsets(self, partition: int = 0) -> PartitionOffsets:
        got = await self.api.call("GET", _t(self.name), idempotent=True)
        for p in got["partitions"]:
            if p["partition"] == partition:
                return PartitionOffsets(int(p["log_start"]), int(p["high_watermark"]))
        from conveyor.streams.errors import PartitionNotFound

        raise PartitionNotFound(f"topic {self.name!r} has no partition {partition}")

    async def offset_for_time(self, timestamp_ms: int, partition: int = 0) -> int | None:
        got = await self.api.call(
            "GET",
            f"{_t(self.name)}/partitions/{partition}/offset",
            params={"timestamp": str(int(timestamp_ms))},
            idempotent=True,
        )
        off = got["offset"]
        return None if off is None else int(off)

    def consumer(
        self, group: str, *, from_start: bool = True, session_timeout: float = 10.0
    ) -> RemoteStreamConsumer:
        return RemoteStreamConsumer(self, group, from_start, session_timeout)

    async def delete(self) -> None:
        await self.api.call("DELETE", _t(self.name))

    async def feed(self, queue: Any, *, key: str = "header", start: str = "start") -> None:
        """See AsyncStream.feed (the bridge runs in the server)."""
        await self.api.feed(self.name, _queue_name(queue), key=key, start=start)

    async def unfeed(self, queue: Any) -> None:
        await self.api.unfeed(self.name, _queue_name(queue))

    async def bridges(self) -> list[dict[str, Any]]:
        return await self.api.list_bridges(self.name)


class RemoteStreamConsumer(GroupMember):
    """AsyncStreamConsumer's methods over HTTP."""

    stream: RemoteStream

    def _path(self, op: str) -> str:
        return f"{_t(self.stream.name)}/groups/{quote(self.group, safe='')}/{op}"

    async def join(self) -> None:
        body = {
            "member_id": self.member_id,
            "session_timeout": self.session_timeout,
            "from_start": self.from_start,
        }
        try:
            got = await self.stream.api.call(
                "POST", self._path("join"), body, timeout=self.session_timeout + LONG_POLL_MARGIN
            )
        except errors.Conflict as exc:
            self.member_id = ""
            raise GroupError(REBALANCE_IN_PROGRESS, str(exc)) from None
        self.member_id = got["member_id"]
        self.generation = int(got["generation"])
        self.assignment = [int(p) for p in got["assignment"]]
        self.positions = {int(p): int(o) for p, o in got["positions"].items()}

    async def poll(self, max_records: int = 100, wait: float = 1.0) -> list[StreamRecord]:
        """Records from the assigned partitions (round robin), waiting up to ``wait``."""
        if not self.member_id:
            await self.join()
        while True:
            parts = list(self.assignment)
            order = [parts[(self._next + k) % len(parts)] for k in range(len(parts))]
            body = {
                "positions": {str(p): self.positions[p] for p in order},
                "max_records": max_records,
                "wait": wait,
                "encoding": "base64",
                "group": self.group,
                "member_id": self.member_id,
                "generation": self.generation,
            }
            got = await self.stream.api.call(
                "POST",
                _t(self.stream.name) + "/fetch",
                body,
                idempotent=True,
                timeout=wait + LONG_POLL_MARGIN,
            )
            if got["rejoin"]:
                await self.join()
                continue
            recs = [_record(self.stream.name, r) for r in got["records"]]
            if recs:
                p = recs[0].partition
                self.positions[p] = recs[-1].offset + 1
                if p in parts:
                    self._next = (parts.index(p) + 1) % len(parts)
            return recs

    async def commit(self) -> None:
        body = {
            "offsets": {str(p): o for p, o in self.positions.items()},
            "member_id": self.member_id,
            "generation": self.generation,
        }
        try:
            await self.stream.api.call("POST", self._path("offsets"), body, idempotent=True)
        except errors.Conflict as exc:
            raise GroupError(REBALANCE_IN_PROGRESS, str(exc)) from None

    async def close(self) -> None:
        if self.member_id:
            member, self.member_id = self.member_id, ""
            await self.stream.api.call("POST", self._path("leave"), {"member_id": member})
