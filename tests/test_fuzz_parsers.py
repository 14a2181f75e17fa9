"""Hostile input (docs/reliability.md).

- Every network parser (tools/fuzz_parsers.py) for a fixed number of inputs: each
  input parses or is refused in the protocol's own terms. Longer runs:
  ``python tools/fuzz_parsers.py --fuzz-seconds N``.
- Garbage to each listener of a real server gets a protocol error, the server logs no
  traceback, and other connections keep working.
- Names cannot escape the data directory or reach internal objects; a client without
  the token (HTTP) or with a wrong SigV4 key (SQS) or user (AMQP) touches nothing.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import boto3
import httpx
import pika
import pika.exceptions
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tools.fuzz_parsers import SEEDS, TARGETS

from serverproc import ServerProcess

EXAMPLES = int(os.environ.get("CONVEYOR_FUZZ_EXAMPLES", "300"))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_parser(name: str) -> None:
    target = TARGETS[name]
    seeds = SEEDS.get(name, [b""])

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.one_of(
            st.binary(max_size=400),
            st.tuples(st.sampled_from(seeds), st.integers(0, 400), st.binary(max_size=20)).map(
                lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]
            ),
        )
    )
    def run(data: bytes) -> None:
        target(data)

    run()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    s = ServerProcess(tmp_path_factory.mktemp("hostile"), kafka=False).start()
    yield s  # type: ignore[misc]
    s.stop()


GARBAGE = [
    b"\x00" * 64,
    b"\xff" * 4096,
    b"GET / HTTP/9.9\r\n\r\n",
    b"AMQP\x00\x00\x09\x01" + b"\x01\x00\x00\xff\xff\xff\xff" + b"x" * 100,
    b"POST /v1/queues/x/messages HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    os.urandom(2048),
]


def _garbage(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def test_garbage_to_each_listener_others_keep_working(srv: ServerProcess) -> None:
    assert srv.amqp_port is not None
    # A healthy AMQP connection and HTTP client held open throughout.
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", srv.amqp_port))
    ch = conn.channel()
    ch.queue_declare("steady")
    ch.confirm_delivery()
    http = httpx.Client(base_url=srv.http_url, timeout=10)
    for i, data in enumerate(GARBAGE):
        http_answer = _garbage(srv.http_port, data)
        assert http_answer == b"" or http_answer.startswith(b"HTTP/1."), http_answer[:100]
        if http_answer:
            status = int(http_answer.split()[1])
            assert 400 <= status < 500 or status == 505, http_answer[:200]
        amqp_answer = _garbage(srv.amqp_port, data)
        # A wrong header is answered with AMQP's protocol header; a broken frame after
        # a good header with Connection.Close (frame type 1) or nothing.
        assert amqp_answer in (b"", b"AMQP\x00\x00\x09\x01") or amqp_answer[:1] == b"\x01", (
            amqp_answer[:100]
        )
        ch.basic_publish("", "steady", f"still {i}".encode())
        r = http.post("/v1/queues/steady/receive", json={"max_messages": 1})
        assert r.status_code == 200 and r.json()["messages"][0]["body"] == f"still {i}"
        http.post("/v1/queues/steady/ack", json={"receipt": r.json()["messages"][0]["receipt"]})
    # Malformed requests that reach the handlers are 4xx, never 500.
    bad = [
        ("POST", "/v1/queues/steady/messages", b'{"body": "\xda"}'),
        ("POST", "/v1/queues/steady/messages", b"[[[[[[[[[[[[[[[[[[[["),
        ("POST", "/v1/queues/steady/receive", b'{"max_messages": 1e400}'),
        ("POST", "/v1/queues/steady/messages", b'{"body": "x", "headers": {"a": {"$base64": 1}}}'),
        ("PUT", "/v1/queues/" + "q" * 5000, b""),
        ("GET", "/v1/queues/steady/peek?max_messages=abc", b""),
        ("DELETE", "/v1/queues/steady?if_unused=maybe", b""),
    ]
    for method, path, body in bad:
        r = http.request(method, path, content=body)
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
    for body in (b'{"QueueUrl": "\xda"}', b"{", b'{"QueueUrl": 5}'):
        r = http.post(
            "/",
            content=body,
            headers={
                "X-Amz-Target": "AmazonSQS.SendMessage",
                "Content-Type": "application/x-amz-json-1.0",
            },
        )
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
    r = http.post(
        "/", content=b"Action=SendMessage&QueueUrl=%ff%fe&MessageBody=%00", headers={
            "Content-Type": "application/x-www-form-urlencoded"
        }
    )  # fmt: skip
    assert 400 <= r.status_code < 500, r.text
    assert http.get("/healthz").status_code == 200
    conn.close()
    http.close()
    out = srv.output()
    assert "ERROR conveyor" not in out
    # aiohttp logs each malformed HTTP request (already answered 400) with a traceback of
    # its parser's exception; nothing else may log one.
    assert out.count("Traceback") == out.count("aiohttp.http_exceptions.")


@pytest.mark.parametrize(
    "name",
    ["../escape", "..", "a/b", "/etc/passwd", "con\x00trol", "x" * 300, "", "sqlite_master",
     "conveyor.db", "q;DROP TABLE messages", "%2e%2e"],
)  # fmt: skip
def test_names_cannot_escape_or_collide(srv: ServerProcess, name: str) -> None:
    url = srv.http_url
    before = sorted(p.name for p in srv.data_dir.iterdir())
    # Native: the name goes in the path; percent-encode everything.
    from urllib.parse import quote

    r = httpx.put(f"{url}/v1/queues/{quote(name, safe='')}")
    if r.status_code == 200:
        # Accepted names are plain rows in the queues table: no files, no schema objects.
        assert r.json()["name"] == name
        assert name.replace(".", "").replace("_", "").replace("-", "").isalnum()
        httpx.delete(f"{url}/v1/queues/{quote(name, safe='')}").raise_for_status()
    else:
        assert r.status_code in (400, 404, 405), (name, r.status_code, r.text)
    r = httpx.put(f"{url}/v1/exchanges/{quote(name, safe='')}", json={"type": "direct"})
    if r.status_code == 200:
        httpx.delete(f"{url}/v1/exchanges/{quote(name, safe='')}")
    else:
        assert 400 <= r.status_code < 500
    assert sorted(p.name for p in srv.data_dir.iterdir()) == before
    assert not (srv.data_dir.parent / "escape").exists()
    assert httpx.get(f"{url}/v1/queues/steady2").status_code in (200, 404)


def test_credentials_scope_each_protocol(tmp_path: Path) -> None:
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text('[users]\nalice = "a-secret"\n[sqs_access_keys]\nAKIDALICE = "sqs-secret"\n')
    s = ServerProcess(tmp_path, ["--config", str(cfg)], token="tok-1", kafka=False).start()
    try:
        url = s.http_url
        ok = {"Authorization": "Bearer tok-1"}
        httpx.put(f"{url}/v1/queues/private", headers=ok).raise_for_status()
        httpx.post(f"{url}/v1/queues/private/messages", json={"body": "x"}, headers=ok)
        for headers in ({}, {"Authorization": "Bearer tok-2"}, {"Authorization": "tok-1"}):
            for method, path in [
                ("GET", "/v1/queues"),
                ("POST", "/v1/queues/private/receive"),
                ("POST", "/v1/queues/private/purge"),
                ("DELETE", "/v1/queues/private"),
                ("GET", "/metrics"),
                ("GET", "/nope"),
            ]:
                r = httpx.request(method, url + path, headers=headers)
                assert r.status_code == 401, (headers, path, r.status_code)
                assert "private" not in r.text
        # SQS: unsigned and wrongly signed requests are refused.
        for key, secret in [("AKIDALICE", "wrong"), ("AKIDOTHER", "sqs-secret")]:
            sqs = boto3.client(
                "sqs", endpoint_url=url, region_name="us-east-1", aws_access_key_id=key,
                aws_secret_access_key=secret, config=Config(retries={"total_max_attempts": 1}),
            )  # fmt: skip
            for call in (
                lambda c: c.list_queues(),
                lambda c: c.purge_queue(QueueUrl=f"{url}/000000000000/private"),
                lambda c: c.delete_queue(QueueUrl=f"{url}/000000000000/private"),
                lambda c: c.receive_message(QueueUrl=f"{url}/000000000000/private"),
            ):
                with pytest.raises(ClientError) as err:
                    call(sqs)
                assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        good = boto3.client(
            "sqs", endpoint_url=url, region_name="us-east-1", aws_access_key_id="AKIDALICE",
            aws_secret_access_key="sqs-secret",
        )  # fmt: skip
        assert any(u.endswith("/private") for u in good.list_queues()["QueueUrls"])
        # AMQP: a wrong user or password gets nothing; guest is not configured here.
        assert s.amqp_port is not None
        for user, pw in [("alice", "wrong"), ("guest", "guest"), ("mallory", "a-secret")]:
            with pytest.raises(pika.exceptions.AMQPConnectionError):
                pika.BlockingConnection(
                    pika.ConnectionParameters(
                        "127.0.0.1", s.amqp_port, credentials=pika.PlainCredentials(user, pw)
                    )
                )
        # One vhost only: another is refused (vhost isolation does not exist).
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            pika.BlockingConnection(
                pika.ConnectionParameters(
                    "127.0.0.1", s.amqp_port, virtual_host="other",
                    credentials=pika.PlainCredentials("alice", "a-secret"),
                )
            )  # fmt: skip
        stats = httpx.get(f"{url}/v1/queues/private/stats", headers=ok).json()
        assert stats["ready"] == 1  # nothing above read, purged or deleted it
    finally:
        s.stop()
