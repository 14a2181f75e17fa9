"""Rate limits shared by every worker of a queue, built from leases.

A limit of N jobs per P seconds is a queue holding exactly N *token* messages. Before a
worker starts a job it leases a token with ``visibility_timeout = P`` and never acks
it: the token is invisible for P seconds, then the broker makes it ready again. So at
most N jobs start in any window of P seconds, across all workers and processes, with
no counter to keep consistent, and a crashed worker's tokens come back by themselves.

The N tokens are sent with dedup ids ``token-0..N-1`` and a year-long dedup window,
so any number of workers starting at once create exactly N of them.
"""

from __future__ import annotations

from typing import Any

from conveyor.jobs.runtime import Runtime
from conveyor.model import NewMessage

YEAR = 365 * 86400.0


class TokenBucket:
    def __init__(self, rt: Runtime, name: str, limit: int, period: float) -> None:
        self.rt = rt
        self.name = name
        self.limit = limit
        self.period = period
        self.queue: Any = None

    async def setup(self) -> None:
        self.queue = await self.rt.queue(
            self.name, {"visibility_timeout": self.period, "dedup_window": YEAR}
        )
        seed = [NewMessage(body=b"token", dedup_id=f"token-{i}") for i in range(self.limit)]
        await self.rt.conn.backend.send_batch(self.name, seed)

    async def take(self, n: int, wait: float) -> list[Any]:
        """Lease up to ``n`` tokens, waiting up to ``wait`` seconds for the first."""
        got: list[Any] = await self.queue.receive(
            min(n, self.limit), wait=wait, visibility_timeout=self.period
        )
        return got

    async def give_back(self, tokens: list[Any]) -> None:
        """Return tokens that were not used (no job was there to start)."""
        if tokens:
            await self.queue.nack_batch(tokens)
