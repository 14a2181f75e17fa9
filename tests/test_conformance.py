"""The engine's contract, run against every backend (see conftest.BACKENDS)."""

from __future__ import annotations

import asyncio

import pytest
from tests.conftest import Env

from conveyor import errors
from conveyor.model import NewMessage, QueueOptions


def m(body: bytes | str, **kw: object) -> NewMessage:
    return NewMessage(body=body.encode() if isinstance(body, str) else body, **kw)  # type: ignore[arg-type]


async def bodies(env: Env, queue: str, n: int = 100, **kw: object) -> list[bytes]:
    got = await env.backend.receive(queue, n, **kw)  # type: ignore[arg-type]
    return [d.body for d in got]


# -- queues -------------------------------------------------------------------------------


async def test_declare_is_idempotent_and_conflicts_on_other_options(env: Env) -> None:
    b = env.backend
    opts = QueueOptions(visibility_timeout=10, max_receives=3)
    first = await b.declare_queue("orders", opts)
    again = await b.declare_queue("orders", QueueOptions(visibility_timeout=10, max_receives=3))
    assert first.name == again.name == "orders"
    assert (await b.declare_queue("orders")).options == opts  # no options: just get it
    with pytest.raises(errors.QueueExists, match="max_receives"):
        await b.declare_queue("orders", QueueOptions(visibility_timeout=10, max_receives=4))
    with pytest.raises(errors.QueueNotFound):
        await b.declare_queue("nope", passive=True)


async def test_list_get_update_delete_purge(env: Env) -> None:
    b = env.backend
    for name in ("a.one", "a.two", "b.one"):
        await b.declare_queue(name)
    assert [q.name for q in await b.list_queues("a.")] == ["a.one", "a.two"]
    info = await b.update_queue("a.one", QueueOptions(visibility_timeout=99))
    assert info.options.visibility_timeout == 99
    assert (await b.get_queue("a.one")).options.visibility_timeout == 99
    await b.send_batch("a.one", [m("x"), m("y", delay=30)])
    assert await b.purge_queue("a.one") == 2
    assert (await b.stats("a.one")).ready == 0
    await b.send_batch("a.one", [m("x")])
    assert await b.delete_queue("a.one") == 1
    with pytest.raises(errors.QueueNotFound):
        await b.get_queue("a.one")
    with pytest.raises(errors.QueueNotFound):
        await b.send_batch("a.one", [m("x")])


async def test_peek_does_not_lease(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q")
    await b.send_batch("q", [m("1"), m("2")])
    peeked = await b.peek("q", 10)
    assert [d.body for d in peeked] == [b"1", b"2"]
    assert all(d.receipt is None for d in peeked)
    assert await bodies(env, "q") == [b"1", b"2"]


# -- send and receive ---------------------------------------------------------------------


async def test_priority_then_send_order(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q", QueueOptions(max_priority=5))
    await b.send_batch(
        "q",
        [m("a", priority=1), m("b", priority=5), m("c"), m("d", priority=9), m("e", priority=1)],
    )
    # priority above max_priority is bounded to it, so "d" ranks with "b" after it
    assert await bodies(env, "q") == [b"b", b"d", b"a", b"e", b"c"]


async def test_headers_properties_and_delivery_fields(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q")
    props = {"content_type": "application/json", "correlation_id": "c-1", "reply_to": "r"}
    from conveyor.model import Properties

    (res,) = await b.send_batch(
        "q",
        [
            m(
                "{}",
                headers={"tenant": "acme", "n": 3, "ok": True, "raw": b"\x00"},
                properties=Properties(**props),
                group_id="g",
            )
        ],
    )
    (d,) = await b.receive("q", 1)
    assert d.id == res.id
    assert d.headers == {"tenant": "acme", "n": 3, "ok": True, "raw": b"\x00"}
    assert d.properties.content_type == "application/json"
    assert d.properties.correlation_id == "c-1"
    assert d.receive_count == 1 and d.first_received_at is not None
    assert d.group_id == "g"
    assert d.routing_key == "q" and d.exchange == ""


async def test_receipts_are_per_delivery(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q", QueueOptions(visibility_timeout=5))
    await b.send_batch("q", [m("x")])
    (first,) = await b.receive("q", 1)
    await env.advance(6)  # lease expires
    (second,) = await b.receive("q", 1)
    assert second.receipt != first.receipt and second.receive_count == 2
    assert first.receipt is not None and second.receipt is not None
    with pytest.raises(errors.ReceiptInvalid):
        await b.ack("q", first.receipt)
    with pytest.raises(errors.ReceiptInvalid):
        await b.nack("q", first.receipt)
    # the current lease is untouched by the stale attempts
    assert (await b.stats("q")).in_flight == 1
    await b.ack("q", second.receipt)
    assert (await b.stats("q")).in_flight == 0
    with pytest.raises(errors.ReceiptInvalid):
        await b.ack("q", second.receipt)
    with pytest.raises(errors.ReceiptInvalid):
        await b.ack("q", "garbage")


async def test_nack_now_and_with_delay_and_extend(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q", QueueOptions(visibility_timeout=10))
    await b.send_batch("q", [m("x")])
    (d,) = await b.receive("q", 1)
    assert d.receipt
    await b.nack("q", d.receipt)
    (d,) = await b.receive("q", 1)
    assert d.receipt and d.receive_count == 2
    await b.nack("q", d.receipt, delay=20)
    assert await b.receive("q", 1) == []
    s = await b.stats("q")
    assert (s.ready, s.in_flight, s.delayed) == (0, 0, 1)
    await env.advance(21)
    (d,) = await b.receive("q", 1)
    assert d.receipt
    await b.extend("q", d.receipt, 60)
    await env.advance(30)  # past the original 10 s lease, within the extension
    assert await b.receive("q", 1) == []
    await env.advance(31)
    (again,) = await b.receive("q", 1)
    assert again.receive_count == 4


async def test_visibility_timeout_override(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q", QueueOptions(visibility_timeout=100))
    await b.send_batch("q", [m("x")])
    await b.receive("q", 1, visibility_timeout=2)
    await env.advance(3)
    assert await bodies(env, "q") == [b"x"]


async def test_delay_keeps_message_out_until_due(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q")
    await b.send_batch("q", [m("later", delay=10), m("now")])
    assert await bodies(env, "q") == [b"now"]
    await env.advance(11)
    assert await bodies(env, "q") == [b"later"]


async def test_dead_letter_after_max_receives(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q", QueueOptions(max_receives=2, dead_letter="q.dlq"))
    await b.send_batch("q", [m("poison")])
    for _ in range(2):
        (d,) = await b.receive("q", 1)
        assert d.receipt
        await b.nack("q", d.receipt)
    assert await b.receive("q", 1) == []
    (dead,) = await b.receive("q.dlq", 1)
    assert dead.body == b"poison"
    assert dead.deaths[0].reason == "delivery_limit"
    assert dead.deaths[0].queue == "q"
    assert (await b.stats("q")).dead_lettered == 1


async def test_reject_without_requeue_dead_letters(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q", QueueOptions(dead_letter="dlq"))
    await b.send_batch("q", [m("bad")])
    (d,) = await b.receive("q", 1)
    assert d.receipt
    await b.nack("q", d.receipt, requeue=False)
    (dead,) = await b.receive("dlq", 1)
    assert dead.deaths[0].reason == "rejected"


async def test_ttl_expiry_dead_letters_and_never_delivers(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q", QueueOptions(message_ttl=10, dead_letter="dlq"))
    await b.declare_queue("plain")
    await b.send_batch("q", [m("queue-ttl"), m("msg-ttl", ttl=2)])
    await b.send_batch("plain", [m("dropped", ttl=1)])
    await env.advance(3)
    assert await bodies(env, "q") == [b"queue-ttl"]
    await env.advance(20)
    assert await bodies(env, "plain") == []
    dead = await b.receive("dlq", 10)
    assert [d.body for d in dead] == [b"msg-ttl"]
    assert dead[0].deaths[0].reason == "expired"
    assert (await b.stats("q")).expired_total == 1


async def test_max_length_reject_new(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q", QueueOptions(max_length=2))
    await b.send_batch("q", [m("1"), m("2")])
    with pytest.raises(errors.QueueFull):
        await b.send_batch("q", [m("3")])
    assert (await b.stats("q")).ready == 2


async def test_max_length_drop_oldest_dead_letters(env: Env) -> None:
    b = env.backend
    await b.declare_queue(
        "q", QueueOptions(max_length=2, overflow="drop-oldest", dead_letter="dlq")
    )
    await b.send_batch("q", [m("1"), m("2"), m("3")])
    assert await bodies(env, "q") == [b"2", b"3"]
    (dead,) = await b.receive("dlq", 10)
    assert dead.body == b"1" and dead.deaths[0].reason == "maxlen"


async def test_dedup_within_window(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q", QueueOptions(dedup_window=60))
    first, again = await b.send_batch("q", [m("a", dedup_id="k"), m("b", dedup_id="k")])
    assert again.id == first.id and not again.stored
    (third,) = await b.send_batch("q", [m("c", dedup_id="k")])
    assert third.id == first.id and not third.stored
    assert await bodies(env, "q") == [b"a"]
    await env.advance(61)
    (fourth,) = await b.send_batch("q", [m("d", dedup_id="k")])
    assert fourth.stored and fourth.id != first.id


async def test_fifo_groups(env: Env) -> None:
    b = env.backend
    await b.declare_queue("f", QueueOptions(fifo=True))
    await b.send_batch(
        "f",
        [m(f"{g}{i}", group_id=g) for i in range(3) for g in ("a", "b")],
    )
    got = await b.receive("f", 10)
    # one per group in flight, in order within the group
    assert sorted(d.body for d in got) == [b"a0", b"b0"]
    assert await b.receive("f", 10) == []
    for d in got:
        assert d.receipt
        if d.body == b"a0":
            await b.ack("f", d.receipt)
    (nxt,) = await b.receive("f", 10)
    assert nxt.body == b"a1"


async def test_fifo_groups_served_in_turn(env: Env) -> None:
    b = env.backend
    await b.declare_queue("f", QueueOptions(fifo=True))
    await b.send_batch("f", [m(f"a{i}", group_id="a") for i in range(5)])
    await b.send_batch("f", [m("b0", group_id="b"), m("c0", group_id="c")])
    order = []
    for _ in range(4):
        (d,) = await b.receive("f", 1)
        assert d.receipt
        order.append(d.body)
        await b.ack("f", d.receipt)
    # the busy group "a" does not starve "b" and "c"
    assert order[:3] == [b"a0", b"b0", b"c0"]


async def test_long_poll_returns_as_soon_as_a_message_arrives(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q")
    loop = asyncio.get_running_loop()
    started = loop.time()
    poll = asyncio.create_task(b.receive("q", 5, wait=10))
    await asyncio.sleep(0.1)
    assert not poll.done()
    await b.send_batch("q", [m("hello")])
    got = await asyncio.wait_for(poll, 5)
    assert [d.body for d in got] == [b"hello"]
    assert loop.time() - started < 5


async def test_long_poll_times_out_empty(env: Env) -> None:
    await env.backend.declare_queue("q")
    assert await env.backend.receive("q", 1, wait=0.2) == []


async def test_competing_long_polls_each_get_a_message(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q")
    polls = [asyncio.create_task(b.receive("q", 1, wait=5)) for _ in range(3)]
    await asyncio.sleep(0.05)
    await b.send_batch("q", [m("1"), m("2"), m("3")])
    got = await asyncio.wait_for(asyncio.gather(*polls), 5)
    assert sorted(d[0].body for d in got) == [b"1", b"2", b"3"]


async def test_redrive(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q", QueueOptions(max_receives=1, dead_letter="dlq"))
    await b.send_batch("q", [m("x"), m("y")])
    got = await b.receive("q", 10)
    await b.nack_batch("q", [d.receipt for d in got if d.receipt])
    assert await b.receive("q", 10) == []
    assert (await b.stats("dlq")).ready == 2
    assert await b.redrive("dlq") == 2
    assert sorted(await bodies(env, "q")) == [b"x", b"y"]


async def test_auto_ack_receive_deletes(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q")
    await b.send_batch("q", [m("x")])
    (d,) = await b.receive("q", 1, auto_ack=True)
    assert d.receipt is None
    s = await b.stats("q")
    assert (s.ready, s.in_flight, s.acked_total) == (0, 0, 1)


async def test_stats(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q")
    await b.send_batch("q", [m("1"), m("2"), m("3", delay=100)])
    (d,) = await b.receive("q", 1)
    await env.advance(5)
    s = await b.stats("q")
    assert (s.ready, s.in_flight, s.delayed) == (1, 1, 1)
    assert s.sent_total == 3 and s.received_total == 1
    assert s.oldest_age >= 5
    assert d.receipt
    await b.ack("q", d.receipt)
    assert (await b.stats("q")).acked_total == 1


# -- exchanges ----------------------------------------------------------------------------


async def test_default_exchange_routes_by_queue_name(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q")
    assert (await b.publish("", m("x"), "q")).routed == 1
    assert (await b.publish("", m("x"), "missing")).routed == 0


@pytest.mark.parametrize(
    ("kind", "binding", "key", "headers", "routed"),
    [
        ("direct", "a.b", "a.b", {}, True),
        ("direct", "a.b", "a.c", {}, False),
        ("fanout", "ignored", "anything", {}, True),
        ("topic", "order.*", "order.created", {}, True),
        ("topic", "order.*", "order.created.eu", {}, False),
        ("topic", "order.#", "order.created.eu", {}, True),
        ("topic", "#", "", {}, True),
        ("topic", "*.eu", "order.eu", {}, True),
    ],
)
async def test_exchange_types(
    env: Env, kind: str, binding: str, key: str, headers: dict[str, str], routed: bool
) -> None:
    b = env.backend
    await b.declare_queue("q")
    await b.declare_exchange("x", kind)
    await b.bind("x", "q", binding)
    res = await b.publish("x", m("hi"), key)
    assert res.routed == (1 if routed else 0)
    assert await bodies(env, "q") == ([b"hi"] if routed else [])


async def test_headers_exchange_all_and_any(env: Env) -> None:
    b = env.backend
    await b.declare_exchange("h", "headers")
    await b.declare_queue("all")
    await b.declare_queue("any")
    await b.bind("h", "all", "", {"x-match": "all", "a": 1, "b": 2})
    await b.bind("h", "any", "", {"x-match": "any", "a": 1, "b": 2})
    r1 = await b.publish("h", m("both", headers={"a": 1, "b": 2}))
    r2 = await b.publish("h", m("one", headers={"a": 1}))
    r3 = await b.publish("h", m("none", headers={"c": 3}))
    assert (r1.routed, r2.routed, r3.routed) == (2, 1, 0)
    assert await bodies(env, "all") == [b"both"]
    assert await bodies(env, "any") == [b"both", b"one"]


async def test_fanout_to_many_and_exchange_to_exchange(env: Env) -> None:
    b = env.backend
    await b.declare_exchange("events", "topic")
    await b.declare_exchange("audit", "fanout")
    for q in ("orders", "billing", "log"):
        await b.declare_queue(q)
    await b.bind("events", "orders", "order.*")
    await b.bind("events", "billing", "order.paid")
    await b.bind_exchange("events", "audit", "#")
    await b.bind("audit", "log")
    res = await b.publish("events", m("paid"), "order.paid")
    assert res.routed == 3
    assert set(res.ids) == {"orders", "billing", "log"}
    await b.unbind("events", "billing", "order.paid")
    assert (await b.publish("events", m("paid2"), "order.paid")).routed == 2
    await b.unbind_exchange("events", "audit", "#")
    assert (await b.publish("events", m("paid3"), "order.paid")).routed == 1
    await b.delete_exchange("audit")
    with pytest.raises(errors.ExchangeNotFound):
        await b.publish("audit", m("x"), "")


async def test_exchange_redeclare_conflict_and_bindings_list(env: Env) -> None:
    b = env.backend
    await b.declare_exchange("x", "topic")
    await b.declare_exchange("x", "topic")
    with pytest.raises(errors.ExchangeExists):
        await b.declare_exchange("x", "fanout")
    await b.declare_queue("q")
    await b.bind("x", "q", "a.#")
    assert [
        (bd.source, bd.destination, bd.routing_key) for bd in await b.list_bindings(exchange="x")
    ] == [("x", "q", "a.#")]
    await b.delete_queue("q")
    assert await b.list_bindings(exchange="x") == []


async def test_dead_letter_exchange(env: Env) -> None:
    b = env.backend
    await b.declare_exchange("dlx", "direct")
    await b.declare_queue("dead")
    await b.bind("dlx", "dead", "failed")
    await b.declare_queue(
        "work", QueueOptions(dead_letter_exchange="dlx", dead_letter_routing_key="failed")
    )
    await b.send_batch("work", [m("x")])
    (d,) = await b.receive("work", 1)
    assert d.receipt
    await b.nack("work", d.receipt, requeue=False)
    (dead,) = await b.receive("dead", 1)
    assert dead.body == b"x" and dead.deaths[0].reason == "rejected"
    assert dead.deaths[0].routing_keys == ["work"]


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a" * 256, "has space", "slash/es", "../x", "nul\x00"])
async def test_bad_queue_names(env: Env, name: str) -> None:
    with pytest.raises(errors.InvalidName):
        await env.backend.declare_queue(name)


async def test_bad_values(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q")
    with pytest.raises(errors.MessageTooLarge):
        await b.send_batch("q", [m(b"x" * (1024 * 1024 + 1))])
    with pytest.raises(errors.InvalidArgument):
        await b.send_batch("q", [m("x", delay=-1)])
    with pytest.raises(errors.InvalidArgument):
        await b.send_batch("q", [m("x", delay=1e12)])
    with pytest.raises(errors.InvalidArgument):
        await b.receive("q", 0)
    with pytest.raises(errors.InvalidArgument):
        await b.receive("q", 1, visibility_timeout=-5)
    with pytest.raises(errors.InvalidArgument):
        await b.declare_queue("z", QueueOptions(visibility_timeout=-1))
    with pytest.raises(errors.InvalidArgument):
        await b.declare_exchange("x", "nonsense")
    # nothing was half-written
    assert (await b.stats("q")).sent_total == 0
    assert [q.name for q in await b.list_queues()] == ["q"]


async def test_batch_is_atomic(env: Env) -> None:
    b = env.backend
    await b.declare_queue("q")
    with pytest.raises(errors.MessageTooLarge):
        await b.send_batch("q", [m("ok"), m(b"x" * (2 * 1024 * 1024))])
    assert (await b.stats("q")).sent_total == 0
