"""``conveyor serve`` from this checkout, as shipped, for the benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"


def start_conveyor(
    data_dir: str, durability: str, *, amqp: bool = False
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start ``conveyor serve`` with its data under ``data_dir``, HTTP on a free port
    (and AMQP on another when ``amqp``), no listener on a fixed port. Returns the
    process and its ready file: the ports it bound (``http_port``, ``amqp_port``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    ready = Path(data_dir) / "ready.json"
    listeners = ["--amqp-port", "0"] if amqp else ["--no-amqp"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "serve", "--data", f"{data_dir}/data",
         "--http-port", "0", *listeners, "--no-kafka", "--durability", durability,
         "--ready-file", str(ready), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not ready.exists():  # written atomically once every listener is up
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("conveyor serve did not start")
        time.sleep(0.05)
    info: dict[str, Any] = json.loads(ready.read_text())
    return proc, info
