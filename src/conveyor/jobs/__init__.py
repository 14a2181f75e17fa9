"""Background jobs on conveyor: tasks, workers, retries, rate limits, schedules,
results, events and flows -- BullMQ's features, in Python, over any conveyor URL.

    from conveyor.jobs import App

    app = App("shop", url="./conveyor-data")

    @app.task(queue="emails")
    async def send_email(to: str, subject: str) -> None: ...

    send_email.enqueue("user@example.com", "Welcome!")

Run workers with ``conveyor worker mymodule:app``. See docs/jobs.md.
"""

from conveyor.jobs.app import (
    App,
    BoundTask,
    FailedJob,
    Job,
    JobFailed,
    QueueConfig,
    Schedule,
    Signature,
    Task,
)
from conveyor.jobs.context import JobContext, current_job
from conveyor.jobs.flows import Flow, FlowJob, chain, chord
from conveyor.jobs.options import Dedup, EnqueueOptions, debounce, simple, throttle
from conveyor.jobs.retry import (
    Backoff,
    JobTimeout,
    NonRetryableError,
    Retry,
    custom,
    exponential,
    fixed,
)
from conveyor.jobs.state import Event, StatusRecord
from conveyor.jobs.testing import DrainResult, adrain, drain
from conveyor.jobs.worker import Worker

__all__ = [
    "App",
    "Backoff",
    "BoundTask",
    "Dedup",
    "DrainResult",
    "EnqueueOptions",
    "Event",
    "FailedJob",
    "Flow",
    "FlowJob",
    "Job",
    "JobContext",
    "JobFailed",
    "JobTimeout",
    "NonRetryableError",
    "QueueConfig",
    "Retry",
    "Schedule",
    "Signature",
    "StatusRecord",
    "Task",
    "Worker",
    "adrain",
    "chain",
    "chord",
    "current_job",
    "custom",
    "debounce",
    "drain",
    "exponential",
    "fixed",
    "simple",
    "throttle",
]
