"""Run broker-level tests through the remote client against a real server.

``remote_env`` gives what tests/conftest.py's ``Env`` holds (``backend``, ``advance``)
for a ``conveyor serve --test-clock`` subprocess: the backend is a ``RemoteBroker``
and ``advance(s)`` moves the server's fake clock and runs its due timers. One server
serves a whole session; ``reset`` deletes every queue and exchange between tests.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from conveyor.client.remote import RemoteBroker
from serverproc import ServerProcess

STANDARD_EXCHANGES = ("", "amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match")


def start_test_server(tmp_path: Path) -> ServerProcess:
    return ServerProcess(tmp_path, ["--test-clock"], amqp=False, data="memory://").start()


class RemoteEnv:
    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.backend = RemoteBroker(srv.http_url)
        self._http = httpx.AsyncClient(base_url=srv.http_url)

    async def advance(self, seconds: float) -> None:
        r = await self._http.post("/_test/advance", json={"seconds": seconds})
        r.raise_for_status()

    async def reset(self) -> None:
        b = self.backend
        for q in await b.list_queues():
            await b.delete_queue(q.name)
        for x in await b.list_exchanges():
            if x.name not in STANDARD_EXCHANGES and not x.name.startswith("amq."):
                await b.delete_exchange(x.name)

    async def aclose(self) -> None:
        await self.reset()
        await self.backend.close()
        await self._http.aclose()
