"""Differential tests: each scenario runs with pika against conveyor and against the real
RabbitMQ on this machine (127.0.0.1:5672, guest/guest); the observable results must be
equal. Where conveyor differs on purpose, the scenario says why and normalizes it.
The RabbitMQ half is skipped when no RabbitMQ is listening."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.exceptions
import pytest

from amqp_support import RunningAmqp, amqp_server

Target = tuple[str, int]
Scenario = Callable[[Target, str], Any]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


def _rabbit_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def conveyor() -> Iterator[RunningAmqp]:
    with amqp_server() as srv:
        yield srv


def connect(target: Target) -> pika.BlockingConnection:
    return pika.BlockingConnection(
        pika.ConnectionParameters(target[0], target[1], blocked_connection_timeout=5)
    )


def drain(ch: Any, queue: str, limit: int = 100) -> list[Any]:
    out = []
    for _ in range(limit):
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append(body.decode())
    return out


def get_wait(ch: Any, queue: str, auto_ack: bool = False) -> Any:
    """basic_get, retried briefly: RabbitMQ dead-letters asynchronously."""
    deadline = time.monotonic() + 3
    while True:
        got = ch.basic_get(queue, auto_ack=auto_ack)
        if got[0] is not None or time.monotonic() > deadline:
            return got
        time.sleep(0.01)


def channel_error(fn: Callable[[], Any]) -> tuple[int, str]:
    try:
        fn()
    except pika.exceptions.ChannelClosedByBroker as exc:
        return exc.reply_code, exc.reply_text
    except pika.exceptions.ConnectionClosedByBroker as exc:
        return exc.reply_code, exc.reply_text
    raise AssertionError("no error")


# -- scenarios ----------------------------------------------------------------------------


@scenario
def routing_every_exchange_type(target: Target, p: str) -> Any:
    conn = connect(target)
    ch = conn.channel()
    result: dict[str, Any] = {}
    try:
        for kind in ("direct", "fanout", "topic", "headers"):
            ex = f"{p}.{kind}"
            ch.exchange_declare(ex, kind, auto_delete=False)
            queues = [f"{p}.{kind}.q{i}" for i in range(3)]
            for q in queues:
                ch.queue_declare(q)
            if kind == "direct":
                ch.queue_bind(queues[0], ex, "a")
                ch.queue_bind(queues[1], ex, "b")
                ch.queue_bind(queues[2], ex, "a")
                keys = ["a", "b", "c"]
            elif kind == "fanout":
                ch.queue_bind(queues[0], ex, "ignored")
                ch.queue_bind(queues[1], ex)
                keys = ["x", "y"]
            elif kind == "topic":
                ch.queue_bind(queues[0], ex, "*.orange.*")
                ch.queue_bind(queues[1], ex, "*.*.rabbit")
                ch.queue_bind(queues[1], ex, "lazy.#")
                ch.queue_bind(queues[2], ex, "#")
                keys = [
                    "quick.orange.rabbit",
                    "lazy.orange.elephant",
                    "quick.orange.fox",
                    "lazy.brown.fox",
                    "lazy",
                    "quick.orange.male.rabbit",
                    "orange",
                    "",
                ]
            else:
                ch.queue_bind(queues[0], ex, "", {"x-match": "all", "a": 1, "b": "two"})
                ch.queue_bind(queues[1], ex, "", {"x-match": "any", "a": 1, "c": True})
                keys = ["h1", "h2", "h3"]
            headers = {"h1": {"a": 1, "b": "two"}, "h2": {"a": 1}, "h3": {"c": True, "b": "x"}}
            for key in keys:
                ch.basic_publish(
                    ex, key, key.encode() or b"-", pika.BasicProperties(headers=headers.get(key))
                )
            result[kind] = {q.rsplit(".", 1)[1]: drain(ch, q) for q in queues}
        # the default exchange routes by queue name; amq.* exchanges exist
        ch.basic_publish("", f"{p}.direct.q1", b"default")
        result["default"] = drain(ch, f"{p}.direct.q1")
        ch.queue_bind(f"{p}.direct.q1", "amq.topic", f"{p}.#")
        ch.basic_publish("amq.topic", f"{p}.x", b"amq")
        result["amq.topic"] = drain(ch, f"{p}.direct.q1")
    finally:
        for kind in ("direct", "fanout", "topic", "headers"):
            for i in range(3):
                ch.queue_delete(f"{p}.{kind}.q{i}")
            ch.exchange_delete(f"{p}.{kind}")
        conn.close()
    return result


@scenario
def exchange_to_exchange(target: Target, p: str) -> Any:
    conn = connect(target)
    ch = conn.channel()
    try:
        ch.exchange_declare(f"{p}.src", "topic")
        ch.exchange_declare(f"{p}.dst", "fanout")
        ch.exchange_bind(f"{p}.dst", f"{p}.src", "k.*")
        ch.queue_declare(f"{p}.q")
        ch.queue_bind(f"{p}.q", f"{p}.dst")
        for key in ("k.1", "j.1", "k.2"):
            ch.basic_publish(f"{p}.src", key, key.encode())
        got = drain(ch, f"{p}.q")
        ch.exchange_unbind(f"{p}.dst", f"{p}.src", "k.*")
        ch.basic_publish(f"{p}.src", "k.3", b"k.3")
        return got, drain(ch, f"{p}.q")
    finally:
        ch.queue_delete(f"{p}.q")
        ch.exchange_delete(f"{p}.src")
        ch.exchange_delete(f"{p}.dst")
        conn.close()


@scenario
def ordering_and_priorities(target: Target, p: str) -> Any:
    conn = connect(target)
    ch = conn.channel()
    try:
        ch.queue_declare(f"{p}.fifo")
        ch.queue_declare(f"{p}.prio", arguments={"x-max-priority": 5})
        for i in range(30):
            ch.basic_publish("", f"{p}.fifo", str(i).encode(), pika.BasicProperties(priority=i % 7))
        for i, prio in enumerate([0, 3, 9, 1, 5, 5, 2, None, 4]):
            ch.basic_publish(
                "", f"{p}.prio", f"{i}:{prio}".encode(), pika.BasicProperties(priority=prio)
            )
        return drain(ch, f"{p}.fifo"), drain(ch, f"{p}.prio")
    finally:
        ch.queue_delete(f"{p}.fifo")
        ch.queue_delete(f"{p}.prio")
        conn.close()


@scenario
def redelivered_flags(target: Target, p: str) -> Any:
    conn = connect(target)
    ch = conn.channel()
    q = f"{p}.redeliver"
    out: list[Any] = []
    try:
        ch.queue_declare(q)
        for i in range(3):
            ch.basic_publish("", q, str(i).encode())
        m, _, body = ch.basic_get(q)
        out.append((body, m.redelivered, m.message_count))
        ch.basic_reject(m.delivery_tag, requeue=True)
        m2, _, body = ch.basic_get(q)
        out.append((body, m2.redelivered))
        ch.basic_nack(m2.delivery_tag, requeue=True)
        # unacked deliveries go back when the channel closes
        ch2 = conn.channel()
        ch2.basic_qos(prefetch_count=2)
        seen: list[Any] = []
        for method, _props, body in ch2.consume(q, inactivity_timeout=1):
            if method is None:
                break
            seen.append((body, method.redelivered))
            if len(seen) == 2:
                break
        out.append(sorted(seen))
        ch2.close()
        rest = []
        while True:
            m3, _, body = ch.basic_get(q, auto_ack=True)
            if m3 is None:
                break
            rest.append((body, m3.redelivered))
        out.append(sorted(rest))
        return out
    finally:
        ch.queue_delete(q)
        conn.close()


def _deaths(props: Any) -> Any:
    headers = dict(props.headers or {})
    deaths = headers.pop("x-death", [])
    for d in deaths:
        assert d.pop("time") is not None
    return {"deaths": deaths, "other": headers}


@scenario
def dead_lettering_and_x_death(target: Target, p: str) -> Any:
    conn = connect(target)
    ch = conn.channel()
    out: dict[str, Any] = {}
    try:
        ch.exchange_declare(f"{p}.dlx", "direct")
        ch.queue_declare(f"{p}.dead")
        ch.queue_bind(f"{p}.dead", f"{p}.dlx", "dead-key")
        ch.queue_bind(f"{p}.dead", f"{p}.dlx", f"{p}.work")
        ch.queue_declare(f"{p}.work", arguments={"x-dead-letter-exchange": f"{p}.dlx"})
        ch.queue_declare(
            f"{p}.work2",
            arguments={
                "x-dead-letter-exchange": f"{p}.dlx",
                "x-dead-letter-routing-key": "dead-key",
            },
        )
        ch.basic_publish("", f"{p}.work", b"r1", pika.BasicProperties(headers={"k": "v"}))
        m, _, _ = get_wait(ch, f"{p}.work")
        ch.basic_reject(m.delivery_tag, requeue=False)
        m, props, body = get_wait(ch, f"{p}.dead", True)
        out["rejected"] = (body, m.exchange, m.routing_key, m.redelivered, _deaths(props))
        ch.basic_publish("", f"{p}.work2", b"r2")
        m, _, _ = ch.basic_get(f"{p}.work2")
        ch.basic_nack(m.delivery_tag, requeue=False)
        m, props, body = get_wait(ch, f"{p}.dead", True)
        out["nacked"] = (body, m.exchange, m.routing_key, _deaths(props))
        # dead-letter twice: count grows, newest first
        ch.basic_publish("", f"{p}.work", b"r3")
        for round_ in range(2):
            m, _, _ = get_wait(ch, f"{p}.work")
            ch.basic_reject(m.delivery_tag, requeue=False)
            m, props, body = get_wait(ch, f"{p}.dead")
            ch.basic_ack(m.delivery_tag)
            if round_ == 0:
                ch.basic_publish("", f"{p}.work", body, props)
        out["twice"] = _deaths(props)
        return out
    finally:
        for q in ("dead", "work", "work2"):
            ch.queue_delete(f"{p}.{q}")
        ch.exchange_delete(f"{p}.dlx")
        conn.close()


@scenario
def ttl_and_max_length(target: Target, p: str) -> Any:
    conn = connect(target)
    ch = conn.channel()
    out: dict[str, Any] = {}
    try:
        ch.queue_declare(f"{p}.dead")
        ch.queue_declare(
            f"{p}.ttl",
            arguments={
                "x-message-ttl": 100,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": f"{p}.dead",
            },
        )
        ch.basic_publish("", f"{p}.ttl", b"expire-me")
        ch.queue_declare(
            f"{p}.per",
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{p}.dead"},
        )
        ch.basic_publish("", f"{p}.per", b"short", pika.BasicProperties(expiration="50"))
        ch.basic_publish("", f"{p}.per", b"long", pika.BasicProperties(expiration="60000"))
        time.sleep(1.5)
        out["ttl-left"] = drain(ch, f"{p}.ttl")
        out["per-left"] = drain(ch, f"{p}.per")
        dead = []
        while True:
            m, props, body = ch.basic_get(f"{p}.dead", auto_ack=True)
            if m is None:
                break
            d = _deaths(props)
            d["other"].pop("x-first-death-queue", None)
            dead.append((body, [(x["reason"], x["queue"].rsplit(".", 1)[1]) for x in d["deaths"]]))
        out["dead"] = sorted(dead)
        ch.queue_declare(
            f"{p}.len",
            arguments={
                "x-max-length": 2,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": f"{p}.dead",
            },
        )
        for i in range(4):
            ch.basic_publish("", f"{p}.len", str(i).encode())
        out["len-left"] = drain(ch, f"{p}.len")
        out["len-dead"] = drain(ch, f"{p}.dead")
        ch.queue_declare(f"{p}.rej", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        ch.confirm_delivery()
        ch.basic_publish("", f"{p}.rej", b"fits")
        try:
            ch.basic_publish("", f"{p}.rej", b"rejected")
            out["reject-publish"] = "acked"
        except pika.exceptions.NackError:
            out["reject-publish"] = "nacked"
        out["rej-left"] = drain(ch, f"{p}.rej")
        return out
    finally:
        for q in ("dead", "ttl", "per", "len", "rej"):
            ch.queue_delete(f"{p}.{q}")
        conn.close()


@scenario
def errors_and_texts(target: Target, p: str) -> Any:
    out: dict[str, Any] = {}
    conn = connect(target)
    try:
        ch = conn.channel()
        out["passive-missing"] = channel_error(lambda: ch.queue_declare(f"{p}.none", passive=True))
        ch = conn.channel()
        out["reserved-queue"] = channel_error(lambda: ch.queue_declare("amq.mine"))
        ch = conn.channel()
        out["reserved-exchange"] = channel_error(lambda: ch.exchange_declare("amq.mine"))
        ch = conn.channel()
        ch.queue_declare(f"{p}.args", arguments={"x-max-length": 10})
        out["inequivalent-arg"] = channel_error(
            lambda: ch.queue_declare(f"{p}.args", arguments={"x-max-length": 11})
        )
        ch = conn.channel()
        out["inequivalent-durable"] = channel_error(
            lambda: ch.queue_declare(f"{p}.args", durable=True, arguments={"x-max-length": 10})
        )
        ch = conn.channel()
        out["missing-arg"] = channel_error(lambda: ch.queue_declare(f"{p}.args"))
        ch = conn.channel()
        ch.exchange_declare(f"{p}.ex", "direct")
        out["inequivalent-type"] = channel_error(lambda: ch.exchange_declare(f"{p}.ex", "fanout"))
        ch = conn.channel()
        out["exchange-missing"] = channel_error(
            lambda: ch.exchange_declare(f"{p}.nope", passive=True)
        )
        ch = conn.channel()
        out["bind-missing-queue"] = channel_error(lambda: ch.queue_bind(f"{p}.nope", f"{p}.ex"))
        ch = conn.channel()
        out["bind-default"] = channel_error(lambda: ch.queue_bind(f"{p}.args", ""))
        ch = conn.channel()

        def publish_missing() -> None:
            ch.basic_publish(f"{p}.nope", "k", b"x")
            ch.queue_declare(f"{p}.args", passive=True)  # a round trip to see the close

        out["publish-missing-exchange"] = channel_error(publish_missing)
        ch = conn.channel()

        def bad_ack() -> None:
            ch.basic_ack(99)
            ch.queue_declare(f"{p}.args", passive=True)

        out["unknown-delivery-tag"] = channel_error(bad_ack)
        ch = conn.channel()
        out["consume-missing"] = channel_error(
            lambda: ch.basic_consume(f"{p}.none", lambda *a: None)
        )
        ch = conn.channel()
        ch.queue_declare(f"{p}.excl", exclusive=True)
        other = connect(target)
        try:
            och = other.channel()
            out["exclusive-other"] = channel_error(lambda: och.queue_declare(f"{p}.excl"))
            och = other.channel()
            out["exclusive-passive"] = channel_error(
                lambda: och.queue_declare(f"{p}.excl", passive=True)
            )
        finally:
            other.close()
        ch = conn.channel()
        out["delete-missing"] = ch.queue_delete(f"{p}.none").method.message_count
        ch.basic_publish("", f"{p}.args", b"x")
        out["if-empty"] = channel_error(lambda: ch.queue_delete(f"{p}.args", if_empty=True))
        ch = conn.channel()
        out["bad-expiration"] = channel_error(
            lambda: (
                ch.basic_publish("", f"{p}.args", b"x", pika.BasicProperties(expiration="soon")),
                ch.queue_declare(f"{p}.args", passive=True),
            )
        )
        ch = conn.channel()
        out["bad-ttl-arg"] = channel_error(
            lambda: ch.queue_declare(f"{p}.neg", arguments={"x-message-ttl": -1})
        )
        ch = conn.channel()
        out["prefetch-size"] = channel_error(lambda: ch.basic_qos(prefetch_size=10))
        return out
    finally:
        if conn.is_open:
            conn.close()
        cleanup = connect(target)
        cch = cleanup.channel()
        cch.queue_delete(f"{p}.args")
        cch.exchange_delete(f"{p}.ex")
        cleanup.close()


@scenario
def mandatory_confirms_get(target: Target, p: str) -> Any:
    conn = connect(target)
    ch = conn.channel()
    out: dict[str, Any] = {}
    returned: list[Any] = []
    try:
        ch.confirm_delivery()
        ch.add_on_return_callback(
            lambda c, m, props, body: returned.append(
                (
                    m.reply_code,
                    m.reply_text,
                    m.exchange,
                    m.routing_key,
                    body,
                    props.content_type,
                    props.headers,
                )
            )
        )
        try:
            ch.basic_publish(
                "",
                f"{p}.nowhere",
                b"lost",
                pika.BasicProperties(content_type="text/plain", headers={"a": 1}),
                mandatory=True,
            )
        except pika.exceptions.UnroutableError as exc:
            out["unroutable"] = [(m.method.reply_code, m.body) for m in exc.messages]
        ch.basic_publish("", f"{p}.nowhere", b"dropped")  # not mandatory: confirmed
        q = ch.queue_declare(f"{p}.q")
        out["declare-ok"] = (q.method.message_count, q.method.consumer_count)
        for i in range(3):
            ch.basic_publish(
                "",
                f"{p}.q",
                str(i).encode(),
                pika.BasicProperties(
                    content_type="application/json",
                    correlation_id="c",
                    reply_to="r",
                    message_id="m",
                    type="t",
                    app_id="a",
                    user_id="guest",
                    delivery_mode=2,
                    timestamp=1700000000,
                    headers={"s": "x", "i": 7, "b": True, "l": [1, "a"], "t": {"n": None}},
                ),
            )
        q = ch.queue_declare(f"{p}.q", passive=True)
        out["declare-ok-2"] = q.method.message_count
        m, props, body = ch.basic_get(f"{p}.q")
        out["get"] = (
            m.message_count,
            m.delivery_tag,
            m.redelivered,
            m.exchange,
            m.routing_key,
            body,
        )
        out["props"] = {k: v for k, v in vars(props).items()}
        ch.basic_ack(m.delivery_tag)
        out["purged"] = ch.queue_purge(f"{p}.q").method.message_count
        ch.basic_consume(f"{p}.q", lambda *a: None, consumer_tag="ctag")
        q = ch.queue_declare(f"{p}.q", passive=True)
        out["consumers"] = q.method.consumer_count
        return out
    finally:
        ch.queue_delete(f"{p}.q")
        conn.close()


@scenario
def tx_commit_rollback(target: Target, p: str) -> Any:
    conn = connect(target)
    ch = conn.channel()
    try:
        ch.queue_declare(f"{p}.tx")
        ch.tx_select()
        ch.basic_publish("", f"{p}.tx", b"rolled-back")
        ch.tx_rollback()
        ch.basic_publish("", f"{p}.tx", b"committed")
        before = ch.queue_declare(f"{p}.tx", passive=True).method.message_count
        ch.tx_commit()
        after = ch.queue_declare(f"{p}.tx", passive=True).method.message_count
        return before, after, drain(ch, f"{p}.tx")
    finally:
        ch.queue_delete(f"{p}.tx")
        conn.close()


@scenario
def queue_lifecycles(target: Target, p: str) -> Any:
    out: dict[str, Any] = {}
    conn = connect(target)
    ch = conn.channel()
    cancelled: list[str] = []
    # server-named queue
    q = ch.queue_declare("", exclusive=True).method.queue
    out["server-named"] = q.startswith("amq.gen-")
    # auto-delete: deleted when its last consumer goes
    ch.queue_declare(f"{p}.auto", auto_delete=True)
    tag = ch.basic_consume(f"{p}.auto", lambda *a: None)
    ch.basic_cancel(tag)
    time.sleep(0.2)
    probe = conn.channel()
    out["auto-delete"] = channel_error(lambda: probe.queue_declare(f"{p}.auto", passive=True))[0]
    # a deleted queue cancels its consumers (consumer_cancel_notify)
    ch.queue_declare(f"{p}.gone")
    ch.basic_consume(f"{p}.gone", lambda *a: None, consumer_tag="watcher")
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    other = connect(target)
    other.channel().queue_delete(f"{p}.gone")
    other.close()
    conn.process_data_events(0.5)
    out["cancelled"] = cancelled
    # exclusive queues die with their connection
    ch.queue_declare(f"{p}.mine", exclusive=True)
    conn.close()
    time.sleep(0.2)
    conn = connect(target)
    probe = conn.channel()
    out["exclusive-gone"] = channel_error(lambda: probe.queue_declare(f"{p}.mine", passive=True))[0]
    conn.close()
    return out


# -- the tests ------------------------------------------------------------------------------


def _run(name: str, target: Target) -> Any:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    result = SCENARIOS[name](target, prefix)
    return _normalize(result, prefix)


def _normalize(value: Any, prefix: str) -> Any:
    if isinstance(value, str):
        return value.replace(prefix, "P")
    if isinstance(value, bytes):
        return value.replace(prefix.encode(), b"P")
    if isinstance(value, dict):
        return {_normalize(k, prefix): _normalize(v, prefix) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalize(v, prefix) for v in value]
    return value


@pytest.fixture(scope="module")
def rabbit_results() -> dict[str, Any]:
    return {}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_differential(name: str, conveyor: RunningAmqp) -> None:
    ours = _run(name, ("127.0.0.1", conveyor.port))
    if not _rabbit_up():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672 to compare with")
    theirs = _run(name, ("127.0.0.1", 5672))
    assert ours == theirs
