"""Crash safety, short versions of tools/crash_harness.py (docs/reliability.md).

- SIGKILL a loaded ``conveyor serve`` (fsync) three times; producers and consumers
  over the native API, SQS (boto3) and AMQP (pika, confirms) keep going; at the end
  nothing confirmed is lost and no acked message comes back.
- SIGSTOP the server for longer than the clients' timeouts, twice: every client
  recovers after SIGCONT, nothing confirmed is lost.
- A damaged data file stops ``conveyor serve`` at start-up with one clear line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serverproc import ServerProcess, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tools" / "crash_harness.py"


def _harness(tmp_path: Path, *args: str, timeout: float = 100) -> dict[str, object]:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "--workdir", str(tmp_path / "work"), "--json", str(out),
         "--quiet", *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )  # fmt: skip
    assert out.exists(), proc.stdout + proc.stderr
    report: dict[str, object] = json.loads(out.read_text())
    return report


def _assert_safe(report: dict[str, object]) -> None:
    summary = {k: v for k, v in report.items() if not k.endswith("_examples")}
    assert report["lost"] == 0, report
    assert report["acked_redelivered"] == 0, report
    assert report["invented"] == 0, report
    assert report["integrity"] == "ok", summary
    assert report["server_tracebacks"] == 0, summary
    by = report["by_protocol"]
    assert isinstance(by, dict)
    for proto in ("native", "sqs", "amqp"):
        assert by[proto]["confirmed"] > 20, summary  # every front door carried load
        assert by[proto]["acked"] > 0, summary


@pytest.mark.timeout(110)
def test_sigkill_three_times_under_load_loses_nothing(tmp_path: Path) -> None:
    report = _harness(
        tmp_path, "--kills", "3", "--seed", "3", "--warmup", "1.5", "--min-up", "0.8",
        "--max-up", "2.0", "--tail", "1.5",
    )  # fmt: skip
    _assert_safe(report)
    assert report["ok"] is True
    assert report["kills"] == 3


@pytest.mark.timeout(110)
def test_sigstop_longer_than_client_timeouts_clients_recover(tmp_path: Path) -> None:
    report = _harness(
        tmp_path, "--fault", "stop", "--kills", "2", "--stop-seconds", "4",
        "--client-timeout", "2", "--warmup", "1.5", "--min-up", "1", "--max-up", "1.5",
        "--tail", "3",
    )  # fmt: skip
    _assert_safe(report)
    recovered = report["recovered_after_last_fault"]
    assert isinstance(recovered, dict)
    assert recovered and all(recovered.values()), recovered
    assert report["ok"] is True


def _serve_once(tmp_path: Path, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor", "serve", "--data", str(data), "--http-port", "0",
         "--no-amqp", "--host", "127.0.0.1"],
        env=subprocess_env({"CONVEYOR_KAFKA_PORT": "off"}),
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip


def _fill(tmp_path: Path) -> Path:
    srv = ServerProcess(tmp_path, durability="fsync", amqp=False).start()
    try:
        import httpx

        with httpx.Client(base_url=srv.http_url, timeout=10) as c:
            c.put("/v1/queues/keep").raise_for_status()
            for i in range(20):
                c.post(
                    "/v1/queues/keep/messages/batch",
                    json={"messages": [{"body": f"{i}-{j}" + "x" * 900} for j in range(50)]},
                ).raise_for_status()
    finally:
        assert srv.stop() == 0
    return srv.data_dir / "conveyor.db"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "header"])
def test_damaged_data_file_is_one_clear_line_at_startup(tmp_path: Path, damage: str) -> None:
    db = _fill(tmp_path)
    size = db.stat().st_size
    assert size > 100_000
    if damage == "garbage":
        db.write_bytes(os.urandom(size))
    elif damage == "truncated":
        os.truncate(db, size // 2 // 4096 * 4096)
    else:
        with db.open("r+b") as f:
            f.write(b"definitely not SQLite\0")
    res = _serve_once(tmp_path, db.parent)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("Error: ")
    assert str(db) in lines[0]
    assert "not a readable conveyor database" in lines[0]
    assert ".recover" in lines[0] and "backup" in lines[0]
