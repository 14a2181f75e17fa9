"""arq over Redis: results not kept, more jobs in flight than the default 10."""

from typing import Any

from arq.connections import RedisSettings


async def noop(ctx: dict[str, Any]) -> None:
    return None


class WorkerSettings:
    functions = [noop]
    redis_settings = RedisSettings(host="127.0.0.1", port=6379)
    queue_name = "bench-arq"
    max_jobs = 100
    keep_result = 0
    burst = False
    handle_signals = True
