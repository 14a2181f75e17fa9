"""Shared fixtures. The conformance suite runs once per backend in BACKENDS."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.broker import Broker, FakeClock

#: "remote" runs the suite through the HTTP client against a real `conveyor serve`.
BACKENDS = ["memory", "sqlite", "remote"]


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
    url = "memory://" if kind == "memory" else str(tmp_path / "data")
    broker = await Broker.open(url, clock=clock, timers=False, durability="os")

    async def advance(seconds: float) -> None:
        clock.advance(seconds)
        await broker.tick()

    try:
        yield Env(broker, advance)
    finally:
        await broker.close()
