"""``conveyor worker module:app``: run job workers for an App (conveyor.jobs)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
from typing import Any

import click

from conveyor.cli.common import DEFAULT_URL

LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def load_app(spec: str) -> Any:
    """Import ``module:attribute`` (``module`` alone means ``module:app``)."""
    from conveyor.jobs import App

    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}", param_hint="APP") from exc
    obj: Any = module
    for part in (attr or "app").split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise click.BadParameter(f"{spec!r}: no attribute {part!r}", param_hint="APP")
    if not isinstance(obj, App):
        raise click.BadParameter(f"{spec!r} is a {type(obj).__name__}, not a conveyor.jobs.App")
    return obj


@click.command()
@click.argument("app_spec", metavar="MODULE:APP")
@click.option("--queue", "-q", "queues", multiple=True, help="Serve only this queue (repeatable).")
@click.option("--concurrency", "-c", type=click.IntRange(1), default=16, show_default=True,
              help="Jobs running at once in each process.")  # fmt: skip
@click.option("--processes", "-p", type=click.IntRange(1), default=1, show_default=True,
              help="Worker processes to start.")  # fmt: skip
@click.option("--threads", type=click.IntRange(1), help="Thread pool for sync tasks [concurrency].")
@click.option("--pool-processes", type=click.IntRange(1),
              help="Process pool for process=True tasks [CPU count].")  # fmt: skip
@click.option("--url", envvar="CONVEYOR_URL", metavar="URL",
              help="Override the app's URL (server URL, directory, memory://).")  # fmt: skip
@click.option("--data", envvar="CONVEYOR_DATA", metavar="DIR", help="Embedded data directory.")
@click.option("--shutdown-timeout", type=float, default=30.0, show_default=True,
              help="Seconds running jobs get to finish on SIGTERM/SIGINT.")  # fmt: skip
@click.option("--burst", is_flag=True, help="Exit once the queues are empty.")
@click.option("--no-schedules", is_flag=True, help="Do not enqueue cron/repeat schedules.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)  # fmt: skip
def worker(
    app_spec: str, queues: tuple[str, ...], concurrency: int, processes: int,
    threads: int | None, pool_processes: int | None, url: str | None, data: str | None,
    shutdown_timeout: float, burst: bool, no_schedules: bool, log_level: str,
) -> None:  # fmt: skip
    """Run job workers for the App at MODULE:APP (e.g. ``myproject.tasks:app``).

    The URL is the app's own unless --url/--data overrides it. SIGTERM or Ctrl-C stops
    leasing, lets running jobs finish within --shutdown-timeout and releases the rest.
    """
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    if url and data:
        raise click.UsageError("give --url or --data, not both")
    app = load_app(app_spec)
    target = data or url or app.url
    if target is None:
        target = DEFAULT_URL
    if target == "memory://" and processes > 1:
        raise click.UsageError("memory:// is private to one process: use one process")
    app.url = target
    kw: dict[str, Any] = {
        "queues": list(queues) or None, "concurrency": concurrency, "threads": threads,
        "processes": pool_processes, "shutdown_timeout": shutdown_timeout, "burst": burst,
        "schedules": not no_schedules,
    }  # fmt: skip
    if processes == 1:
        _serve(app_spec, target, kw)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_serve, args=(app_spec, target, kw, log_level)) for _ in range(processes)
    ]
    for p in procs:
        p.start()

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    for p in procs:
        p.join()
        code = code or (p.exitcode or 0)
    sys.exit(code)


def _serve(app_spec: str, target: str, kw: dict[str, Any], log_level: str | None = None) -> None:
    from conveyor.jobs import Worker

    if log_level is not None:  # a spawned child: configure logging again
        logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    app = load_app(app_spec)
    app.url = target
    w = Worker(app, **kw)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        hits = 0

        def on_signal() -> None:
            nonlocal hits
            hits += 1
            if hits > 1:
                os._exit(130)  # a second Ctrl-C: leave now; leases bring the jobs back
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            await w.arun(stop)
        finally:
            await app.aclose()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
