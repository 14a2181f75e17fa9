"""Shared fixtures. The conformance suite runs once per backend in BACKENDS."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.broker import Broker, FakeClock

#: "remote" runs the suite through the HTTP client against a real `conveyor serve`.
#: "postgres" runs it on a fresh PostgreSQL database (see PG_ADMIN_URL).
BACKENDS = ["memory", "sqlite", "remote", "postgres"]

#: The PostgreSQL server the tests use (CI starts one); each test session creates and
#: drops its own database there.
PG_ADMIN_URL = os.environ.get(
    "CONVEYOR_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PG_TABLES = "queues, queue_counts, messages, fifo_turns, dedup, exchanges, bindings"


class Env:
    """A backend under test plus a way to move time forward."""

    def __init__(self, backend: Any, advance: Callable[[float], Awaitable[None]]) -> None:
        self.backend: Broker = backend
        self.advance = advance


@pytest.fixture(scope="session")
def remote_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from remote_support import start_test_server

    srv = start_test_server(tmp_path_factory.mktemp("remote"))
    yield srv
    srv.stop()


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    kind = request.param
    if kind == "remote":
        from remote_support import RemoteEnv

        remote = RemoteEnv(request.getfixturevalue("remote_server"))
        try:
            yield Env(remote.backend, remote.advance)
        finally:
            await remote.aclose()
        return
    clock = FakeClock()
    if kind == "postgres":
        url = request.getfixturevalue("pg_url")
        pg_truncate(url)
    else:
        url = "memory://" if kind == "memory" else str(tmp_path / "data")
    broker = await Broker.open(url, clock=clock, timers=False, durability="os")

    async def advance(seconds: float) -> None:
        clock.advance(seconds)
        await broker.tick()

    try:
        yield Env(broker, advance)
    finally:
        await broker.close()


def _pg_admin() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - psycopg is a test dependency
        pytest.skip(f"psycopg is not installed: {exc}")
    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is unreachable at {PG_ADMIN_URL}: {str(exc).strip()}")


def pg_url_for(dbname: str) -> str:
    """A URL for database ``dbname`` on the test server."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(PG_ADMIN_URL)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


@contextlib.contextmanager
def new_pg_database(prefix: str) -> Iterator[str]:
    """Create a database on the test server; yield its URL; drop it afterwards."""
    admin = _pg_admin()
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield pg_url_for(name)
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    with new_pg_database("conveyor_test") as url:
        yield url


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MB tmpfs the test can fill (needs root to mount; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run mount here")
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode(errors='replace')}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10)


def pg_truncate(url: str) -> None:
    """Empty every conveyor table (the schema stays)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('conveyor_meta')").fetchone()
        if exists and exists[0] is not None:
            conn.execute(f"TRUNCATE {PG_TABLES} RESTART IDENTITY")
