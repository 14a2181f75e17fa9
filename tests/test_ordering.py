"""Ordering invariants, checked with hypothesis on the embedded engine."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.broker import Broker, FakeClock
from conveyor.model import NewMessage, QueueOptions

priorities = st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=60)


@settings(max_examples=40, deadline=None)
@given(priorities, st.integers(min_value=1, max_value=7))
def test_delivery_order_is_priority_then_send_order(prios: list[int], batch: int) -> None:
    async def run() -> list[int]:
        broker = await Broker.open("memory://", timers=False)
        try:
            await broker.declare_queue("q")
            await broker.send_batch(
                "q", [NewMessage(body=str(i).encode(), priority=p) for i, p in enumerate(prios)]
            )
            out: list[int] = []
            while got := await broker.receive("q", batch):
                out.extend(int(d.body) for d in got)
            return out
        finally:
            await broker.close()

    order = asyncio.run(run())
    assert order == sorted(range(len(prios)), key=lambda i: (-prios[i], i))


groups = st.lists(st.sampled_from("abcd"), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None)
@given(groups, st.lists(st.booleans(), min_size=1, max_size=80))
def test_fifo_order_within_group_and_one_in_flight(seq: list[str], nacks: list[bool]) -> None:
    """Whatever the consumer acks or nacks, each group's messages are acked in send
    order and no two of a group are ever in flight together."""

    async def run() -> dict[str, list[int]]:
        broker = await Broker.open("memory://", timers=False, clock=FakeClock())
        acked: dict[str, list[int]] = {}
        try:
            await broker.declare_queue("f", QueueOptions(fifo=True))
            await broker.send_batch(
                "f", [NewMessage(body=str(i).encode(), group_id=g) for i, g in enumerate(seq)]
            )
            step = 0
            while got := await broker.receive("f", 3):
                in_flight = [d.group_id for d in got]
                assert len(in_flight) == len(set(in_flight))
                for d in got:
                    assert d.receipt and d.group_id
                    if nacks[step % len(nacks)]:
                        await broker.nack("f", d.receipt)
                    else:
                        await broker.ack("f", d.receipt)
                        acked.setdefault(d.group_id, []).append(int(d.body))
                    step += 1
            return acked
        finally:
            await broker.close()

    if all(nacks):
        nacks = [*nacks, False]  # make progress
    acked = asyncio.run(run())
    for g, ids in acked.items():
        assert ids == [i for i, x in enumerate(seq) if x == g]
