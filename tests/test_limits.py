"""Configurable limits of `conveyor serve` and the log under attack or a full disk.

A real server with small limits (connections, queues, messages per receive, message
and request size); native requests through httpx, SQS through boto3. Each limit, when
hit, gives a clear error in the protocol's own terms. Malformed HTTP requests and
commits on a full disk are logged as rate-limited WARNING lines, not tracebacks.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from click.testing import CliRunner

from conveyor.cli.main import cli
from conveyor.errors import InvalidArgument
from conveyor.logutil import Throttle
from conveyor.server.config import load_config
from serverproc import ServerProcess

pytestmark = pytest.mark.timeout(60)

MAX_CONNECTIONS = 4
MAX_QUEUES = 4
MAX_RECEIVE = 100
MAX_MESSAGE = 100_000
MAX_REQUEST = 2 * 1024 * 1024
SQS_MAX = 1_048_576  # SQS's default MaximumMessageSize


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = ServerProcess(
        tmp_path_factory.mktemp("limits"),
        [
            "--max-connections", str(MAX_CONNECTIONS),
            "--max-queues", str(MAX_QUEUES),
            "--max-messages-per-receive", str(MAX_RECEIVE),
            "--max-message-size", str(MAX_MESSAGE),
            "--max-request-size", str(MAX_REQUEST),
        ],
        amqp=False,
        kafka=False,
    ).start()  # fmt: skip
    yield s
    s.stop()


def _sqs(url: str) -> Any:
    return boto3.client(
        "sqs", endpoint_url=url, region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="x",
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
    )  # fmt: skip


def _admitted_clients(url: str, n: int) -> list[httpx.Client]:
    """``n`` keep-alive connections the server has admitted (earlier, closed ones may
    take a moment to leave its connection table)."""
    deadline = time.monotonic() + 5
    clients: list[httpx.Client] = []
    while len(clients) < n:
        c = httpx.Client(base_url=url, timeout=10)
        if c.get("/v1/queues").status_code == 200:
            clients.append(c)
            continue
        c.close()
        assert time.monotonic() < deadline, "the server never admitted the connections"
        time.sleep(0.05)
    return clients


# -- connections -----------------------------------------------------------------------


def test_connections_beyond_the_limit_get_503_at_once(srv: ServerProcess) -> None:
    url = srv.http_url
    httpx.put(f"{url}/v1/queues/polled").raise_for_status()

    async def hold_polls() -> tuple[list[int], float, httpx.Response, float]:
        clients = [httpx.AsyncClient(base_url=url, timeout=10) for _ in range(MAX_CONNECTIONS)]
        try:
            for c in clients:  # open each connection and get it admitted
                assert (await c.get("/v1/queues")).status_code == 200
            t0 = time.monotonic()
            polls = [
                asyncio.ensure_future(
                    c.post("/v1/queues/polled/receive", json={"max_messages": 1, "wait": 2})
                )
                for c in clients
            ]
            await asyncio.sleep(0.3)
            t1 = time.monotonic()
            async with httpx.AsyncClient(base_url=url, timeout=10) as extra:
                refused = await extra.post("/v1/queues/polled/receive", json={"wait": 2})
            refused_after = time.monotonic() - t1
            answers = await asyncio.gather(*polls)
            return [r.status_code for r in answers], time.monotonic() - t0, refused, refused_after
        finally:
            for c in clients:
                await c.aclose()

    statuses, held_for, refused, refused_after = asyncio.run(hold_polls())
    assert statuses == [200] * MAX_CONNECTIONS
    assert held_for >= 1.9  # every admitted long poll was held to its end
    assert refused_after < 1.0  # the extra connection was answered at once, not held
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["Connection"] == "close"
    assert refused.json()["error"]["code"] == "too_many_connections"
    assert str(MAX_CONNECTIONS) in refused.json()["error"]["message"]


def test_connection_limit_in_sqs_terms_and_slots_free_up(srv: ServerProcess) -> None:
    url = srv.http_url
    held = _admitted_clients(url, MAX_CONNECTIONS)
    try:
        # SQS JSON protocol (boto3): ServiceUnavailable, 503.
        sqs = _sqs(url)
        with pytest.raises(ClientError) as err:
            sqs.list_queues()
        assert err.value.response["Error"]["Code"] == "ServiceUnavailable"
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert err.value.response["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "1"
        # SQS query protocol: the XML error document.
        r = httpx.post(url + "/", data={"Action": "ListQueues"})
        assert r.status_code == 503
        assert "<Code>ServiceUnavailable</Code>" in r.text
        # Health checks and scrapes are still answered (and the connection closed).
        r = httpx.get(url + "/healthz")
        assert r.status_code == 200 and r.headers["Connection"] == "close"
        metrics = httpx.get(url + "/metrics").text
        assert re.search(r'conveyor_connections\{protocol="http"\} [1-9]', metrics)
        # The admitted connections keep working.
        for c in held:
            assert c.get("/v1/queues").status_code == 200
        # A slot that frees up is given to the next connection.
        held.pop().close()
        held.extend(_admitted_clients(url, 1))
    finally:
        for c in held:
            c.close()
    out = srv.output()
    assert "WARNING conveyor.server.http: refused a request from 127.0.0.1" in out
    assert f"max_connections is {MAX_CONNECTIONS}" in out


# -- queues ----------------------------------------------------------------------------


def test_queue_limit_native_and_sqs(srv: ServerProcess) -> None:
    url = srv.http_url
    existing = len(httpx.get(f"{url}/v1/queues").json()["queues"])
    names = [f"lim{i}" for i in range(MAX_QUEUES - existing)]
    for name in names:
        httpx.put(f"{url}/v1/queues/{name}").raise_for_status()
    try:
        r = httpx.put(f"{url}/v1/queues/onemore")
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "limit_exceeded"
        assert f"at most {MAX_QUEUES} queues" in r.json()["error"]["message"]
        # Getting (or re-declaring) an existing queue is not creating one.
        assert httpx.put(f"{url}/v1/queues/{names[0]}").status_code == 200
        sqs = _sqs(url)
        with pytest.raises(sqs.exceptions.OverLimit) as err:
            sqs.create_queue(QueueName="onemore")
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        assert f"at most {MAX_QUEUES} queues" in err.value.response["Error"]["Message"]
        r = httpx.post(url + "/", data={"Action": "CreateQueue", "QueueName": "onemore"})
        assert r.status_code == 403 and "<Code>OverLimit</Code>" in r.text
        assert httpx.get(f"{url}/v1/queues/onemore").status_code == 404
        # Deleting one makes room again.
        httpx.delete(f"{url}/v1/queues/{names.pop()}").raise_for_status()
        sqs.create_queue(QueueName="onemore")
        names.append("onemore")
    finally:
        for name in names:
            httpx.delete(f"{url}/v1/queues/{name}")


# -- messages per receive --------------------------------------------------------------


def test_max_messages_per_receive(srv: ServerProcess) -> None:
    url = srv.http_url
    httpx.put(f"{url}/v1/queues/many").raise_for_status()
    try:
        for _ in range(2):
            httpx.post(
                f"{url}/v1/queues/many/messages/batch",
                json={"messages": [{"body": "m"} for _ in range(80)]},
            ).raise_for_status()
        r = httpx.post(f"{url}/v1/queues/many/receive", json={"max_messages": MAX_RECEIVE + 1})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_argument"
        assert "max_messages_per_receive" in r.json()["error"]["message"]
        r = httpx.get(f"{url}/v1/queues/many/peek", params={"max_messages": MAX_RECEIVE + 1})
        assert r.status_code == 400 and "max_messages_per_receive" in r.text
        assert httpx.get(f"{url}/v1/queues/many/stats").json()["in_flight"] == 0
        r = httpx.post(f"{url}/v1/queues/many/receive", json={"max_messages": MAX_RECEIVE})
        assert len(r.json()["messages"]) == MAX_RECEIVE
    finally:
        httpx.delete(f"{url}/v1/queues/many")


# -- message and request size ----------------------------------------------------------


def test_message_size_native(srv: ServerProcess) -> None:
    url = srv.http_url
    httpx.put(f"{url}/v1/queues/sized").raise_for_status()
    try:
        send = f"{url}/v1/queues/sized/messages"
        assert httpx.post(send, json={"body": "x" * MAX_MESSAGE}).status_code == 200
        # Above --max-message-size (inside the request limit): the engine's 413.
        r = httpx.post(send, json={"body": "x" * (MAX_MESSAGE + 1)})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "message_too_large"
        assert str(MAX_MESSAGE) in r.json()["error"]["message"]
        r = httpx.post(
            f"{url}/v1/queues/sized/messages/batch",
            json={"messages": [{"body": "ok"}, {"body": "x" * (MAX_MESSAGE + 1)}]},
        )
        assert r.status_code == 413
        # Above --max-request-size: refused before the body is read.
        r = httpx.post(send, json={"body": "x" * (MAX_REQUEST + 10)})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "message_too_large"
        assert httpx.get(f"{url}/v1/queues/sized/stats").json()["ready"] == 1
    finally:
        httpx.delete(f"{url}/v1/queues/sized")


def test_message_size_sqs(srv: ServerProcess) -> None:
    url = srv.http_url
    sqs = _sqs(url)
    q = sqs.create_queue(QueueName="sqssized")["QueueUrl"]
    try:
        # SQS queues carry their own MaximumMessageSize (default 1 MiB), as on AWS, but
        # the server's --max-message-size is a ceiling no queue setting can raise.
        sqs.send_message(QueueUrl=q, MessageBody="x" * MAX_MESSAGE)
        with pytest.raises(ClientError) as err:
            sqs.send_message(QueueUrl=q, MessageBody="x" * (MAX_MESSAGE + 1))
        assert err.value.response["Error"]["Code"] == "InvalidParameterValue"
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        assert f"the limit for queue 'sqssized' is {MAX_MESSAGE}" in str(err.value)
        with pytest.raises(ClientError) as err:
            sqs.send_message(QueueUrl=q, MessageBody="x" * (SQS_MAX + 1))
        assert f"Message must be shorter than {SQS_MAX} bytes" in str(err.value)
        # A batch whose bodies add up to more than the limit.
        half = "x" * (SQS_MAX // 2 + 1)
        with pytest.raises(sqs.exceptions.BatchRequestTooLong):
            sqs.send_message_batch(
                QueueUrl=q,
                Entries=[{"Id": "a", "MessageBody": half}, {"Id": "b", "MessageBody": half}],
            )
        # A request above --max-request-size: InvalidParameterValue, never a 500.
        with pytest.raises(ClientError) as err:
            sqs.send_message(QueueUrl=q, MessageBody="x" * (MAX_REQUEST + 10))
        assert err.value.response["Error"]["Code"] == "InvalidParameterValue"
        assert "Maximum request body size" in err.value.response["Error"]["Message"]
        r = httpx.post(
            url + "/",
            data={"Action": "SendMessage", "QueueUrl": q, "MessageBody": "x" * (MAX_REQUEST + 10)},
        )
        assert r.status_code == 400 and "<Code>InvalidParameterValue</Code>" in r.text
        attrs = sqs.get_queue_attributes(
            QueueUrl=q, AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"]
        assert attrs["ApproximateNumberOfMessages"] == "1"
    finally:
        sqs.delete_queue(QueueUrl=q)
    assert "Traceback" not in srv.output()


# -- log hygiene -----------------------------------------------------------------------


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)  # aiohttp answers 400 and closes
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def test_malformed_requests_logged_once_a_second_without_traceback(srv: ServerProcess) -> None:
    bad_version = b"GET / HTTP/9.9\r\n\r\n"
    bad_header = b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"
    t0 = time.monotonic()
    for _ in range(40):
        for data in (bad_version, bad_header):
            assert _raw(srv.http_port, data).startswith(b"HTTP/1.0 400")
    elapsed = time.monotonic() - t0
    time.sleep(1.1)
    assert _raw(srv.http_port, bad_version).startswith(b"HTTP/1.0 400")
    time.sleep(0.2)
    out = srv.output()
    lines = [x for x in out.splitlines() if "malformed HTTP request" in x]
    # Two kinds, one line a second each (the 81 requests took `elapsed` seconds).
    assert 3 <= len(lines) <= 2 * (int(elapsed) + 2) + 1, lines
    assert all(" WARNING aiohttp.server: " in x for x in lines), lines
    assert any("BadStatusLine" in x for x in lines) and any("BadHttpMessage" in x for x in lines)
    assert re.search(r"\((\d+) more like this in the last \d+\.\d s not logged\)", lines[-1])
    assert "Traceback" not in out
    assert "ERROR aiohttp" not in out
    assert httpx.get(srv.http_url + "/healthz").status_code == 200


def test_disk_full_commits_logged_once_a_second(small_fs: Path) -> None:
    srv = ServerProcess(
        small_fs.parent, data=str(small_fs / "data"), durability="fsync", amqp=False, kafka=False
    ).start()
    try:
        with httpx.Client(base_url=srv.http_url, timeout=10) as http:
            http.put("/v1/queues/full").raise_for_status()
            st = os.statvfs(small_fs)
            (small_fs / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - 500_000))
            pad = "x" * 4000
            statuses: list[int] = []
            t0 = time.monotonic()
            for i in range(300):
                r = http.post(
                    "/v1/queues/full/messages/batch",
                    json={"messages": [{"body": f"{i}-{j}-{pad}"} for j in range(5)]},
                )
                statuses.append(r.status_code)
                if statuses.count(507) >= 60:
                    break
            elapsed = time.monotonic() - t0
            assert statuses.count(507) >= 60, statuses
            time.sleep(1.1)
            assert http.post("/v1/queues/full/messages", json={"body": pad}).status_code == 507
            time.sleep(0.2)
            (small_fs / "filler").unlink()
            assert http.post("/v1/queues/full/messages", json={"body": "after"}).status_code == 200
    finally:
        srv.stop()
    out = srv.output()
    lines = [x for x in out.splitlines() if " conveyor.store: " in x]
    assert lines, out[-2000:]
    assert all(" WARNING conveyor.store: " in x and "full" in x for x in lines), lines
    # At most one line a second per kind (commit, script), for ~60 failed commits.
    assert len(lines) <= 2 * (int(elapsed) + 3), lines
    assert any("more like this" in x for x in lines), lines
    # The HTTP listener's line per 5xx answer is rate-limited the same way.
    answered = [x for x in out.splitlines() if "-> 507 store_full" in x]
    assert 1 <= len(answered) <= int(elapsed) + 3, answered
    assert "more like this" in answered[-1]
    assert "Traceback" not in out


# -- settings --------------------------------------------------------------------------


def test_limit_settings_from_every_source(tmp_path: Path) -> None:
    c = load_config(env={})
    assert (c.max_connections, c.max_queues, c.max_messages_per_receive) == (10_000, 0, 1000)
    assert c.max_message_size == 1024 * 1024
    toml = tmp_path / "c.toml"
    toml.write_text("max_queues = 50\nmax_connections = 0\n")
    c = load_config(
        {"max_message_size": 4096},
        env={"CONVEYOR_MAX_MESSAGES_PER_RECEIVE": "10", "CONVEYOR_MAX_QUEUES": "60"},
        config_file=toml,
    )
    assert (c.max_queues, c.max_connections, c.max_messages_per_receive) == (60, 0, 10)
    assert c.max_message_size == 4096
    for bad in (
        {"max_messages_per_receive": 0},
        {"max_messages_per_receive": 10_001},
        {"max_connections": -1},
        {"max_queues": "many"},
        {"max_message_size": 0},
    ):
        with pytest.raises(InvalidArgument, match=next(iter(bad))):
            load_config(bad, env={})
    result = CliRunner().invoke(cli, ["serve", "--max-messages-per-receive", "20000"])
    assert result.exit_code == 2
    assert "max_messages_per_receive" in result.output and "10000" in result.output


def test_throttle_counts_what_it_drops() -> None:
    now = [0.0]
    t = Throttle(interval=1.0, clock=lambda: now[0])
    assert t.admit("a") == (0, 0.0)
    assert t.admit("a") is None
    assert t.admit("b") == (0, 0.0)  # kinds are throttled separately
    now[0] = 0.5
    assert t.admit("a") is None
    now[0] = 1.25
    assert t.admit("a") == (2, 1.25)
    assert t.admit("a") is None
