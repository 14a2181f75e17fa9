"""The Kafka listener: sockets <-> :mod:`conveyor.protocols.kafka` <-> StreamEngine calls.

One asyncio.Protocol per connection. Each request becomes a task, started in arrival
order; responses are written in request order (Kafka's per-connection ordering), so
a producer's pipelined requests share group commits while their answers stay in
order. Produce assigns offsets before its first await, so batches keep the order in
which they arrived. Semantics (offsets, durability, idempotence, groups, retention)
are the engine's; this module only translates.

The broker is a single node (node id 0) that leads every partition; it advertises the
address the client connected to (or ``advertised_host``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from kafka.protocol.admin import (
    CreateTopicsResponse,
    DeleteGroupsResponse,
    DeleteTopicsResponse,
    DescribeGroupsResponse,
    ListGroupsResponse,
)
from kafka.protocol.consumer import (
    HeartbeatResponse,
    JoinGroupResponse,
    LeaveGroupResponse,
    ListOffsetsResponse,
    OffsetCommitResponse,
    OffsetFetchResponse,
    SyncGroupResponse,
)
from kafka.protocol.metadata import FindCoordinatorResponse, MetadataResponse
from kafka.protocol.producer import InitProducerIdResponse, ProduceResponse

from conveyor import errors
from conveyor.protocols.kafka import errors as kerr
from conveyor.protocols.kafka.codec import (
    FrameReader,
    FrameTooLarge,
    Request,
    UnsupportedRequest,
    api_versions_response,
    decode_request,
    encode_fetch_response,
    encode_response,
)
from conveyor.streams import (
    CorruptRecords,
    OffsetOutOfRange,
    PartitionNotFound,
    ProducerFenced,
    StreamEngine,
    TopicExists,
    TopicNotFound,
)

log = logging.getLogger("conveyor.server.kafka")

NODE_ID = 0
CLUSTER_ID = "conveyor"
#: Pause reading from a connection with this many requests in progress.
MAX_PENDING = 256

Handler = Callable[["KafkaServer", "_Conn", Request], Awaitable[Any]]
_HANDLERS: dict[int, Handler] = {}


def _handles(api_key: int) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        _HANDLERS[api_key] = fn
        return fn

    return deco


class _Conn(asyncio.Protocol):
    def __init__(self, server: KafkaServer) -> None:
        self.server = server
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Task[bytes | None]] = deque()
        self.host = "127.0.0.1"
        self.port = 0
        self.peer = ""
        self.paused = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local = transport.get_extra_info("sockname")
        if local:
            self.host, self.port = str(local[0]), int(local[1])
        if self.server.advertised_host:
            self.host = self.server.advertised_host
        if self.server.advertised_port:
            self.port = self.server.advertised_port
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for t in self.pending:
            t.cancel()
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except FrameTooLarge as exc:
            log.warning("closing Kafka connection from %s: %s", self.peer, exc)
            self.close()
            return
        for frame in frames:
            if self.closed:
                return
            self._dispatch(frame)

    def _dispatch(self, frame: bytes) -> None:
        try:
            req = decode_request(frame)
        except UnsupportedRequest as exc:
            if exc.api_key == 18:  # ApiVersions: answer in v0 so the client can retry
                self._respond(api_versions_response(exc.correlation_id, 0, error=True))
                return
            log.warning("closing Kafka connection from %s: %s", self.peer, exc)
            self.close()
            return
        except Exception as exc:
            log.warning("closing Kafka connection from %s: bad request (%s)", self.peer, exc)
            self.close()
            return
        if req.api_key == 18:
            self._respond(api_versions_response(req.correlation_id, req.api_version))
            return
        handler = _HANDLERS[req.api_key]
        task = asyncio.get_running_loop().create_task(self._run(handler, req))
        if req.api_key == 0 and req.body.acks == 0:
            self.server.spawn(task)  # no response for acks=0
            return
        self.pending.append(task)
        task.add_done_callback(self._flush)
        if len(self.pending) >= MAX_PENDING and not self.paused and self.transport:
            self.paused = True
            self.transport.pause_reading()

    async def _run(self, handler: Handler, req: Request) -> bytes | None:
        resp = await handler(self.server, self, req)
        if resp is None or isinstance(resp, bytes):  # None: no answer; bytes: encoded
            return resp
        return encode_response(req, resp)

    def _respond(self, data: bytes) -> None:
        if self.pending:  # keep the order: wrap in a finished task
            fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
            fut.set_result(data)
            self.pending.append(fut)  # type: ignore[arg-type]
            return
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _flush(self, _: object = None) -> None:
        while self.pending and self.pending[0].done():
            t = self.pending.popleft()
            if t.cancelled():
                continue
            exc = t.exception()
            if exc is not None:
                log.error("Kafka request failed; closing the connection", exc_info=exc)
                self.close()
                return
            data = t.result()
            if data and self.transport is not None and not self.closed:
                self.transport.write(data)
        if self.paused and len(self.pending) < MAX_PENDING // 2 and self.transport:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class KafkaServer:
    """The Kafka listener over a StreamEngine."""

    def __init__(
        self,
        streams: StreamEngine,
        *,
        auto_create_topics: bool = True,
        advertised_host: str | None = None,
        advertised_port: int | None = None,
    ) -> None:
        self.streams = streams
        self.auto_create_topics = auto_create_topics
        self.advertised_host = advertised_host
        self.advertised_port = advertised_port
        self.connections: set[_Conn] = set()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, host: str, port: int, *, sock: socket.socket | None = None) -> int:
        """Listen on host:port (0 picks a free port), or on ``sock``; returns the port."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(lambda: _Conn(self), sock=sock)
        else:
            self._server = await loop.create_server(
                lambda: _Conn(self), host, port, reuse_address=True
            )
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def close(self) -> None:
        """Stop listening; let produces that are being made durable finish, then close
        every connection."""
        if self._server is not None:
            self._server.close()
        pending = [t for c in self.connections for t in c.pending]
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.pause_reading()
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        for c in list(self.connections):
            c.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def spawn(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def topic_exists(self, name: str, auto_create: bool) -> int:
        """Error code for a topic a client asks about (creating it if allowed)."""
        if name in self.streams.topics:
            return kerr.NONE
        if not auto_create:
            return kerr.UNKNOWN_TOPIC_OR_PARTITION
        try:
            await self.streams.ensure_topic(name)
        except errors.InvalidName:
            return kerr.INVALID_TOPIC_EXCEPTION
        except errors.ConveyorError:
            return kerr.UNKNOWN_TOPIC_OR_PARTITION
        return kerr.NONE


# -- produce / fetch ----------------------------------------------------------------------

_PR = ProduceResponse.TopicProduceResponse
_PP = _PR.PartitionProduceResponse


@_handles(0)
async def _produce(s: KafkaServer, c: _Conn, req: Request) -> Any:
    body = req.body
    results: list[tuple[str, list[list[int]]]] = []
    waits: list[tuple[list[int], Awaitable[None]]] = []
    for td in body.topic_data:
        parts: list[list[int]] = []
        for pd in td.partition_data:
            row = [pd.index, kerr.NONE, -1, -1]
            parts.append(row)
            if body.transactional_id is not None:
                row[1] = kerr.TRANSACTIONAL_ID_AUTHORIZATION_FAILED
                continue
            if body.acks not in (-1, 0, 1):
                row[1] = kerr.INVALID_REQUIRED_ACKS
                continue
            try:
                base, durable = s.streams.begin_append(td.name, pd.index, pd.records or b"")
            except (TopicNotFound, PartitionNotFound):
                row[1] = kerr.UNKNOWN_TOPIC_OR_PARTITION
            except CorruptRecords:
                row[1] = kerr.CORRUPT_MESSAGE
            except ProducerFenced as exc:
                row[1] = exc.kafka_code
            except errors.ClosedError:
                row[1] = kerr.NOT_LEADER_OR_FOLLOWER
            else:
                row[2] = base
                if durable is not None:
                    waits.append((row, durable))
        results.append((td.name, parts))
    for row, durable in waits:
        try:
            await durable
        except Exception:
            log.exception("making produced records durable failed")
            row[1] = kerr.UNKNOWN_SERVER_ERROR
            row[2] = -1
    if body.acks == 0:
        return None
    responses = []
    for name, parts in results:
        prs = []
        for index, code, base, _ in parts:
            start = -1
            if code == kerr.NONE:
                with contextlib.suppress(errors.ConveyorError):
                    start = s.streams.offsets(name, index).log_start
            prs.append(
                _PP(
                    index=index,
                    error_code=code,
                    base_offset=base,
                    log_append_time_ms=-1,
                    log_start_offset=start,
                    record_errors=[],
                    error_message=None,
                )
            )
        responses.append(_PR(name=name, partition_responses=prs))
    return ProduceResponse(responses=responses, throttle_time_ms=0)


_FetchTopics = list[tuple[str, list[tuple[int, int, int, int, bytes]]]]


def _fetch_once(s: KafkaServer, body: Any) -> tuple[_FetchTopics, int, bool]:
    budget = body.max_bytes if body.max_bytes > 0 else 0x7FFFFFFF
    total = 0
    failed = False
    out: _FetchTopics = []
    for t in body.topics:
        parts = []
        for p in t.partitions:
            code = kerr.NONE
            records = b""
            hw = start = -1
            try:
                off = s.streams.offsets(t.topic, p.partition)
                hw, start = off.high_watermark, off.log_start
                if budget > 0 or total == 0:
                    limit = min(p.partition_max_bytes, budget) if total else p.partition_max_bytes
                    records = s.streams.read(t.topic, p.partition, p.fetch_offset, max(limit, 1))
            except (TopicNotFound, PartitionNotFound):
                code = kerr.UNKNOWN_TOPIC_OR_PARTITION
                failed = True
            except OffsetOutOfRange:
                code = kerr.OFFSET_OUT_OF_RANGE
                failed = True
            total += len(records)
            budget -= len(records)
            parts.append((p.partition, code, hw, start, records))
        out.append((t.topic, parts))
    return out, total, failed


@_handles(1)
async def _fetch(s: KafkaServer, c: _Conn, req: Request) -> Any:
    body = req.body
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0, body.max_wait_ms) / 1000
    keys = [(t.topic, p.partition) for t in body.topics for p in t.partitions]
    while True:
        responses, total, failed = _fetch_once(s, body)
        remaining = deadline - loop.time()
        if failed or total >= body.min_bytes or remaining <= 0 or c.closed:
            break
        if s.streams.closed:
            break
        await s.streams.wait(keys, remaining)
    return encode_fetch_response(req.correlation_id, req.api_version, responses)


_LT = ListOffsetsResponse.ListOffsetsTopicResponse
_LP = _LT.ListOffsetsPartitionResponse


@_handles(2)
async def _list_offsets(s: KafkaServer, c: _Conn, req: Request) -> Any:
    topics = []
    for t in req.body.topics:
        parts = []
        for p in t.partitions:
            code, ts, offset = kerr.NONE, -1, -1
            try:
                off = s.streams.offsets(t.name, p.partition_index)
                if p.timestamp == -1:
                    offset = off.high_watermark
                elif p.timestamp == -2:
                    offset = off.log_start
                else:
                    found = s.streams.offset_for_time(t.name, p.partition_index, p.timestamp)
                    if found is not None:
                        offset, ts = found
            except (TopicNotFound, PartitionNotFound):
                code = kerr.UNKNOWN_TOPIC_OR_PARTITION
            parts.append(
                _LP(
                    partition_index=p.partition_index,
                    error_code=code,
                    timestamp=ts,
                    offset=offset,
                    leader_epoch=0,
                )
            )
        topics.append(_LT(name=t.name, partitions=parts))
    return ListOffsetsResponse(throttle_time_ms=0, topics=topics)


# -- metadata and topics ------------------------------------------------------------------

_MB = MetadataResponse.MetadataResponseBroker
_MT = MetadataResponse.MetadataResponseTopic
_MP = _MT.MetadataResponsePartition
_NO_OPS = None  # bitfield: None encodes "not requested" (-2^31)


@_handles(3)
async def _metadata(s: KafkaServer, c: _Conn, req: Request) -> Any:
    body = req.body
    auto = s.auto_create_topics and (req.api_version < 4 or body.allow_auto_topic_creation)
    names: list[str]
    if body.topics is None:
        names = sorted(s.streams.topics)
        auto = False
    else:
        names = [t.name for t in body.topics]
    topics = []
    for name in names:
        code = await s.topic_exists(name, auto)
        parts = []
        if code == kerr.NONE and name in s.streams.topics:
            n = s.streams.get_topic(name).partitions
            parts = [
                _MP(
                    error_code=0,
                    partition_index=i,
                    leader_id=NODE_ID,
                    leader_epoch=0,
                    replica_nodes=[NODE_ID],
                    isr_nodes=[NODE_ID],
                    offline_replicas=[],
                )
                for i in range(n)
            ]
        topics.append(
            _MT(
                error_code=code,
                name=name,
                is_internal=False,
                partitions=parts,
                authorized_operations=_NO_OPS,
            )
        )
    return MetadataResponse(
        throttle_time_ms=0,
        brokers=[_MB(node_id=NODE_ID, host=c.host, port=c.port, rack=None)],
        cluster_id=CLUSTER_ID,
        controller_id=NODE_ID,
        topics=topics,
        authorized_operations=_NO_OPS,
    )


_CT = CreateTopicsResponse.CreatableTopicResult


@_handles(19)
async def _create_topics(s: KafkaServer, c: _Conn, req: Request) -> Any:
    body = req.body
    out = []
    for t in body.topics:
        code, msg = kerr.NONE, None
        try:
            if t.replication_factor not in (-1, 1):
                code, msg = kerr.INVALID_REPLICATION_FACTOR, "conveyor keeps one replica"
            else:
                config = {cfg.name: cfg.value for cfg in t.configs}
                await s.streams.create_topic(
                    t.name,
                    t.num_partitions if t.num_partitions > 0 else None,
                    config,
                    validate_only=body.validate_only,
                )
        except TopicExists as exc:
            code, msg = kerr.TOPIC_ALREADY_EXISTS, str(exc)
        except errors.InvalidName as exc:
            code, msg = kerr.INVALID_TOPIC_EXCEPTION, str(exc)
        except errors.InvalidArgument as exc:
            code = kerr.INVALID_PARTITIONS if "partitions" in str(exc) else kerr.INVALID_CONFIG
            msg = str(exc)
        out.append(_CT(name=t.name, error_code=code, error_message=msg))
    return CreateTopicsResponse(throttle_time_ms=0, topics=out)


_DT = DeleteTopicsResponse.DeletableTopicResult


@_handles(20)
async def _delete_topics(s: KafkaServer, c: _Conn, req: Request) -> Any:
    out = []
    for name in req.body.topic_names:
        code = kerr.NONE
        try:
            await s.streams.delete_topic(name)
        except TopicNotFound:
            code = kerr.UNKNOWN_TOPIC_OR_PARTITION
        out.append(_DT(name=name, error_code=code))
    return DeleteTopicsResponse(throttle_time_ms=0, responses=out)


@_handles(22)
async def _init_producer_id(s: KafkaServer, c: _Conn, req: Request) -> Any:
    if req.body.transactional_id is not None:
        return InitProducerIdResponse(
            throttle_time_ms=0,
            error_code=kerr.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
            producer_id=-1,
            producer_epoch=-1,
        )
    pid = await s.streams.next_producer_id()
    return InitProducerIdResponse(
        throttle_time_ms=0, error_code=0, producer_id=pid, producer_epoch=0
    )


# -- groups -------------------------------------------------------------------------------


@_handles(10)
async def _find_coordinator(s: KafkaServer, c: _Conn, req: Request) -> Any:
    return FindCoordinatorResponse(
        throttle_time_ms=0,
        error_code=0,
        error_message=None,
        node_id=NODE_ID,
        host=c.host,
        port=c.port,
    )


_JM = JoinGroupResponse.JoinGroupResponseMember


@_handles(11)
async def _join_group(s: KafkaServer, c: _Conn, req: Request) -> Any:
    b = req.body
    if not b.group_id:
        return JoinGroupResponse(
            throttle_time_ms=0, error_code=kerr.INVALID_GROUP_ID, generation_id=-1,
            protocol_name="", leader="", member_id="", members=[],
        )  # fmt: skip
    res = await s.streams.groups.join(
        b.group_id,
        b.member_id,
        protocol_type=b.protocol_type,
        protocols=[(p.name, p.metadata) for p in b.protocols],
        session_timeout_ms=b.session_timeout_ms,
        rebalance_timeout_ms=b.rebalance_timeout_ms if req.api_version >= 1 else -1,
        client_id=req.client_id or "",
        client_host=c.peer,
        group_instance_id=b.group_instance_id if req.api_version >= 5 else None,
    )
    return JoinGroupResponse(
        throttle_time_ms=0,
        error_code=res.error,
        generation_id=res.generation,
        protocol_name=res.protocol or "",
        leader=res.leader,
        member_id=res.member_id,
        members=[_JM(member_id=m, group_instance_id=i, metadata=md) for m, i, md in res.members],
    )


@_handles(14)
async def _sync_group(s: KafkaServer, c: _Conn, req: Request) -> Any:
    b = req.body
    code, assignment = await s.streams.groups.sync(
        b.group_id,
        b.generation_id,
        b.member_id,
        {a.member_id: a.assignment for a in b.assignments},
    )
    return SyncGroupResponse(throttle_time_ms=0, error_code=code, assignment=assignment)


@_handles(12)
async def _heartbeat(s: KafkaServer, c: _Conn, req: Request) -> Any:
    b = req.body
    code = s.streams.groups.heartbeat(b.group_id, b.generation_id, b.member_id)
    return HeartbeatResponse(throttle_time_ms=0, error_code=code)


_LM = LeaveGroupResponse.MemberResponse


@_handles(13)
async def _leave_group(s: KafkaServer, c: _Conn, req: Request) -> Any:
    b = req.body
    if req.api_version >= 3:
        ids = [m.member_id for m in b.members]
        codes = s.streams.groups.leave(b.group_id, ids)
        members = [
            _LM(member_id=m.member_id, group_instance_id=m.group_instance_id, error_code=code)
            for m, code in zip(b.members, codes, strict=True)
        ]
        return LeaveGroupResponse(throttle_time_ms=0, error_code=0, members=members)
    code: int = s.streams.groups.leave(b.group_id, [b.member_id])[0]
    return LeaveGroupResponse(throttle_time_ms=0, error_code=code, members=[])


_OCT = OffsetCommitResponse.OffsetCommitResponseTopic
_OCP = _OCT.OffsetCommitResponsePartition


@_handles(8)
async def _offset_commit(s: KafkaServer, c: _Conn, req: Request) -> Any:
    b = req.body
    code = s.streams.groups.check_commit(b.group_id, b.generation_id_or_member_epoch, b.member_id)
    if code == kerr.NONE:
        offsets = {
            (t.name, p.partition_index): (p.committed_offset, p.committed_metadata)
            for t in b.topics
            for p in t.partitions
        }
        try:
            await s.streams.commit(b.group_id, offsets)
        except errors.ConveyorError:
            log.exception("committing offsets failed")
            code = kerr.COORDINATOR_NOT_AVAILABLE
    topics = [
        _OCT(
            name=t.name,
            partitions=[
                _OCP(partition_index=p.partition_index, error_code=code) for p in t.partitions
            ],
        )
        for t in b.topics
    ]
    return OffsetCommitResponse(throttle_time_ms=0, topics=topics)


_OFT = OffsetFetchResponse.OffsetFetchResponseTopic
_OFP = _OFT.OffsetFetchResponsePartition


@_handles(9)
async def _offset_fetch(s: KafkaServer, c: _Conn, req: Request) -> Any:
    b = req.body
    wanted: list[tuple[str, list[int]]]
    if b.topics is None:
        by_topic: dict[str, list[int]] = {}
        for t, p in sorted(s.streams.committed_all(b.group_id)):
            by_topic.setdefault(t, []).append(p)
        wanted = list(by_topic.items())
    else:
        wanted = [(t.name, list(t.partition_indexes)) for t in b.topics]
    topics = []
    for name, parts in wanted:
        rows = []
        for p in parts:
            got = s.streams.committed(b.group_id, name, p)
            off, meta = got if got is not None else (-1, "")
            rows.append(
                _OFP(
                    partition_index=p,
                    committed_offset=off,
                    committed_leader_epoch=-1,
                    metadata=meta if meta is not None else "",
                    error_code=0,
                )
            )
        topics.append(_OFT(name=name, partitions=rows))
    return OffsetFetchResponse(throttle_time_ms=0, topics=topics, error_code=0)


_DG = DescribeGroupsResponse.DescribedGroup
_DGM = _DG.DescribedGroupMember


@_handles(15)
async def _describe_groups(s: KafkaServer, c: _Conn, req: Request) -> Any:
    out = []
    for gid in req.body.groups:
        info = s.streams.groups.describe(gid)
        out.append(
            _DG(
                error_code=0,
                group_id=gid,
                group_state=info.state,
                protocol_type=info.protocol_type,
                protocol_data=info.protocol,
                members=[
                    _DGM(
                        member_id=m.member_id,
                        group_instance_id=m.group_instance_id,
                        client_id=m.client_id,
                        client_host=m.client_host,
                        member_metadata=m.metadata,
                        member_assignment=m.assignment,
                    )
                    for m in info.members
                ],
                authorized_operations=_NO_OPS,
            )
        )
    return DescribeGroupsResponse(throttle_time_ms=0, groups=out)


_LG = ListGroupsResponse.ListedGroup


@_handles(16)
async def _list_groups(s: KafkaServer, c: _Conn, req: Request) -> Any:
    live = {g: (ptype, state) for g, ptype, state in s.streams.groups.list_groups()}
    groups = [
        _LG(group_id=g, protocol_type=live.get(g, ("consumer", "Empty"))[0] or "consumer")
        for g in s.streams.known_groups()
    ]
    return ListGroupsResponse(throttle_time_ms=0, error_code=0, groups=groups)


_DGR = DeleteGroupsResponse.DeletableGroupResult


@_handles(42)
async def _delete_groups(s: KafkaServer, c: _Conn, req: Request) -> Any:
    out = []
    for gid in req.body.groups_names:
        code = await s.streams.delete_group(gid)
        out.append(_DGR(group_id=gid, error_code=code))
    return DeleteGroupsResponse(throttle_time_ms=0, results=out)
