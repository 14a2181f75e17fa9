"""``conveyor serve`` as a real subprocess: start-up, ports, auth, signals, config."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serverproc import ServerProcess, subprocess_env


def _run_serve(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = subprocess_env(env)
    return subprocess.run(
        [sys.executable, "-m", "conveyor", "serve", "--data", str(tmp_path / "d"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=full_env,
    )


def test_starts_answers_healthz_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path).start()
    try:
        r = httpx.get(srv.http_url + "/healthz")
        assert r.status_code == 200
        assert r.json()["status"] == "ok"
        info = json.loads(srv.ready_file.read_text())
        assert info["pid"] == srv.pid
        assert info["http_port"] == srv.http_port
    finally:
        code = srv.stop(signal.SIGTERM)
    assert code == 0
    out = srv.output()
    assert "conveyor" in out and "durability" in out and srv.http_url in out
    assert "Traceback" not in out


def test_sigint_also_exits_zero(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path).start()
    assert srv.stop(signal.SIGINT) == 0


def test_banner_names_data_durability_and_listeners(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, durability="os") as srv:
        out = srv.output()
    assert str(srv.data_dir) in out
    assert "os" in out.split("durability", 1)[1].splitlines()[0]
    assert f"http://127.0.0.1:{srv.http_port}" in out


def test_taken_port_is_a_clear_error_naming_the_flag(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = _run_serve(tmp_path, "--http-port", str(port), "--no-amqp")
    assert result.returncode == 1
    assert "--http-port" in result.stderr
    assert str(port) in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_non_loopback_without_token(tmp_path: Path) -> None:
    result = _run_serve(tmp_path, "--host", "0.0.0.0", "--http-port", "0", "--no-amqp")
    assert result.returncode == 1
    assert "token" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_setting_is_a_usage_error(tmp_path: Path) -> None:
    result = _run_serve(tmp_path, env={"CONVEYOR_HTTP_PORT": "x"})
    assert result.returncode == 2
    assert "http_port" in result.stderr
    result = _run_serve(tmp_path, env={"CONVEYOR_DURABILITY": "sometimes"})
    assert result.returncode == 2
    assert "durability" in result.stderr


def test_token_required_on_every_request_but_healthz(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, token="s3cret") as srv:
        url = srv.http_url
        assert httpx.get(url + "/healthz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(url + "/v1/queues", headers=headers)
            assert r.status_code == 401
            assert r.json() == {
                "error": {"code": "unauthorized", "message": "missing or wrong bearer token"}
            }
            assert httpx.get(url + "/v1/nope", headers=headers).status_code == 401
            assert httpx.get(url + "/metrics", headers=headers).status_code == 401
        r = httpx.get(url + "/v1/queues", headers=srv.headers)
        assert r.status_code == 200


def test_config_precedence_flags_over_env_over_toml(tmp_path: Path) -> None:
    toml = tmp_path / "conveyor.toml"
    toml.write_text('durability = "none"\ntoken = "from-toml"\nhttp_port = 1\n')
    # env overrides the toml token; the flag overrides the toml port
    with ServerProcess(
        tmp_path, ["--config", str(toml)], durability=None, env={"CONVEYOR_TOKEN": "from-env"}
    ) as srv:
        url = srv.http_url
        assert (
            httpx.get(url + "/v1/queues", headers={"Authorization": "Bearer from-toml"}).status_code
            == 401
        )
        assert (
            httpx.get(url + "/v1/queues", headers={"Authorization": "Bearer from-env"}).status_code
            == 200
        )
    out = srv.output()
    assert "none" in out.split("durability", 1)[1].splitlines()[0]


def test_python_dash_m_and_help(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "conveyor", "serve", "--help"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=30,
    )
    assert result.returncode == 0
    for flag in ("--data", "--host", "--http-port", "--durability", "--config"):
        assert flag in result.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_pending_long_poll_answers_empty_on_shutdown(tmp_path: Path, sig: int) -> None:
    import threading

    with ServerProcess(tmp_path) as srv:
        httpx.put(srv.http_url + "/v1/queues/lp").raise_for_status()
        result: dict[str, object] = {}

        def poll() -> None:
            r = httpx.post(srv.http_url + "/v1/queues/lp/receive", json={"wait": 20}, timeout=30)
            result["status"] = r.status_code
            result["body"] = r.json()

        t = threading.Thread(target=poll)
        t.start()
        import time

        time.sleep(0.5)
        started = time.monotonic()
        assert srv.stop(sig) == 0
        t.join(10)
        assert time.monotonic() - started < 5
    assert result == {"status": 200, "body": {"messages": []}}


def test_amqp_listener_in_the_same_process(tmp_path: Path) -> None:
    import pika

    with ServerProcess(tmp_path) as srv:
        assert srv.amqp_port is not None and srv.amqp_port != srv.http_port
        assert f"amqp://127.0.0.1:{srv.amqp_port}" in srv.output()
        params = pika.ConnectionParameters("127.0.0.1", srv.amqp_port)
        conn = pika.BlockingConnection(params)
        try:
            ch = conn.channel()
            ch.queue_declare("via-amqp")
            ch.basic_publish("", "via-amqp", b"from pika")
        finally:
            conn.close()
        # the same broker answers over HTTP
        r = httpx.post(srv.http_url + "/v1/queues/via-amqp/receive", json={"wait": 2})
        assert [m["body"] for m in r.json()["messages"]] == ["from pika"]
        metrics = httpx.get(srv.http_url + "/metrics").text
        assert 'conveyor_connections{protocol="amqp"}' in metrics


def test_taken_amqp_port_names_its_flag(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = _run_serve(tmp_path, "--http-port", "0", "--amqp-port", str(port))
    assert result.returncode == 1
    assert "--amqp-port" in result.stderr and "Traceback" not in result.stderr


def test_sqs_api_on_the_http_port(tmp_path: Path) -> None:
    import boto3

    with ServerProcess(tmp_path, amqp=False) as srv:
        sqs = boto3.client(
            "sqs", endpoint_url=srv.http_url, region_name="us-east-1",
            aws_access_key_id="x", aws_secret_access_key="y",
        )  # fmt: skip
        url = sqs.create_queue(QueueName="via-sqs")["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody="from boto3")
        r = httpx.post(srv.http_url + "/v1/queues/via-sqs/receive", json={})
        assert [m["body"] for m in r.json()["messages"]] == ["from boto3"]


def test_token_closes_sqs_without_access_keys(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, amqp=False, token="t") as srv:
        r = httpx.post(
            srv.http_url + "/",
            headers={
                "X-Amz-Target": "AmazonSQS.ListQueues",
                "Content-Type": "application/x-amz-json-1.0",
            },
            content=b"{}",
        )
        assert r.status_code == 401


async def test_taken_default_port_skips_the_listener_but_a_chosen_one_is_an_error() -> None:
    from conveyor.broker import Broker
    from conveyor.server.config import load_config
    from conveyor.server.serve import ListenError, RunningServer, bind_listener

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    broker = await Broker.open("memory://", timers=False)
    try:
        defaulted = RunningServer(config=load_config({}, env={}), broker=broker)
        assert bind_listener(defaulted, "amqp_port", port, "--amqp-port") is None
        assert "amqp not started" in defaulted.notes[0]
        chosen = RunningServer(config=load_config({"amqp_port": port}, env={}), broker=broker)
        with pytest.raises(ListenError, match="--amqp-port"):
            bind_listener(chosen, "amqp_port", port, "--amqp-port")
    finally:
        taken.close()
        await broker.close()


def test_banner_hides_a_password_in_the_store_url() -> None:
    from conveyor.server.serve import shown_url, store_url

    url = "postgresql://app:s3cret@db.internal:5432/conveyor"
    assert store_url(url) == url  # what the store is opened with keeps the password
    shown = shown_url(url)
    assert "s3cret" not in shown and shown.startswith("postgresql://app:***@db.internal:5432")
