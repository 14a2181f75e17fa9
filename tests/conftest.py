"""Shared fixtures. The conformance suite runs once per backend in BACKENDS."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from conveyor.broker import Broker, FakeClock

BACKENDS = ["memory", "sqlite"]


class Env:
    """A backend under test plus a way to move time forward."""

    def __init__(self, backend: Broker, advance: Callable[[float], Awaitable[None]]) -> None:
        self.backend = backend
        self.advance = advance


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    kind = request.param
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
