"""conveyor.jobs: a no-op async task; results and events off (as Celery's ignore_result)."""

import os

from conveyor.jobs import App

app = App(
    "bench",
    url=os.environ.get("BENCH_URL"),
    events=False,
    connect_kwargs={"durability": os.environ.get("BENCH_DURABILITY", "os")},
)


@app.task(name="bench.noop", queue="noop", keep_result=False)
async def noop() -> None:
    return None
