"""Consumer-group membership: Kafka's group protocol (join, sync, heartbeat, leave).

The coordinator is protocol-neutral: members send opaque protocol metadata, the
elected leader computes assignments (client-side assignment, as in Kafka) and the
coordinator hands each member its part. Membership lives in memory (members rejoin
after a restart, as they do when a Kafka coordinator moves); committed offsets are
durable and live in the engine.

States follow Kafka's: Empty -> PreparingRebalance -> CompletingRebalance -> Stable.
A join (or a leave, or a session expiry) starts a rebalance; members learn about it
from their heartbeat (REBALANCE_IN_PROGRESS) and rejoin; the join phase ends when
every known member has rejoined or the rebalance timeout passes (stragglers are
removed). The leader then gets every member's metadata, and SyncGroup distributes
its assignment.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

# Kafka error codes
NONE = 0
COORDINATOR_NOT_AVAILABLE = 15
ILLEGAL_GENERATION = 22
INCONSISTENT_GROUP_PROTOCOL = 23
UNKNOWN_MEMBER_ID = 25
INVALID_SESSION_TIMEOUT = 26
REBALANCE_IN_PROGRESS = 27
GROUP_ID_NOT_FOUND = 69
NON_EMPTY_GROUP = 68

EMPTY = "Empty"
PREPARING = "PreparingRebalance"
COMPLETING = "CompletingRebalance"
STABLE = "Stable"
DEAD = "Dead"


@dataclass
class JoinResult:
    error: int
    generation: int = -1
    protocol_type: str | None = None
    protocol: str | None = None
    leader: str = ""
    member_id: str = ""
    #: (member id, group instance id, metadata); only the leader gets them
    members: list[tuple[str, str | None, bytes]] = field(default_factory=list)


@dataclass
class MemberInfo:
    member_id: str
    group_instance_id: str | None
    client_id: str
    client_host: str
    metadata: bytes
    assignment: bytes


@dataclass
class GroupInfo:
    group_id: str
    state: str
    protocol_type: str
    protocol: str
    generation: int
    leader: str
    members: list[MemberInfo]


class _Member:
    __slots__ = (
        "assignment",
        "client_host",
        "client_id",
        "id",
        "instance_id",
        "join_fut",
        "last_seen",
        "protocols",
        "rebalance_timeout",
        "session_timeout",
        "sync_fut",
    )

    def __init__(self, member_id: str) -> None:
        self.id = member_id
        self.instance_id: str | None = None
        self.client_id = ""
        self.client_host = ""
        self.session_timeout = 10.0
        self.rebalance_timeout = 60.0
        self.protocols: list[tuple[str, bytes]] = []
        self.assignment = b""
        self.last_seen = 0.0
        self.join_fut: asyncio.Future[JoinResult] | None = None
        self.sync_fut: asyncio.Future[tuple[int, bytes]] | None = None

    def protocol_type_ok(self, protocol_type: str, g: _Group) -> bool:
        return g.protocol_type == protocol_type

    def waiting_join(self) -> bool:
        return self.join_fut is not None and not self.join_fut.done()


class _Group:
    def __init__(self, name: str) -> None:
        self.name = name
        self.state = EMPTY
        self.generation = 0
        self.protocol_type: str | None = None
        self.protocol: str | None = None
        self.leader: str | None = None
        self.members: dict[str, _Member] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.initial_wait = False

    def info(self) -> GroupInfo:
        members = [
            MemberInfo(
                m.id,
                m.instance_id,
                m.client_id,
                m.client_host,
                dict(m.protocols).get(self.protocol or "", b""),
                m.assignment,
            )
            for m in self.members.values()
        ]
        return GroupInfo(
            self.name,
            "Dead" if self.state == DEAD else self.state,
            self.protocol_type or "",
            self.protocol or "" if self.state == STABLE else "",
            self.generation,
            self.leader or "",
            members,
        )


class GroupCoordinator:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        initial_rebalance_delay: float = 0.05,
        check_interval: float = 0.25,
    ) -> None:
        self.clock = clock
        self.initial_rebalance_delay = initial_rebalance_delay
        self.check_interval = check_interval
        self.groups: dict[str, _Group] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._expiry_loop(), name="conveyor-groups"
        )

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for g in self.groups.values():
            if g.timer is not None:
                g.timer.cancel()
            for m in g.members.values():
                if m.join_fut is not None and not m.join_fut.done():
                    m.join_fut.set_result(JoinResult(COORDINATOR_NOT_AVAILABLE))
                if m.sync_fut is not None and not m.sync_fut.done():
                    m.sync_fut.set_result((COORDINATOR_NOT_AVAILABLE, b""))

    # -- queries -------------------------------------------------------------------------
    def describe(self, group_id: str) -> GroupInfo:
        g = self.groups.get(group_id)
        if g is None:
            return GroupInfo(group_id, DEAD, "", "", 0, "", [])
        return g.info()

    def list_groups(self) -> list[tuple[str, str, str]]:
        """(group id, protocol type, state) of groups with members."""
        return [
            (g.name, g.protocol_type or "", g.state)
            for g in self.groups.values()
            if g.state != DEAD
        ]

    def is_active(self, group_id: str) -> bool:
        g = self.groups.get(group_id)
        return g is not None and bool(g.members)

    # -- join ----------------------------------------------------------------------------
    async def join(
        self,
        group_id: str,
        member_id: str,
        *,
        protocol_type: str,
        protocols: list[tuple[str, bytes]],
        session_timeout_ms: int = 10000,
        rebalance_timeout_ms: int = -1,
        client_id: str = "",
        client_host: str = "",
        group_instance_id: str | None = None,
    ) -> JoinResult:
        if self._closed:
            return JoinResult(COORDINATOR_NOT_AVAILABLE)
        if session_timeout_ms <= 0:
            return JoinResult(INVALID_SESSION_TIMEOUT)
        g = self.groups.get(group_id)
        if g is None or g.state == DEAD:
            g = self.groups[group_id] = _Group(group_id)
        names = {name for name, _ in protocols}
        if not protocols:
            return JoinResult(INCONSISTENT_GROUP_PROTOCOL)
        others = [m for mid, m in g.members.items() if mid != member_id]
        if others and (
            g.protocol_type != protocol_type
            or not all(names & {n for n, _ in m.protocols} for m in others)
        ):
            return JoinResult(INCONSISTENT_GROUP_PROTOCOL)
        if member_id:
            m = g.members.get(member_id)
            if m is None:
                return JoinResult(UNKNOWN_MEMBER_ID, member_id=member_id)
            unchanged = m.protocols == list(protocols) and m.protocol_type_ok(protocol_type, g)
            if unchanged and (
                g.state == COMPLETING or (g.state == STABLE and member_id != g.leader)
            ):
                # a rejoin that changes nothing (Kafka does the same): answer with the
                # current generation instead of starting another rebalance
                m.last_seen = self.clock()
                return self._result(g, m)
        else:
            member_id = f"{client_id or 'member'}-{uuid.uuid4()}"
            m = g.members[member_id] = _Member(member_id)
        m.instance_id = group_instance_id
        m.client_id = client_id
        m.client_host = client_host
        m.session_timeout = session_timeout_ms / 1000
        m.rebalance_timeout = (
            rebalance_timeout_ms if rebalance_timeout_ms > 0 else session_timeout_ms
        ) / 1000
        m.protocols = list(protocols)
        m.last_seen = self.clock()
        g.protocol_type = protocol_type
        if m.join_fut is not None and not m.join_fut.done():
            m.join_fut.set_result(JoinResult(REBALANCE_IN_PROGRESS, member_id=member_id))
        fut: asyncio.Future[JoinResult] = asyncio.get_running_loop().create_future()
        m.join_fut = fut
        if g.state != PREPARING:
            self._prepare(g, initial=g.state == EMPTY)
        self._maybe_complete(g)
        return await fut

    def _prepare(self, g: _Group, *, initial: bool = False) -> None:
        for m in g.members.values():
            if m.sync_fut is not None and not m.sync_fut.done():
                m.sync_fut.set_result((REBALANCE_IN_PROGRESS, b""))
        g.state = PREPARING
        if g.timer is not None:
            g.timer.cancel()
        timeout = max((m.rebalance_timeout for m in g.members.values()), default=1.0)
        loop = asyncio.get_running_loop()
        g.initial_wait = initial
        if initial:
            # let consumers that start together join one generation
            g.timer = loop.call_later(self.initial_rebalance_delay, self._initial_done, g, timeout)
        else:
            g.timer = loop.call_later(timeout, self._rebalance_timeout, g)

    def _initial_done(self, g: _Group, timeout: float) -> None:
        g.initial_wait = False
        g.timer = asyncio.get_running_loop().call_later(timeout, self._rebalance_timeout, g)
        self._maybe_complete(g)

    def _maybe_complete(self, g: _Group) -> None:
        if g.state != PREPARING or not g.members:
            return
        if g.initial_wait:
            return
        if all(m.waiting_join() for m in g.members.values()):
            self._complete(g)

    def _rebalance_timeout(self, g: _Group) -> None:
        g.timer = None
        if g.state != PREPARING:
            return
        for mid in [mid for mid, m in g.members.items() if not m.waiting_join()]:
            del g.members[mid]
        if g.members:
            self._complete(g)
        else:
            self._empty(g)

    def _complete(self, g: _Group) -> None:
        g.initial_wait = False
        if g.timer is not None:
            g.timer.cancel()
            g.timer = None
        g.generation += 1
        members = list(g.members.values())
        if g.leader not in g.members:
            g.leader = members[0].id
        leader = g.members[g.leader]
        common = set.intersection(*({n for n, _ in m.protocols} for m in members))
        g.protocol = next(n for n, _ in leader.protocols if n in common)
        g.state = COMPLETING
        everyone = [(m.id, m.instance_id, dict(m.protocols)[g.protocol]) for m in members]
        now = self.clock()
        for m in members:
            m.last_seen = now
            m.assignment = b""
            fut = m.join_fut
            m.join_fut = None
            if fut is not None and not fut.done():
                fut.set_result(
                    JoinResult(
                        NONE,
                        g.generation,
                        g.protocol_type,
                        g.protocol,
                        g.leader,
                        m.id,
                        everyone if m.id == g.leader else [],
                    )
                )

    def _result(self, g: _Group, m: _Member) -> JoinResult:
        everyone = []
        if m.id == g.leader:
            everyone = [
                (o.id, o.instance_id, dict(o.protocols).get(g.protocol or "", b""))
                for o in g.members.values()
            ]
        return JoinResult(
            NONE, g.generation, g.protocol_type, g.protocol, g.leader or "", m.id, everyone
        )

    def _empty(self, g: _Group) -> None:
        g.initial_wait = False
        if g.timer is not None:
            g.timer.cancel()
            g.timer = None
        g.state = EMPTY
        g.leader = None
        g.protocol = None
        g.generation += 1

    # -- sync / heartbeat / leave --------------------------------------------------------
    async def sync(
        self, group_id: str, generation: int, member_id: str, assignments: dict[str, bytes]
    ) -> tuple[int, bytes]:
        g = self.groups.get(group_id)
        if g is None or member_id not in g.members:
            return UNKNOWN_MEMBER_ID, b""
        if generation < g.generation:
            return REBALANCE_IN_PROGRESS, b""
        if generation != g.generation:
            return ILLEGAL_GENERATION, b""
        m = g.members[member_id]
        m.last_seen = self.clock()
        if g.state == PREPARING:
            return REBALANCE_IN_PROGRESS, b""
        if g.state == STABLE:
            return NONE, m.assignment
        if member_id == g.leader:
            for other in g.members.values():
                other.assignment = assignments.get(other.id, b"")
            g.state = STABLE
            for other in g.members.values():
                if other.sync_fut is not None and not other.sync_fut.done():
                    other.sync_fut.set_result((NONE, other.assignment))
                other.sync_fut = None
            return NONE, m.assignment
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        m.sync_fut = fut
        return await fut

    def heartbeat(self, group_id: str, generation: int, member_id: str) -> int:
        g = self.groups.get(group_id)
        if g is None or member_id not in g.members:
            return UNKNOWN_MEMBER_ID
        m = g.members[member_id]
        m.last_seen = self.clock()
        if g.state == PREPARING or generation < g.generation:
            # a known member with an old generation rejoins under its id (clients reset
            # their member id on ILLEGAL_GENERATION, which would strand the old one)
            return REBALANCE_IN_PROGRESS
        if generation != g.generation:
            return ILLEGAL_GENERATION
        return NONE

    def leave(self, group_id: str, member_ids: list[str]) -> list[int]:
        g = self.groups.get(group_id)
        out: list[int] = []
        changed = False
        for mid in member_ids:
            if g is None or mid not in g.members:
                out.append(UNKNOWN_MEMBER_ID)
                continue
            self._remove(g, mid)
            changed = True
            out.append(NONE)
        if g is not None and changed:
            self._membership_changed(g)
        return out

    def _remove(self, g: _Group, mid: str) -> None:
        m = g.members.pop(mid)
        if m.join_fut is not None and not m.join_fut.done():
            m.join_fut.set_result(JoinResult(UNKNOWN_MEMBER_ID, member_id=mid))
        if m.sync_fut is not None and not m.sync_fut.done():
            m.sync_fut.set_result((UNKNOWN_MEMBER_ID, b""))

    def _membership_changed(self, g: _Group) -> None:
        if not g.members:
            self._empty(g)
        elif g.state == PREPARING:
            self._maybe_complete(g)
        else:
            self._prepare(g)
            self._maybe_complete(g)

    def check_commit(self, group_id: str, generation: int, member_id: str) -> int:
        """May this member commit offsets for the group now?"""
        g = self.groups.get(group_id)
        if generation < 0 and not member_id:
            if g is None or not g.members:
                return NONE
            return ILLEGAL_GENERATION
        if g is None or member_id not in g.members:
            return UNKNOWN_MEMBER_ID
        if generation != g.generation:
            return ILLEGAL_GENERATION
        if g.state == COMPLETING:
            return REBALANCE_IN_PROGRESS
        g.members[member_id].last_seen = self.clock()
        return NONE

    def delete(self, group_id: str) -> int:
        g = self.groups.get(group_id)
        if g is not None and g.members:
            return NON_EMPTY_GROUP
        self.groups.pop(group_id, None)
        return NONE

    # -- session expiry ------------------------------------------------------------------
    def expire(self) -> None:
        now = self.clock()
        for g in list(self.groups.values()):
            dead = [
                mid
                for mid, m in g.members.items()
                if not m.waiting_join()
                and not (m.sync_fut is not None and not m.sync_fut.done())
                and now - m.last_seen > m.session_timeout
            ]
            for mid in dead:
                self._remove(g, mid)
            if dead:
                self._membership_changed(g)

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            self.expire()
