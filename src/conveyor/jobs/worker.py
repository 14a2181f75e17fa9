"""The worker: leases jobs, runs them, heartbeats their leases, retries or fails them.

Async tasks run on the worker's event loop (``concurrency`` at once); sync tasks run in
a thread pool; tasks marked ``process=True`` run in a process pool. While a job runs,
one heartbeat loop extends the leases of all running jobs in a batch per queue, so a
long job is not handed to a second worker; if this process dies, the leases run out
and the jobs are delivered again. Acks and events are batched.

Shutdown (``stop`` set, or SIGTERM/SIGINT under ``conveyor worker``): stop leasing,
give running jobs ``shutdown_timeout`` seconds, then release what is still running
(nack, so another worker takes it at once).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import importlib
import logging
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgspec

from conveyor import errors
from conveyor.client.aio import AsyncQueue
from conveyor.jobs import flows, retention
from conveyor.jobs import state as st
from conveyor.jobs.app import App, QueueConfig, Task
from conveyor.jobs.context import JobContext, reporter, set_current
from conveyor.jobs.cron import run_schedules
from conveyor.jobs.options import LOCK_QUEUE_EXPIRES
from conveyor.jobs.ratelimit import TokenBucket
from conveyor.jobs.retry import JobTimeout, NonRetryableError, Retry
from conveyor.jobs.serialization import Envelope, fmt_of
from conveyor.model import NewMessage, Properties

log = logging.getLogger("conveyor.jobs.worker")

TRACEBACK_LIMIT = 16_000


class _Permanent(Exception):
    """Internal: fail without retrying (bad message, unknown task, bad arguments)."""


class _Lane:
    """One job queue as this worker sees it."""

    def __init__(self, cfg: QueueConfig, queue: AsyncQueue, failed: AsyncQueue) -> None:
        self.cfg = cfg
        self.queue = queue
        self.failed = failed
        self.bucket: TokenBucket | None = None
        self.running: dict[str, Any] = {}  # receipt -> message
        self.to_ack: list[str] = []
        self.ack_wake = asyncio.Event()
        self.idle = False


class Worker:
    def __init__(
        self,
        app: App,
        queues: list[str] | None = None,
        *,
        concurrency: int = 16,
        threads: int | None = None,
        processes: int | None = None,
        shutdown_timeout: float = 30.0,
        schedules: bool = True,
        burst: bool = False,
        batch: int = 32,
        poll: float | None = None,
    ) -> None:
        """``queues``: job queues to serve (default: every queue the app's tasks use).
        ``concurrency``: jobs running at once. ``threads``: the thread pool for sync
        tasks (default ``concurrency``). ``processes``: the pool for ``process=True``
        tasks (default: CPU count, started on first use). ``burst``: return once the
        queues are empty (for tests and batch runs). ``poll``: longest single wait for
        new jobs (default 5 s against a server, 0.5 s embedded, where a send from
        another process does not wake this one)."""
        self.app = app
        self.queue_names = queues
        self.concurrency = max(1, concurrency)
        self.threads = threads or self.concurrency
        self.processes = processes
        self.shutdown_timeout = shutdown_timeout
        self.schedules = schedules
        self.burst = burst
        self.batch = max(1, batch)
        self.poll = poll
        self.processed = 0
        self.failed = 0
        self._lanes: dict[str, _Lane] = {}
        self._slots: asyncio.Semaphore | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._ppool: concurrent.futures.ProcessPoolExecutor | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._events: list[tuple[str, bytes]] = []
        self._events_wake: asyncio.Event | None = None
        self._stopping = False

    # -- running ----------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Blocking: run until ``stop`` is set (or, with burst, the queues are empty)."""
        # On the app's own loop thread (started here if need be), so that producers in
        # other threads of this process share the connection (and a memory:// store).
        self.app.runtime().call(self._run_threadsafe(stop))

    async def _run_threadsafe(self, stop: threading.Event | None) -> None:
        aio_stop = asyncio.Event()
        if stop is None:
            await self.arun(aio_stop)
            return

        async def watch() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.05)
            aio_stop.set()

        watcher = asyncio.create_task(watch())
        try:
            await self.arun(aio_stop)
        finally:
            watcher.cancel()

    async def arun(self, stop: asyncio.Event | None = None) -> None:
        """Run on the app's event loop until ``stop`` is set (or burst runs dry)."""
        rt = await self.app.astart()
        if not rt.here():
            stop = stop or asyncio.Event()
            await rt.acall(self._arun_there(stop, asyncio.get_running_loop()))
            return
        await self._main(stop or asyncio.Event())

    async def _arun_there(self, stop: asyncio.Event, caller: asyncio.AbstractEventLoop) -> None:
        local = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.05)
            local.set()

        # ``stop`` belongs to the caller's loop: poll it from there.
        fut = asyncio.run_coroutine_threadsafe(watch(), caller)
        try:
            await self._main(local)
        finally:
            fut.cancel()

    async def _main(self, stop: asyncio.Event) -> None:
        app = self.app
        rt = app.runtime()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._events_wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.threads, thread_name_prefix="conveyor-job"
        )
        names = self.queue_names or sorted({t.opts.queue for t in app.tasks.values()})
        if not names:
            raise RuntimeError(f"{app!r} has no tasks and no queues were given")
        for name in names:
            cfg = app.queue_config(name)
            q = await app._job_queue(name)
            failed = await rt.queue(app.names.failed(name))
            lane = _Lane(cfg, q, failed)
            if cfg.rate_limit is not None:
                limit, period = cfg.rate_limit
                lane.bucket = TokenBucket(rt, app.names.tokens(name, limit, period), limit, period)
                await lane.bucket.setup()
            self._lanes[name] = lane
        if app.events_enabled:
            await rt.exchange(app.names.events(), "topic")
        self._remove_q = await retention.remove_queue(app)
        poll = self.poll if self.poll is not None else (5.0 if app.remote else 0.5)
        if self.burst:
            poll = min(poll, 0.1)
        self._poll = poll
        log.info(
            "worker for %s: queues %s, concurrency %d", app.name, ", ".join(names), self.concurrency
        )
        helpers = [
            asyncio.create_task(self._heartbeat(), name="jobs-heartbeat"),
            asyncio.create_task(self._publish_events(), name="jobs-events"),
            asyncio.create_task(self._remover(), name="jobs-remover"),
        ]
        helpers += [asyncio.create_task(self._acker(lane)) for lane in self._lanes.values()]
        if self.schedules and app.schedules and not self.burst:
            helpers.append(asyncio.create_task(run_schedules(app, stop), name="jobs-cron"))
        fetchers = [
            asyncio.create_task(self._fetch(lane, stop), name=f"jobs-fetch-{lane.cfg.name}")
            for lane in self._lanes.values()
        ]
        try:
            if self.burst:
                monitor = asyncio.create_task(self._burst_done())
                stopped = asyncio.create_task(stop.wait())
                await asyncio.wait([monitor, stopped], return_when=asyncio.FIRST_COMPLETED)
                monitor.cancel()
                stopped.cancel()
                stop.set()
            else:
                await stop.wait()
        finally:
            self._stopping = True
            stop.set()
            await asyncio.gather(*fetchers, return_exceptions=True)
            await self._drain_running()
            for lane in self._lanes.values():
                await self._flush_acks(lane)
            await self._flush_events()
            for h in helpers:
                h.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            self._pool.shutdown(wait=False, cancel_futures=True)
            if self._ppool is not None:
                self._ppool.shutdown(wait=False, cancel_futures=True)
            log.info("worker stopped: %d processed, %d failed", self.processed, self.failed)

    async def _drain_running(self) -> None:
        if not self._jobs:
            return
        _done, pending = await asyncio.wait(set(self._jobs), timeout=self.shutdown_timeout)
        if not pending:
            return
        log.warning("shutdown: releasing %d job(s) still running", len(pending))
        for lane in self._lanes.values():
            if lane.running:
                receipts = list(lane.running)
                lane.running.clear()
                with contextlib.suppress(errors.ConveyorError):
                    await lane.queue.nack_batch(receipts)
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=1.0)

    # -- fetching -----------------------------------------------------------------------
    async def _fetch(self, lane: _Lane, stop: asyncio.Event) -> None:
        slots = self._slots
        assert slots is not None
        stopper = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                await slots.acquire()
                free = 1
                while free < self.batch and not slots.locked():
                    await slots.acquire()
                    free += 1
                tokens: list[Any] = []
                msgs: list[Any] = []
                try:
                    if lane.bucket is not None:
                        tokens = await self._wait(lane.bucket.take(free, self._poll), stopper)
                        if not tokens:
                            continue
                    want = len(tokens) if lane.bucket is not None else free
                    msgs = await self._wait(lane.queue.receive(want, wait=self._poll), stopper)
                    if lane.bucket is not None and len(msgs) < len(tokens):
                        await lane.bucket.give_back(tokens[len(msgs) :])
                finally:
                    for _ in range(free - len(msgs)):
                        slots.release()
                lane.idle = not msgs
                if not msgs:
                    continue
                for m in msgs:
                    lane.running[m.receipt] = m
                    t = asyncio.create_task(self._run(lane, m))
                    self._jobs.add(t)
                    t.add_done_callback(self._jobs.discard)
        finally:
            stopper.cancel()

    async def _wait(self, coro: Any, stopper: asyncio.Task[Any]) -> list[Any]:
        poll = asyncio.ensure_future(coro)
        await asyncio.wait({poll, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if poll.done():
            result: list[Any] = poll.result()
            return result
        poll.cancel()
        with contextlib.suppress(asyncio.CancelledError, errors.ConveyorError):
            await poll
        return []

    async def _burst_done(self) -> None:
        lanes = list(self._lanes.values())
        while True:
            await asyncio.sleep(self._poll)
            if self._jobs or not all(lane.idle for lane in lanes):
                continue
            queues = [lane.queue for lane in lanes] + [self._remove_q]
            if all([await self._empty(q) for q in queues]) and not self._jobs:
                return

    async def _empty(self, queue: AsyncQueue) -> bool:
        s = await queue.stats()
        return s.ready + s.delayed + s.in_flight == 0

    async def _remover(self) -> None:
        """Delete the status queues of jobs dropped from "keep the last N" indexes
        (conveyor.jobs.retention); every worker of the app takes a share."""
        q = self._remove_q
        while True:
            try:
                got = await q.receive(100, wait=self._poll)
                if got:
                    await retention.remove(self.app, got)
                    await q.ack_batch(got)
            except errors.ConveyorError:
                log.exception("removing finished jobs' records failed")
                await asyncio.sleep(self._poll)

    # -- running one job ----------------------------------------------------------------
    async def _run(self, lane: _Lane, msg: Any) -> None:
        slots = self._slots
        assert slots is not None
        try:
            await self._execute(lane, msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job handling failed for message %s", msg.id)
            if lane.running.pop(msg.receipt, None) is not None:
                with contextlib.suppress(errors.ConveyorError):
                    await msg.nack(delay=1.0)
        finally:
            slots.release()

    async def _execute(self, lane: _Lane, msg: Any) -> None:
        app = self.app
        props: Properties = msg.delivery.properties
        attempt: int = msg.delivery.receive_count
        try:
            fmt = fmt_of(props.content_type)
            env = app.serializer.decode_envelope(msg.body, props.content_type)
        except (ValueError, msgspec.DecodeError) as exc:
            await self._fail(lane, msg, None, None, _Permanent(f"undecodable job: {exc}"), attempt)
            return
        task = app.tasks.get(env.task)
        if task is None:
            exc2 = _Permanent(f"no task named {env.task!r} in {app!r}")
            await self._fail(lane, msg, env, None, exc2, attempt)
            return
        max_attempts = env.max_attempts or task.opts.max_attempts
        if attempt > max_attempts:
            stalled = _Permanent(
                f"delivered {attempt} times for {max_attempts} attempts: a worker died"
                " or lost the lease while running it"
            )
            await self._fail(lane, msg, env, task, stalled, attempt)
            return
        if env.dedup_mode == "debounce" and env.dedup_key and not await self._latest(env):
            await self._finish(lane, msg, env, task, "debounced", st.NULL, attempt)
            return
        ctx = JobContext(env.id, env.task, lane.cfg.name, attempt, max_attempts)
        ctx.schedule, ctx.tick = env.schedule, env.tick
        pending_progress: list[asyncio.Task[None]] = []
        last_progress: list[Any] = [None]

        def report(value: Any) -> None:
            last_progress[0] = value
            pending_progress.append(asyncio.ensure_future(self._progress(lane, env, task, value)))

        ctx._report = reporter(asyncio.get_running_loop(), report)
        try:
            prepend: list[Any] | None = None
            if env.children:
                ctx.children_results = await flows.children_results(app, env.id, env.children)
                if env.inject == "single":
                    prepend = ctx.children_results[:1]
                elif env.inject == "list":
                    prepend = [ctx.children_results]
            try:
                args, kwargs = task.decoder.decode(env, fmt, prepend)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise _Permanent(f"bad arguments for {task.name}: {exc}") from exc
            timeout = env.timeout if env.timeout is not None else task.opts.timeout
            set_current(ctx)
            result = await self._invoke(task, args, kwargs, timeout, ctx)
            try:
                raw = msgspec.Raw(msgspec.json.encode(result))
            except (TypeError, msgspec.EncodeError) as exc:
                raise _Permanent(f"result of {task.name} is not serializable: {exc}") from exc
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if pending_progress:
                await asyncio.gather(*pending_progress, return_exceptions=True)
            if isinstance(exc, KeyboardInterrupt):
                raise
            await self._failed_attempt(lane, msg, env, task, exc, attempt, max_attempts)
            return
        if pending_progress:
            await asyncio.gather(*pending_progress, return_exceptions=True)
        await self._finish(lane, msg, env, task, "completed", raw, attempt, last_progress[0])

    async def _invoke(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        timeout: float | None,
        ctx: JobContext,
    ) -> Any:
        loop = asyncio.get_running_loop()
        if task.is_async:
            aw = task.fn(*args, **kwargs)
        elif task.opts.process:
            pool = self._process_pool()
            aw = loop.run_in_executor(
                pool,
                functools.partial(
                    _call_in_process, task.fn.__module__, task.fn.__qualname__, args, kwargs
                ),
            )
        else:
            cv = contextvars.copy_context()
            aw = loop.run_in_executor(
                self._pool, functools.partial(cv.run, task.fn, *args, **kwargs)
            )
        if timeout is None:
            return await aw
        try:
            return await asyncio.wait_for(aw, timeout)
        except TimeoutError:
            raise JobTimeout(f"{task.name} ran past its timeout of {timeout:g} s") from None

    def _process_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._ppool is None:
            self._ppool = concurrent.futures.ProcessPoolExecutor(
                self.processes or os.cpu_count() or 1,
                mp_context=multiprocessing.get_context("spawn"),
            )
        return self._ppool

    # -- outcomes -----------------------------------------------------------------------
    async def _finish(
        self,
        lane: _Lane,
        msg: Any,
        env: Envelope,
        task: Task[Any, Any],
        outcome: str,
        raw: msgspec.Raw,
        attempt: int,
        progress: Any = None,
    ) -> None:
        app = self.app
        keep = env.keep_result if env.keep_result is not None else task.opts.keep_result
        if keep or env.children or outcome == "debounced":
            rec = st.StatusRecord(
                state=outcome, job_id=env.id, task=env.task, queue=lane.cfg.name,
                at=time.time(), attempts=attempt, result=raw, progress=progress,
            )  # fmt: skip
            await app._send_status(rec, final=outcome == "completed")
        if outcome == "completed":
            self._event(lane, "completed", env, attempt, result=raw)
            if env.parent is not None:
                await flows.child_completed(app, env.parent, env.id, raw)
            if env.children:
                await flows.cleanup(app, env.id)
        await self._release_key(env)
        self.processed += 1
        self._ack(lane, msg)

    async def _failed_attempt(
        self,
        lane: _Lane,
        msg: Any,
        env: Envelope,
        task: Task[Any, Any],
        exc: BaseException,
        attempt: int,
        max_attempts: int,
    ) -> None:
        final = isinstance(exc, NonRetryableError | _Permanent) or attempt >= max_attempts
        if isinstance(exc, Retry) and attempt < max_attempts:
            final = False
        if final:
            await self._fail(lane, msg, env, task, exc, attempt)
            return
        delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else None
        if delay is None:
            delay = task.opts.backoff.delay(attempt, exc)
        log.info("job %s (%s) attempt %d failed: %r; retry in %.2fs",
                 env.id, env.task, attempt, exc, delay)  # fmt: skip
        self._event(lane, "retried", env, attempt, error=_describe(exc), delay=delay)
        if lane.running.pop(msg.receipt, None) is not None:
            with contextlib.suppress(errors.ReceiptInvalid):
                await msg.nack(delay=delay)

    async def _fail(
        self,
        lane: _Lane,
        msg: Any,
        env: Envelope | None,
        task: Task[Any, Any] | None,
        exc: BaseException,
        attempt: int,
    ) -> None:
        """Out of attempts (or not retryable): a record with the error in the failed
        queue, the failed state, a failed event; then the job leaves its queue."""
        app = self.app
        self.failed += 1
        tb = "".join(traceback.format_exception(exc))[-TRACEBACK_LIMIT:]
        etype = type(exc).__name__ if not isinstance(exc, _Permanent) else "NonRetryableError"
        log.warning("job %s failed for good after %d attempt(s): %s",
                    env.id if env else msg.id, attempt, _describe(exc))  # fmt: skip
        headers = {
            "x-error": str(exc)[:2000],
            "x-error-type": etype,
            "x-traceback": tb,
            "x-attempts": attempt,
            "x-failed-at": time.time(),
            "x-queue": lane.cfg.name,
        }
        props = msg.delivery.properties
        await lane.failed.send(NewMessage(body=msg.body, headers=headers, properties=props))
        if env is not None:
            keep = env.keep_result if env.keep_result is not None else True
            if keep or env.children:
                rec = st.StatusRecord(
                    state="failed", job_id=env.id, task=env.task, queue=lane.cfg.name,
                    at=time.time(), attempts=attempt, error=str(exc)[:2000],
                    error_type=etype, traceback=tb,
                )  # fmt: skip
                await app._send_status(rec, final=True)
            self._event(lane, "failed", env, attempt, error=_describe(exc))
            if env.parent is not None:
                await flows.parent_failed(app, env.parent, env.id, _describe(exc))
            await self._release_key(env)
        self._ack(lane, msg)

    async def _latest(self, env: Envelope) -> bool:
        """Debounce: is this job still the latest for its key?"""
        assert env.dedup_key is not None
        q = await self.app.runtime().queue(
            self.app.names.lock("debounce", env.dedup_key),
            {"max_length": 1, "overflow": "drop-oldest", "expires": LOCK_QUEUE_EXPIRES},
        )
        recs = await q.peek(10)
        if not recs:
            return True
        latest: bytes = max(recs, key=lambda d: d.sequence).body
        return latest.decode() == env.id

    async def _release_key(self, env: Envelope) -> None:
        """Simple dedup: the key is free again once its job is done."""
        if env.dedup_mode != "simple" or not env.dedup_key:
            return
        q = await self.app.runtime().queue(
            self.app.names.lock("simple", env.dedup_key),
            {"max_length": 1, "overflow": "reject-new", "expires": LOCK_QUEUE_EXPIRES},
        )
        held = await q.peek(1)
        if held and held[0].body.decode() == env.id:
            await q.purge()

    async def _progress(self, lane: _Lane, env: Envelope, task: Task[Any, Any], value: Any) -> None:
        try:
            rec = st.StatusRecord(
                state="active", job_id=env.id, task=env.task, queue=lane.cfg.name,
                at=time.time(), progress=value,
            )  # fmt: skip
            await self.app._send_status(rec)
            self._event(lane, "progress", env, 0, progress=value)
        except Exception:
            log.exception("progress report for job %s failed", env.id)

    # -- batching: acks, events, heartbeats ---------------------------------------------
    def _ack(self, lane: _Lane, msg: Any) -> None:
        if lane.running.pop(msg.receipt, None) is None:
            return  # released at shutdown: another worker owns it now
        lane.to_ack.append(msg.receipt)
        lane.ack_wake.set()

    async def _acker(self, lane: _Lane) -> None:
        while True:
            await lane.ack_wake.wait()
            lane.ack_wake.clear()
            await self._flush_acks(lane)

    async def _flush_acks(self, lane: _Lane) -> None:
        while lane.to_ack:
            batch, lane.to_ack = lane.to_ack[:1000], lane.to_ack[1000:]
            try:
                res = await lane.queue.ack_batch(batch)
                if res.failed:
                    log.warning("%d ack(s) came too late: their leases had run out",
                                len(res.failed))  # fmt: skip
            except errors.ConveyorError:
                log.exception("ack of %d jobs failed", len(batch))

    def _event(self, lane: _Lane, event: str, env: Envelope, attempt: int, **fields: Any) -> None:
        if not self.app.events_enabled:
            return
        ev = st.Event(event=event, job_id=env.id, task=env.task, queue=lane.cfg.name,
                      at=time.time(), attempt=attempt, **fields)  # fmt: skip
        self._events.append((f"{lane.cfg.name}.{event}", st.encode(ev)))
        assert self._events_wake is not None
        self._events_wake.set()

    async def _publish_events(self) -> None:
        wake = self._events_wake
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            await self._flush_events()

    async def _flush_events(self) -> None:
        if not self._events:
            return
        batch, self._events = self._events, []
        items = [
            (NewMessage(body=b, properties=Properties(content_type="application/json")), k)
            for k, b in batch
        ]
        try:
            rt = self.app.runtime()
            for i in range(0, len(items), 1000):
                await rt.conn.backend.publish_batch(self.app.names.events(), items[i : i + 1000])
        except errors.ConveyorError:
            log.exception("publishing %d job events failed", len(items))

    async def _heartbeat(self) -> None:
        period = max(0.05, min(lane.cfg.visibility_timeout for lane in self._lanes.values()) / 3)
        while True:
            await asyncio.sleep(period)
            for lane in self._lanes.values():
                if not lane.running:
                    continue
                receipts = list(lane.running)
                try:
                    res = await self.app.runtime().conn.backend.extend_batch(
                        lane.queue.name, receipts, lane.cfg.visibility_timeout
                    )
                except errors.ConveyorError:
                    log.exception("lease heartbeat failed")
                    continue
                for r in res.failed:
                    if r in lane.running:
                        log.warning("lost the lease of a running job (message %s)",
                                    lane.running[r].id)  # fmt: skip


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _call_in_process(module: str, qualname: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Runs in a pool process: find the task's function by module and name."""
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    fn: Callable[..., Any] = getattr(obj, "fn", obj)
    return fn(*args, **kwargs)
