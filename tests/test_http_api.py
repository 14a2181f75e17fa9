"""The native HTTP API against a real ``conveyor serve`` subprocess."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from conveyor.protocols.http import wire
from serverproc import ServerProcess


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("http"), amqp=False) as s:
        yield s


@pytest.fixture
def http(srv: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.http_url, timeout=30) as c:
        yield c


_n = iter(range(1_000_000))


@pytest.fixture
def queue(http: httpx.Client) -> str:
    name = f"q{next(_n)}-{time.monotonic_ns()}"
    assert http.put(f"/v1/queues/{name}", json={"visibility_timeout": 30}).status_code == 200
    return name


def _error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def test_send_receive_ack_roundtrip(http: httpx.Client, queue: str) -> None:
    r = http.post(
        f"/v1/queues/{queue}/messages",
        json={"body": "hello", "headers": {"n": 1, "raw": {"$base64": "AAE="}},
              "properties": {"content_type": "text/plain"}, "priority": 2},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    msg_id = r.json()["id"]
    r = http.post(f"/v1/queues/{queue}/receive", json={"max_messages": 10})
    (m,) = r.json()["messages"]
    assert m["id"] == msg_id
    assert m["body"] == "hello" and m["body_encoding"] == "utf-8"
    assert m["headers"] == {"n": 1, "raw": {"$base64": "AAE="}}
    assert m["properties"]["content_type"] == "text/plain"
    assert m["receive_count"] == 1 and m["receipt"]
    assert http.post(f"/v1/queues/{queue}/ack", json={"receipt": m["receipt"]}).status_code == 204
    # the lease is gone: a second ack is a stale receipt
    _error(
        http.post(f"/v1/queues/{queue}/ack", json={"receipt": m["receipt"]}), 409, "receipt_invalid"
    )
    assert http.get(f"/v1/queues/{queue}/stats").json()["ready"] == 0


def test_binary_body_travels_base64(http: httpx.Client, queue: str) -> None:
    raw = bytes(range(256))
    r = http.post(
        f"/v1/queues/{queue}/messages",
        json={"body": base64.b64encode(raw).decode(), "body_encoding": "base64"},
    )
    assert r.status_code == 200
    (m,) = http.post(f"/v1/queues/{queue}/receive", json={}).json()["messages"]
    assert m["body_encoding"] == "base64"
    assert base64.b64decode(m["body"]) == raw


def test_batch_send_receive_ack_nack_extend(http: httpx.Client, queue: str) -> None:
    msgs = [{"body": f"m{i}"} for i in range(5)]
    r = http.post(f"/v1/queues/{queue}/messages/batch", json={"messages": msgs})
    assert len(r.json()["results"]) == 5
    got = http.post(f"/v1/queues/{queue}/receive", json={"max_messages": 5}).json()["messages"]
    assert [m["body"] for m in got] == [f"m{i}" for i in range(5)]
    receipts = [m["receipt"] for m in got]
    r = http.post(f"/v1/queues/{queue}/extend/batch", json={"receipts": receipts, "timeout": 60})
    assert r.json() == {"ok": 5, "failed": []}
    r = http.post(f"/v1/queues/{queue}/extend", json={"receipt": receipts[0], "timeout": 60})
    assert r.status_code == 204
    r = http.post(f"/v1/queues/{queue}/ack/batch", json={"receipts": [*receipts[:2], "bogus"]})
    assert r.json() == {"ok": 2, "failed": ["bogus"]}
    r = http.post(f"/v1/queues/{queue}/nack/batch", json={"receipts": receipts[2:4]})
    assert r.json()["ok"] == 2
    r = http.post(f"/v1/queues/{queue}/nack", json={"receipt": receipts[4], "delay": 0})
    assert r.status_code == 204
    stats = http.get(f"/v1/queues/{queue}/stats").json()
    assert stats["ready"] == 3 and stats["in_flight"] == 0


def test_long_poll_returns_when_a_message_arrives(
    http: httpx.Client, queue: str, srv: ServerProcess
) -> None:
    def later() -> None:
        time.sleep(0.3)
        httpx.post(f"{srv.http_url}/v1/queues/{queue}/messages", json={"body": "late"})

    sender = threading.Thread(target=later)
    sender.start()
    started = time.monotonic()
    r = http.post(f"/v1/queues/{queue}/receive", json={"wait": 20})
    elapsed = time.monotonic() - started
    sender.join()
    assert [m["body"] for m in r.json()["messages"]] == ["late"]
    assert 0.2 < elapsed < 5


def test_long_poll_times_out_empty(http: httpx.Client, queue: str) -> None:
    started = time.monotonic()
    r = http.post(f"/v1/queues/{queue}/receive", json={"wait": 0.5})
    assert r.json() == {"messages": []}
    assert time.monotonic() - started >= 0.45


def test_queue_lifecycle(http: httpx.Client) -> None:
    name = f"life-{time.monotonic_ns()}"
    r = http.put(
        f"/v1/queues/{name}",
        json={"visibility_timeout": 5, "max_receives": 3, "dead_letter": name + "-dlq"},
    )
    assert r.status_code == 200
    assert r.json()["options"]["max_receives"] == 3
    # idempotent with equal options, conflict with different ones
    assert (
        http.put(
            f"/v1/queues/{name}",
            json={"visibility_timeout": 5, "max_receives": 3, "dead_letter": name + "-dlq"},
        ).status_code
        == 200
    )
    _error(http.put(f"/v1/queues/{name}", json={"visibility_timeout": 6}), 409, "queue_exists")
    assert http.get(f"/v1/queues/{name}").json()["name"] == name
    r = http.patch(f"/v1/queues/{name}", json={"visibility_timeout": 7})
    assert r.json()["options"]["visibility_timeout"] == 7
    names = [q["name"] for q in http.get("/v1/queues", params={"prefix": name}).json()["queues"]]
    assert name in names
    http.post(f"/v1/queues/{name}/messages", json={"body": "a"})
    http.post(f"/v1/queues/{name}/messages", json={"body": "b"})
    peeked = http.get(f"/v1/queues/{name}/peek", params={"max_messages": 1}).json()["messages"]
    assert [m["body"] for m in peeked] == ["a"] and peeked[0]["receipt"] is None
    assert http.post(f"/v1/queues/{name}/purge").json() == {"purged": 2}
    http.post(f"/v1/queues/{name}/messages", json={"body": "c"})
    assert http.delete(f"/v1/queues/{name}").json() == {"deleted": 1}
    _error(http.get(f"/v1/queues/{name}"), 404, "queue_not_found")


def test_dead_letter_and_redrive(http: httpx.Client) -> None:
    name = f"dl-{time.monotonic_ns()}"
    http.put(f"/v1/queues/{name}-dlq").raise_for_status()
    http.put(
        f"/v1/queues/{name}", json={"max_receives": 1, "dead_letter": f"{name}-dlq"}
    ).raise_for_status()
    http.post(f"/v1/queues/{name}/messages", json={"body": "poison"})
    (m,) = http.post(f"/v1/queues/{name}/receive", json={}).json()["messages"]
    http.post(f"/v1/queues/{name}/nack", json={"receipt": m["receipt"], "requeue": False})
    dead = http.get(f"/v1/queues/{name}-dlq/peek").json()["messages"]
    assert [d["body"] for d in dead] == ["poison"]
    assert dead[0]["deaths"][0]["reason"] == "rejected"
    assert http.post(f"/v1/queues/{name}-dlq/redrive", json={}).json() == {"moved": 1}
    assert http.get(f"/v1/queues/{name}/stats").json()["ready"] == 1


def test_exchanges_bindings_publish(http: httpx.Client) -> None:
    x = f"x-{time.monotonic_ns()}"
    a, b = f"{x}-a", f"{x}-b"
    for q in (a, b):
        http.put(f"/v1/queues/{q}").raise_for_status()
    r = http.put(f"/v1/exchanges/{x}", json={"type": "topic"})
    assert r.json()["type"] == "topic"
    assert http.get(f"/v1/exchanges/{x}").json()["name"] == x
    assert x in [e["name"] for e in http.get("/v1/exchanges").json()["exchanges"]]
    assert (
        http.post(
            f"/v1/exchanges/{x}/bind", json={"queue": a, "routing_key": "order.*"}
        ).status_code
        == 204
    )
    assert (
        http.post(f"/v1/exchanges/{x}/bind", json={"queue": b, "routing_key": "#"}).status_code
        == 204
    )
    bindings = http.get("/v1/bindings", params={"exchange": x}).json()["bindings"]
    assert {bd["destination"] for bd in bindings} == {a, b}
    r = http.post(f"/v1/exchanges/{x}/publish", json={"body": "o1", "routing_key": "order.new"})
    assert r.json()["routed"] == 2
    r = http.post(
        f"/v1/exchanges/{x}/publish/batch",
        json={
            "messages": [
                {"body": "p1", "routing_key": "payment.new"},
                {"body": "o2", "routing_key": "order.x"},
            ]
        },
    )
    assert [p["routed"] for p in r.json()["results"]] == [1, 2]
    assert (
        http.post(f"/v1/exchanges/{x}/unbind", json={"queue": b, "routing_key": "#"}).status_code
        == 204
    )
    assert (
        http.post(
            f"/v1/exchanges/{x}/publish", json={"body": "o3", "routing_key": "order.x"}
        ).json()["routed"]
        == 1
    )
    # the default exchange routes by queue name
    r = http.post("/v1/exchanges/amq.default/publish", json={"body": "direct", "routing_key": a})
    assert r.json()["routed"] == 1
    assert http.get(f"/v1/queues/{a}/stats").json()["ready"] == 4
    assert http.delete(f"/v1/exchanges/{x}").status_code == 204
    _error(http.get(f"/v1/exchanges/{x}"), 404, "exchange_not_found")


M = "/v1/queues/{q}/messages"
BAD = "invalid_argument"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("POST", M, {"content": b"{not json"}, 400, BAD),
        ("POST", M, {"json": {"body": 5}}, 400, BAD),
        ("POST", M, {"json": {"body": "x", "prio": 1}}, 400, BAD),
        ("POST", M, {"json": {"body": "x", "priority": 1.5}}, 400, BAD),
        ("POST", M, {"json": {"body": "x", "delay": "soon"}}, 400, BAD),
        ("POST", M, {"json": {"body": "!", "body_encoding": "base64"}}, 400, BAD),
        ("POST", M, {"json": [1, 2]}, 400, BAD),
        ("POST", "/v1/queues/{q}/receive", {"json": {"max_messages": 0}}, 400, BAD),
        ("POST", "/v1/queues/{q}/receive", {"json": {"wait": -1}}, 400, BAD),
        ("POST", "/v1/queues/{q}/ack", {"json": {"receipt": "nonsense"}}, 409, "receipt_invalid"),
        ("POST", "/v1/queues/{q}/ack", {"json": {}}, 400, BAD),
        ("POST", "/v1/queues/{q}/nack", {"json": {"receipt": "1-1"}}, 409, "receipt_invalid"),
        ("PUT", "/v1/queues/{q}x", {"json": {"visibility_timeout": "long"}}, 400, BAD),
        ("PUT", "/v1/queues/{q}y", {"json": {"no_such_option": 1}}, 400, BAD),
        ("PUT", "/v1/queues/bad%20name", {"json": {}}, 400, "invalid_name"),
        ("GET", "/v1/queues/nope-{q}", {}, 404, "queue_not_found"),
        ("POST", "/v1/queues/nope-{q}/messages", {"json": {"body": "x"}}, 404, "queue_not_found"),
        ("GET", "/v1/queues/{q}/peek", {"params": {"max_messages": "many"}}, 400, BAD),
        ("DELETE", "/v1/queues/{q}", {"params": {"if_empty": "perhaps"}}, 400, BAD),
        ("PUT", "/v1/exchanges/x-{q}", {"json": {"type": "broadcast"}}, 400, BAD),
        ("POST", "/v1/exchanges/x-{q}/bind", {"json": {"routing_key": "k"}}, 400, BAD),
        ("POST", "/v1/exchanges/none-{q}/publish", {"json": {"body": "x"}}, 404,
         "exchange_not_found"),
        ("GET", "/v1/nothing-here", {}, 404, "not_found"),
        # the paths SQS requests go to, without an SQS request: the same 404
        ("GET", "/", {}, 404, "not_found"),
        ("POST", "/000000000000/{q}", {"json": {"body": "x"}}, 404, "not_found"),
        ("DELETE", "/v1/queues/{q}/stats", {}, 405, "method_not_allowed"),
    ],
)  # fmt: skip
def test_client_mistakes_are_4xx_with_the_error_shape(
    http: httpx.Client,
    queue: str,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    code: str,
) -> None:
    r = http.request(method, path.format(q=queue), **kwargs)
    _error(r, status, code)


def test_oversize_body_is_413(http: httpx.Client, queue: str) -> None:
    r = http.post(f"/v1/queues/{queue}/messages", json={"body": "x" * (2 * 1024 * 1024)})
    _error(r, 413, "message_too_large")


def test_oversize_request_is_413(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, ["--max-request-size", "1000"], amqp=False) as s:
        r = httpx.post(f"{s.http_url}/v1/queues/q/messages", json={"body": "x" * 5000})
        _error(r, 413, "message_too_large")


def test_healthz_metrics_and_openapi(http: httpx.Client, queue: str) -> None:
    assert http.get("/healthz").json()["status"] == "ok"
    http.post(f"/v1/queues/{queue}/messages", json={"body": "m"})
    http.post(f"/v1/queues/{queue}/receive", json={})
    text = http.get("/metrics").text
    for needle in (
        f'conveyor_queue_in_flight{{queue="{queue}"}} 1.0',
        f'conveyor_messages_sent_total{{queue="{queue}"}} 1.0',
        "conveyor_receive_seconds_bucket",
        "conveyor_publish_to_deliver_seconds_bucket",
        'conveyor_connections{protocol="http"}',
    ):
        assert needle in text
    doc = http.get("/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.")


# -- the OpenAPI document against the live server --------------------------------------


class _Client:
    """Calls operations by the OpenAPI document's operationId, checking each answer
    against the response schema the document names."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        self.doc = http.get("/v1/openapi.json").json()
        self.ops: dict[str, tuple[str, str, dict[str, Any]]] = {}
        for path, methods in self.doc["paths"].items():
            for method, op in methods.items():
                self.ops[op["operationId"]] = (method.upper(), path, op)
        self.called: set[str] = set()

    def __call__(self, operation: str, json: Any = None, **params: str) -> Any:
        method, path, op = self.ops[operation]
        path_params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        query_params = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
        assert set(params) <= path_params | query_params, (operation, params)
        url = path.format(**{k: v for k, v in params.items() if k in path_params})
        query = {k: v for k, v in params.items() if k in query_params}
        if json is not None:
            assert "requestBody" in op, operation
        r = self.http.request(method, url, json=json, params=query)
        assert r.status_code < 400, (operation, r.status_code, r.text)
        self.called.add(operation)
        status = str(r.status_code)
        assert status in op["responses"], (operation, status)
        content = op["responses"][status].get("content")
        if content is None:
            assert r.content == b""
            return None
        ref = content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        # decode with the struct the document names: it fails if the shapes differ
        msgspec.json.decode(r.content, type=getattr(wire, ref))
        return r.json()


def test_openapi_document_describes_the_live_server(http: httpx.Client) -> None:
    api = _Client(http)
    q, dlq, x = (
        f"oa-{time.monotonic_ns()}",
        f"oa-dlq-{time.monotonic_ns()}",
        f"oax-{time.monotonic_ns()}",
    )
    api("createQueue", {}, queue=dlq)
    api("createQueue", {"max_receives": 1, "dead_letter": dlq}, queue=q)
    api("getQueue", queue=q)
    api("updateQueue", {"max_receives": 1, "dead_letter": dlq, "visibility_timeout": 9}, queue=q)
    api("listQueues", prefix="oa-")
    api("send", {"body": "one"}, queue=q)
    api("sendBatch", {"messages": [{"body": "two"}, {"body": "three"}]}, queue=q)
    api("peek", queue=q, max_messages="2")
    api("queueStats", queue=q)
    got = api("receive", {"max_messages": 3}, queue=q)["messages"]
    r = [m["receipt"] for m in got]
    api("extend", {"receipt": r[0], "timeout": 10}, queue=q)
    api("extendBatch", {"receipts": r, "timeout": 10}, queue=q)
    api("ack", {"receipt": r[0]}, queue=q)
    api("ackBatch", {"receipts": [r[1]]}, queue=q)
    api("nack", {"receipt": r[2], "requeue": False}, queue=q)
    (again,) = api("receive", {}, queue=dlq)["messages"] or [None]
    api("nackBatch", {"receipts": [again["receipt"]]}, queue=dlq)
    api("redrive", {}, queue=dlq)
    api("purgeQueue", queue=q)
    api("declareExchange", {"type": "fanout"}, exchange=x)
    api("getExchange", exchange=x)
    api("listExchanges")
    api("bind", {"queue": q}, exchange=x)
    api("listBindings", exchange=x)
    api("publish", {"body": "p"}, exchange=x)
    api("publishBatch", {"messages": [{"body": "p2"}]}, exchange=x)
    api("unbind", {"queue": q}, exchange=x)
    api("deleteExchange", exchange=x)
    api("deleteQueue", queue=q)
    api("deleteQueue", queue=dlq)
    assert api.called == set(api.ops), set(api.ops) - api.called
    # and the server has no /v1 route the document leaves out
    for path, methods in api.doc["paths"].items():
        url = path.replace("{queue}", "nope").replace("{exchange}", "nope")
        for method in ("GET", "PUT", "POST", "PATCH", "DELETE"):
            if method.lower() in methods:
                continue
            resp = http.request(method, url)
            assert resp.status_code == 405, (method, path, resp.status_code)
