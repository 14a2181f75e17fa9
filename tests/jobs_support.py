"""An App for tests that run ``conveyor worker tests.jobs_support:app`` in a subprocess.
The URL comes from the command line (--data / --url). Task names are explicit so the
test process (which imports this module under another name) and the worker agree."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conveyor.jobs import App, current_job

app = App("proc", visibility_timeout=1.0)


@app.task(name="proc.slow", queue="slow", max_attempts=3)
def slow(marker_dir: str, seconds: float) -> int:
    """Record each start (attempt and pid); the first attempt sleeps."""
    job = current_job()
    Path(marker_dir, f"start-{job.attempt}-{os.getpid()}").touch()
    if job.attempt == 1:
        time.sleep(seconds)
    return job.attempt


@app.task(name="proc.pid", queue="fast")
async def pid(x: int) -> list[int]:
    return [x, os.getpid()]
