"""Every queue and exchange name the job framework uses, in one place.

All live under the app's prefix (default ``jobs``), so one conveyor can host several
apps and ``conveyor queues --prefix jobs.`` lists one app's queues.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_SAFE = re.compile(r"^[A-Za-z0-9_\-:@]{1,80}$")
_SAFE_TASK = re.compile(r"^[A-Za-z0-9_\-:@.]{1,120}$")


def key_part(key: str) -> str:
    """A user key (dedup key, schedule name) as a name segment: itself when short and
    plain, else a hash of it."""
    if _SAFE.match(key):
        return key
    return "h-" + hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Names:
    prefix: str
    result_ttl: float

    def queue(self, queue: str) -> str:
        """Where jobs of ``queue`` wait."""
        return f"{self.prefix}.{queue}"

    def failed(self, queue: str) -> str:
        """Dead letters: jobs out of attempts, with error and traceback in headers."""
        return f"{self.prefix}.{queue}.failed"

    def status(self, job_id: str) -> str:
        return f"{self.prefix}.job.{job_id}"

    def events(self) -> str:
        return f"{self.prefix}.events"

    def subscriber(self, token: str) -> str:
        return f"{self.prefix}.ev.{token}"

    def tokens(self, queue: str, limit: int, period: float) -> str:
        return f"{self.prefix}.{queue}.rate.{limit}-{period:g}s"

    def lock(self, mode: str, key: str) -> str:
        return f"{self.prefix}.{mode}.{key_part(key)}"

    def schedule(self, name: str) -> str:
        return f"{self.prefix}.cron.{key_part(name)}"

    def flow(self, parent_id: str) -> str:
        return f"{self.prefix}.flow.{parent_id}"

    def keep(self, outcome: str, task: str) -> str:
        """Index of the newest finished jobs of ``task`` ("keep the last N")."""
        part = task if _SAFE_TASK.match(task) else key_part(task)
        return f"{self.prefix}.keep.{outcome}.{part}"

    def remove_queue(self) -> str:
        """Job ids dropped from the indexes: their status queues are to be deleted."""
        return f"{self.prefix}.keep.remove"
