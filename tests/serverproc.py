"""Start a real ``conveyor serve`` subprocess for tests.

    from serverproc import ServerProcess

    with ServerProcess(tmp_path) as srv:
        srv.http_url      # "http://127.0.0.1:<port>"
        srv.amqp_port     # int, or None when AMQP is disabled or not built yet
        srv.kafka_port    # int, or None when Kafka is disabled
        srv.pid
        srv.stop(signal.SIGTERM)   # returns the exit code

Ports are ephemeral (``--http-port 0 --amqp-port 0``); serve writes them to a ready
file (``--ready-file``), which this helper reads, then it waits for ``/healthz``.
The server's stdout and stderr go to ``<tmp_path>/serve.log`` (``srv.output()``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

SRC = Path(__file__).resolve().parents[1] / "src"


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a conveyor subprocess: this checkout's ``src`` on the path
    and no ``CONVEYOR_*`` settings leaking in from the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra or {})
    return env


class ServerProcess:
    def __init__(
        self,
        tmp_path: Path | str,
        extra_args: Sequence[str] = (),
        *,
        amqp: bool = True,
        kafka: bool = True,
        durability: str | None = "none",
        token: str | None = None,
        data: str | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 30.0,
        name: str = "serve",
    ) -> None:
        self.tmp_path = Path(tmp_path)
        self.tmp_path.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.tmp_path / f"{name}-data"
        self.data = data or str(self.data_dir)
        self.ready_file = self.tmp_path / f"{name}-ready.json"
        self.log_path = self.tmp_path / f"{name}.log"
        self.token = token
        self.startup_timeout = startup_timeout
        self.args = [
            sys.executable, "-m", "conveyor", "serve",
            "--data", self.data,
            "--host", "127.0.0.1",
            "--http-port", "0",
            "--ready-file", str(self.ready_file),
        ]  # fmt: skip
        self.args += ["--amqp-port", "0"] if amqp else ["--no-amqp"]
        self.args += ["--kafka-port", "0"] if kafka else ["--no-kafka"]
        if durability is not None:
            self.args += ["--durability", durability]
        if token is not None:
            self.args += ["--token", token]
        self.args += list(extra_args)
        self.env = subprocess_env(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> ServerProcess:
        self.ready_file.unlink(missing_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
        deadline = time.monotonic() + self.startup_timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"conveyor serve exited with {self.proc.returncode}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"conveyor serve did not start:\n{self.output()}")
            time.sleep(0.02)
        self.info = json.loads(self.ready_file.read_text())
        while True:
            try:
                if httpx.get(self.http_url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"/healthz never answered 200:\n{self.output()}")
            time.sleep(0.02)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"server ignored signal {sig}:\n{self.output()}") from None
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> ServerProcess:
        """Stop gracefully and start again on the same data (ports change)."""
        self.stop()
        return self.start()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            self.kill()

    # -- what tests read --------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def http_port(self) -> int:
        return int(self.info["http_port"])

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def amqp_port(self) -> int | None:
        port = self.info.get("amqp_port")
        return None if port is None else int(port)

    @property
    def kafka_port(self) -> int | None:
        port = self.info.get("kafka_port")
        return None if port is None else int(port)

    @property
    def amqp_url(self) -> str | None:
        port = self.amqp_port
        return None if port is None else f"amqp://guest:guest@127.0.0.1:{port}/"

    @property
    def headers(self) -> dict[str, str]:
        """Headers that authenticate against this server (empty when it runs open)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
