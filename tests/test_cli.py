"""The ``conveyor`` command against a real server (and an embedded data directory)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from conveyor.cli.main import cli
from serverproc import ServerProcess, subprocess_env


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("cli"), amqp=False) as s:
        yield s


def run(srv: ServerProcess | None, *args: str, input: str | bytes | None = None) -> Result:
    env = {"CONVEYOR_URL": srv.http_url} if srv else {}
    return CliRunner().invoke(cli, list(args), input=input, env=env, catch_exceptions=False)


def ok(srv: ServerProcess | None, *args: str, input: str | bytes | None = None) -> str:
    r = run(srv, *args, input=input)
    assert r.exit_code == 0, r.output
    return r.output


def _name(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


def test_create_send_receive_ack(srv: ServerProcess) -> None:
    q = _name("jobs")
    assert "ready" in ok(srv, "create", q, "--visibility-timeout", "5", "--max-receives", "3")
    ok(srv, "send", q, "hello", "--header", "n=1", "--header", "who=me", "--priority", "2")
    ok(srv, "send", q, input="from stdin")
    out = ok(srv, "receive", q, "--max", "5", "--json", "--ack")
    msgs = [json.loads(line) for line in out.splitlines()]
    assert [m["body"] for m in msgs] == ["hello", "from stdin"]
    assert msgs[0]["headers"] == {"n": 1, "who": "me"} and msgs[0]["priority"] == 2
    assert "no messages" in ok(srv, "receive", q)


def test_send_file_and_count(srv: ServerProcess, tmp_path: Path) -> None:
    q = _name("bulk")
    ok(srv, "create", q)
    f = tmp_path / "body.bin"
    f.write_bytes(b"\xff\x01binary")
    ok(srv, "send", q, "--file", str(f))
    assert "sent 250" in ok(srv, "send", q, "x", "--count", "250")
    stats = json.loads(ok(srv, "stats", q, "--json"))
    assert stats["stats"]["ready"] == 251
    (first,) = [json.loads(x) for x in ok(srv, "receive", q, "--json").splitlines()]
    assert first["body_encoding"] == "base64"


def test_queues_table_and_stats(srv: ServerProcess) -> None:
    q = _name("listed")
    ok(srv, "create", q)
    ok(srv, "send", q, "a")
    out = ok(srv, "queues", "--prefix", q, "--interval", "0")
    assert q in out and "ready" in out and "in flight" in out
    out = ok(srv, "queues", "--prefix", q, "--interval", "0.1")
    assert "in/s" in out
    lines = ok(srv, "queues", "--prefix", q, "--interval", "0", "--json").splitlines()
    assert json.loads(lines[0])["stats"]["ready"] == 1
    assert "ready" in ok(srv, "stats", q)


def test_purge_and_delete(srv: ServerProcess) -> None:
    q = _name("trash")
    ok(srv, "create", q)
    ok(srv, "send", q, "x", "--count", "3")
    r = run(srv, "delete", q, "--if-empty")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "purged 3" in ok(srv, "purge", q)
    assert "deleted" in ok(srv, "delete", q)
    r = run(srv, "stats", q)
    assert r.exit_code == 1
    assert "Error:" in r.output and q in r.output


def test_dead_letters_and_redrive(srv: ServerProcess) -> None:
    q = _name("work")
    ok(srv, "create", q + "-dlq")
    ok(
        srv,
        "create",
        q,
        "--max-receives",
        "1",
        "--dead-letter",
        q + "-dlq",
        "--visibility-timeout",
        "0.2",
    )
    ok(srv, "send", q, "poison", "--count", "2")
    ok(srv, "receive", q, "--max", "2")  # leased, never acked
    time.sleep(0.5)
    # the next receive finds them over their delivery limit and dead-letters them
    assert "no messages" in ok(srv, "receive", q, "--max", "2")
    assert json.loads(ok(srv, "stats", q + "-dlq", "--json"))["stats"]["ready"] == 2
    assert "moved 2" in ok(srv, "dlq", "redrive", q + "-dlq")
    assert json.loads(ok(srv, "stats", q, "--json"))["stats"]["ready"] == 2


def test_exchanges_bind_publish(srv: ServerProcess) -> None:
    x, q = _name("events"), _name("audit")
    ok(srv, "create", q)
    ok(srv, "bind", x, q, "--key", "order.*", "--type", "topic")
    out = ok(srv, "exchanges")
    assert x in out and "topic" in out and q in out
    assert "1 queue copies" in ok(srv, "publish", x, "created", "--key", "order.created")
    r = run(srv, "publish", x, "lost", "--key", "payment.created")
    assert r.exit_code == 0 and "unroutable" in r.output
    ok(srv, "publish", "amq.default", "direct", "--key", q)
    out = ok(srv, "receive", q, "--max", "10", "--ack")
    assert out.splitlines() == ["created", "direct"]
    ok(srv, "bind", x, q, "--key", "order.*", "--unbind")
    assert "0 queue copies" in ok(srv, "publish", x, "again", "--key", "order.created")


def test_tail_follows_and_stops_after_count(srv: ServerProcess) -> None:
    q = _name("tailed")
    ok(srv, "create", q)
    ok(srv, "send", q, "one")
    ok(srv, "send", q, "two")
    assert ok(srv, "tail", q, "--count", "2").splitlines() == ["one", "two"]


def test_embedded_data_directory(tmp_path: Path) -> None:
    data = str(tmp_path / "embedded")
    ok(None, "create", "local", "--data", data)
    ok(None, "send", "local", "x", "--data", data)
    assert "local" in ok(None, "queues", "--data", data, "--interval", "0")
    assert ok(None, "receive", "local", "--data", data, "--ack").strip() == "x"


def test_errors_exit_1_with_one_line_and_usage_exit_2(srv: ServerProcess) -> None:
    r = run(srv, "send", _name("missing"), "x")
    assert r.exit_code == 1
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1
    assert run(srv, "send").exit_code == 2
    assert run(srv, "create", "q", "--visibility-timeout", "soon").exit_code == 2
    assert run(srv, "nonsense").exit_code == 2
    r = CliRunner().invoke(cli, ["queues", "--url", "http://127.0.0.1:9", "--interval", "0"])
    assert r.exit_code == 1 and "cannot reach" in r.output and "Traceback" not in r.output


def test_real_subprocess_entry_point(srv: ServerProcess) -> None:
    q = _name("proc")
    env = subprocess_env({"CONVEYOR_URL": srv.http_url})
    cmd = [sys.executable, "-m", "conveyor"]
    done = subprocess.run([*cmd, "create", q], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [*cmd, "send", q], input=b"piped", env=env, capture_output=True, timeout=30
    )
    assert done.returncode == 0
    done = subprocess.run(
        [*cmd, "receive", q, "--ack"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.stdout.strip() == "piped"
    done = subprocess.run(
        [*cmd, "stats", "nope-" + q], env=env, capture_output=True, text=True, timeout=30
    )
    assert (
        done.returncode == 1 and done.stderr.startswith("Error:") and "Traceback" not in done.stderr
    )
    done = subprocess.run([*cmd, "--version"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "conveyor" in done.stdout
