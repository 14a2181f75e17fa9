"""The App: tasks, queues, schedules, enqueueing and job handles.

    app = App("shop", url="./conveyor-data")

    @app.task(queue="emails", max_attempts=5)
    async def send_email(to: str, subject: str) -> None: ...

    job = send_email.enqueue("user@example.com", "Welcome!")   # from blocking code
    job = await send_email.aenqueue("user@example.com", "Hi")  # from async code
    job.result(timeout=10)

Workers: ``conveyor worker module:app`` (or ``Worker(app).run()``).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import sys
import threading
import time
import typing
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, overload

import msgspec

from conveyor import errors
from conveyor.client.aio import AsyncConnection
from conveyor.jobs import retention
from conveyor.jobs import state as st
from conveyor.jobs.names import Names
from conveyor.jobs.options import (
    LOCK_QUEUE_EXPIRES,
    Dedup,
    EnqueueOptions,
    parse_rate,
)
from conveyor.jobs.retry import Backoff, exponential
from conveyor.jobs.runtime import Runtime, queue_options
from conveyor.jobs.serialization import (
    ArgDecoder,
    Envelope,
    FlowLink,
    Format,
    Serializer,
)
from conveyor.model import NewMessage, Properties

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class JobFailed(Exception):
    """``result()`` of a job that failed for good: the error and traceback it recorded."""

    def __init__(self, job_id: str, record: st.StatusRecord) -> None:
        super().__init__(f"job {job_id} failed: {record.error_type}: {record.error}")
        self.job_id = job_id
        self.error = record.error
        self.error_type = record.error_type
        self.traceback = record.traceback
        self.state = record.state


# -- queues ---------------------------------------------------------------------------------


@dataclass
class QueueConfig:
    """How one job queue behaves. ``rate_limit`` holds across all workers."""

    name: str
    visibility_timeout: float = 30.0
    rate_limit: tuple[int, float] | None = None
    #: Window in which a caller-given job id is unique (the queue's dedup_window).
    job_id_window: float = 300.0

    def options(self) -> dict[str, Any]:
        return queue_options(
            visibility_timeout=self.visibility_timeout, dedup_window=self.job_id_window
        )


# -- tasks ----------------------------------------------------------------------------------


@dataclass
class TaskOptions:
    queue: str = "default"
    max_attempts: int = 3
    backoff: Backoff = field(default_factory=exponential)
    timeout: float | None = None
    keep_result: bool = True
    priority: int = 0
    #: Run in the worker's process pool (CPU-bound work). The function must be
    #: importable by module and name.
    process: bool = False
    #: Removal policies for the records of completed / failed jobs (None: the App's).
    remove_on_complete: retention.Policy | None = None
    remove_on_fail: retention.Policy | None = None


class Task(Generic[P, R]):
    """A function registered as a job. Calling it runs it here and now."""

    def __init__(self, app: App, fn: Callable[P, Any], name: str, opts: TaskOptions) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.opts = opts
        self.is_async = inspect.iscoroutinefunction(fn)
        self.decoder = ArgDecoder(fn)
        try:
            self.return_type: Any = typing.get_type_hints(fn).get("return", Any)
        except Exception:
            self.return_type = Any
        if self.return_type is type(None):
            self.return_type = Any
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.opts.queue}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        return self.fn(*args, **kwargs)

    def s(self, *args: P.args, **kwargs: P.kwargs) -> Signature[R]:
        """A signature: this task with arguments, to enqueue later or use in a flow."""
        return Signature(self, args, kwargs, EnqueueOptions())

    def with_options(
        self,
        *,
        delay: float | None = None,
        at: Any = None,
        priority: int | None = None,
        job_id: str | None = None,
        dedup: Dedup | None = None,
        queue: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        keep_result: bool | None = None,
        ttl: float | None = None,
    ) -> BoundTask[P, R]:
        opts = EnqueueOptions(
            delay=delay, at=at, priority=priority, job_id=job_id, dedup=dedup, queue=queue,
            max_attempts=max_attempts, timeout=timeout, keep_result=keep_result, ttl=ttl,
        )  # fmt: skip
        return BoundTask(self, opts)

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        return self.s(*args, **kwargs).enqueue()

    async def aenqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        return await self.s(*args, **kwargs).aenqueue()


class BoundTask(Generic[P, R]):
    """A task with enqueue options fixed (``task.with_options(...)``)."""

    def __init__(self, task: Task[P, R], opts: EnqueueOptions) -> None:
        self.task = task
        self.opts = opts

    def s(self, *args: P.args, **kwargs: P.kwargs) -> Signature[R]:
        return Signature(self.task, args, kwargs, self.opts)

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        return self.s(*args, **kwargs).enqueue()

    async def aenqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        return await self.s(*args, **kwargs).aenqueue()


class Signature(Generic[R]):
    def __init__(
        self,
        task: Task[Any, R],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        opts: EnqueueOptions,
    ) -> None:
        self.task = task
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.opts = opts

    def __repr__(self) -> str:
        return f"<Signature {self.task.name}{self.args}>"

    def set(self, **changes: Any) -> Signature[R]:
        """A copy with enqueue options changed (see ``Task.with_options``)."""
        return Signature(self.task, self.args, self.kwargs, self.opts.merged(**changes))

    @property
    def queue(self) -> str:
        return self.opts.queue or self.task.opts.queue

    def enqueue(self) -> Job[R]:
        (job,) = self.task.app.enqueue_many([self])
        return job

    async def aenqueue(self) -> Job[R]:
        (job,) = await self.task.app.aenqueue_many([self])
        return job


# -- job handles ----------------------------------------------------------------------------


class Job(Generic[R]):
    """A handle on an enqueued job: its state, progress and result."""

    def __init__(
        self,
        app: App,
        job_id: str,
        queue: str,
        *,
        return_type: Any = Any,
        deduplicated: bool = False,
    ) -> None:
        self.app = app
        self.id = job_id
        self.queue = queue
        self.return_type = return_type
        #: True when this enqueue was dropped as a duplicate; ``id`` then names the job
        #: that holds the key (when it is known) or the dropped one.
        self.deduplicated = deduplicated

    def __repr__(self) -> str:
        dup = " deduplicated" if self.deduplicated else ""
        return f"<Job {self.id} queue={self.queue}{dup}>"

    async def arecord(self) -> st.StatusRecord | None:
        return await self.app.runtime().acall(self.app._record(self.id))

    async def astate(self) -> str:
        rec = await self.arecord()
        return "pending" if rec is None else rec.state

    def state(self) -> str:
        """pending (waiting, delayed or running), active (reported progress),
        completed, failed or debounced."""
        rec = self.app.runtime().call(self.app._record(self.id))
        return "pending" if rec is None else rec.state

    def progress(self) -> Any:
        rec = self.app.runtime().call(self.app._record(self.id))
        return None if rec is None else rec.progress

    async def aresult(self, timeout: float | None = None) -> R:
        rec = await self.app.runtime().acall(self.app._wait_record(self.id, timeout))
        return self._value(rec)

    def result(self, timeout: float | None = None) -> R:
        """Wait up to ``timeout`` seconds (None: forever) for the job to finish and return
        its value; raises JobFailed if it failed, TimeoutError if it is still running."""
        return self._value(self.app.runtime().call(self.app._wait_record(self.id, timeout)))

    def _value(self, rec: st.StatusRecord) -> R:
        if rec.state != "completed":
            raise JobFailed(self.id, rec)
        value: R = msgspec.json.decode(rec.result, type=self.return_type)
        return value


# -- the app --------------------------------------------------------------------------------


class _TaskDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...


@dataclass
class Schedule:
    """A repeatable job: ``cron`` (5 fields, minute precision) or ``every`` seconds."""

    name: str
    signature: Signature[Any]
    cron: str | None = None
    every: float | None = None
    tz: str = "UTC"
    #: After downtime, enqueue the most recent missed tick if it is at most this many
    #: seconds old (one catch-up run, never a burst); None: one interval, at most 1 h.
    misfire_grace: float | None = None


class App:
    """A set of tasks, their queues and schedules, bound to one conveyor connection.

    ``url``: where conveyor is (directory, ``memory://``, ``http://host:port``...).
    ``connection``: an AsyncConnection to use instead (the App runs its job operations
    on that connection's event loop). Neither: pass ``url`` to ``connect`` later.
    """

    def __init__(
        self,
        name: str = "jobs",
        *,
        url: str | None = None,
        connection: AsyncConnection | None = None,
        serializer: Format = "json",
        result_ttl: float = 86400.0,
        remove_on_complete: retention.RemovalOption = None,
        remove_on_fail: retention.RemovalOption = None,
        events: bool = True,
        visibility_timeout: float = 30.0,
        connect_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.names = Names(name, result_ttl)
        #: Defaults for tasks that set no removal policy of their own (see
        #: conveyor.jobs.retention): int N keeps the newest N per task, float keeps for
        #: that many seconds, False / None: only ``result_ttl``.
        self.remove_on_complete = retention.parse(remove_on_complete, "remove_on_complete")
        self.remove_on_fail = retention.parse(remove_on_fail, "remove_on_fail")
        self.url = url
        self.serializer = Serializer(serializer)
        self.events_enabled = events
        self.visibility_timeout = visibility_timeout
        self.connect_kwargs = connect_kwargs or {}
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.queues: dict[str, QueueConfig] = {}
        self.schedules: dict[str, Schedule] = {}
        self._connection = connection
        self._runtime: Runtime | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<App {self.name} tasks={len(self.tasks)}>"

    # -- connection -------------------------------------------------------------------
    def connect(self, url: str, **kw: Any) -> App:
        """Point the app at ``url`` (before first use)."""
        if self._runtime is not None:
            raise RuntimeError("the app is already connected; close() it first")
        self.url = url
        self.connect_kwargs = kw
        return self

    def use(self, connection: AsyncConnection) -> App:
        """Use an open AsyncConnection; call from the loop that owns it."""
        if self._runtime is not None:
            raise RuntimeError("the app is already connected; close() it first")
        self._connection = connection
        return self

    @property
    def remote(self) -> bool:
        """True when conveyor is a server (long polls are woken across processes)."""
        return bool(self.url and self.url.startswith(("http://", "https://")))

    def runtime(self) -> Runtime:
        rt = self._runtime
        if rt is not None:
            return rt
        with self._lock:
            if self._runtime is not None:
                return self._runtime
            if self._connection is not None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    raise RuntimeError(
                        "an App given a connection must first be used on that"
                        " connection's event loop"
                    ) from None
                self._runtime = Runtime(loop, self._connection)
            else:
                if self.url is None:
                    raise RuntimeError("the app has no connection: App(url=...) or app.connect()")
                self._runtime = Runtime.open_in_thread(self.url, **self.connect_kwargs)
            return self._runtime

    async def astart(self) -> Runtime:
        """Bind the app to the running loop (opening ``url`` here) unless it is bound."""
        if self._runtime is None and self._connection is None and self.url is not None:
            rt = await Runtime.open_here(self.url, **self.connect_kwargs)
            with self._lock:
                if self._runtime is None:
                    self._runtime = rt
                    return rt
            await rt.close()
        return self.runtime()

    async def aclose(self) -> None:
        rt, self._runtime = self._runtime, None
        if rt is None:
            return
        if rt._thread is not None:
            await asyncio.to_thread(rt.close_blocking)
        elif rt.here():
            await rt.close()
        else:
            await rt.acall(rt.close())

    def close(self) -> None:
        rt, self._runtime = self._runtime, None
        if rt is None:
            return
        if rt._thread is not None:
            rt.close_blocking()
        else:
            rt.call(rt.close())

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- definitions --------------------------------------------------------------------
    def queue(
        self,
        name: str,
        *,
        visibility_timeout: float | None = None,
        rate_limit: str | tuple[int, float] | None = None,
        job_id_window: float = 300.0,
    ) -> QueueConfig:
        """Configure a job queue (before workers start)."""
        cfg = QueueConfig(
            name,
            visibility_timeout if visibility_timeout is not None else self.visibility_timeout,
            parse_rate(rate_limit) if rate_limit is not None else None,
            job_id_window,
        )
        self.queues[name] = cfg
        return cfg

    def queue_config(self, name: str) -> QueueConfig:
        cfg = self.queues.get(name)
        if cfg is None:
            cfg = self.queues[name] = QueueConfig(name, self.visibility_timeout)
        return cfg

    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...
    @overload
    def task(
        self,
        *,
        name: str | None = None,
        queue: str = "default",
        max_attempts: int = 3,
        backoff: Backoff | None = None,
        timeout: float | None = None,
        keep_result: bool = True,
        priority: int = 0,
        process: bool = False,
        remove_on_complete: retention.RemovalOption = None,
        remove_on_fail: retention.RemovalOption = None,
    ) -> _TaskDecorator: ...
    def task(  # type: ignore[misc]
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        max_attempts: int = 3,
        backoff: Backoff | None = None,
        timeout: float | None = None,
        keep_result: bool = True,
        priority: int = 0,
        process: bool = False,
        remove_on_complete: retention.RemovalOption = None,
        remove_on_fail: retention.RemovalOption = None,
    ) -> Any:
        """Register a function (sync or async) as a task.

        ``remove_on_complete`` / ``remove_on_fail``: which records of finished jobs to
        keep -- an int N: the newest N of this task; a float: for that many seconds;
        True: none; False: all (until ``result_ttl``); None: the App's default."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        opts = TaskOptions(
            queue=queue,
            max_attempts=max_attempts,
            backoff=backoff or exponential(),
            timeout=timeout,
            keep_result=keep_result,
            priority=priority,
            process=process,
            remove_on_complete=retention.parse(remove_on_complete, "remove_on_complete"),
            remove_on_fail=retention.parse(remove_on_fail, "remove_on_fail"),
        )

        def register(f: Callable[..., Any]) -> Task[Any, Any]:
            task_name = name or _default_name(f)
            if task_name in self.tasks and self.tasks[task_name].fn is not f:
                raise ValueError(f"a task named {task_name!r} is already registered")
            if process and inspect.iscoroutinefunction(f):
                raise ValueError("process=True needs a plain (not async) function")
            t: Task[Any, Any] = Task(self, f, task_name, opts)
            self.tasks[task_name] = t
            self.queue_config(queue)
            return t

        return register(fn) if fn is not None else register

    def schedule(
        self,
        name: str,
        signature: Signature[Any],
        *,
        cron: str | None = None,
        every: float | None = None,
        tz: str = "UTC",
        misfire_grace: float | None = None,
    ) -> Schedule:
        """Enqueue ``signature`` on a cron expression or every N seconds. Each tick is
        enqueued exactly once however many workers run (see docs/jobs.md)."""
        from conveyor.jobs.cron import Cron

        if (cron is None) == (every is None):
            raise ValueError("give cron= or every=, not both")
        if cron is not None:
            Cron(cron, tz)  # validate now
        if every is not None and every <= 0:
            raise ValueError("every must be positive")
        sched = Schedule(name, signature, cron, every, tz, misfire_grace)
        self.schedules[name] = sched
        return sched

    # -- enqueueing ------------------------------------------------------------------------
    def enqueue_many(self, signatures: Iterable[Signature[Any]]) -> list[Job[Any]]:
        """Enqueue several jobs, one store round per queue (bulk add)."""
        return self.runtime().call(self._enqueue_many(list(signatures)))

    async def aenqueue_many(self, signatures: Iterable[Signature[Any]]) -> list[Job[Any]]:
        rt = await self.astart()
        return await rt.acall(self._enqueue_many(list(signatures)))

    def remote_task(
        self, name: str, *, queue: str = "default", return_type: Any = Any
    ) -> Task[..., Any]:
        """A task another service runs: enqueue it by name without its code here.
        It is not registered, so this app's workers never take it."""

        def not_here(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError(f"{name} runs in another service")

        t: Task[..., Any] = Task(self, not_here, name, TaskOptions(queue=queue))
        t.return_type = return_type
        self.queue_config(queue)
        return t

    def job(self, job_id: str, return_type: Any = Any) -> Job[Any]:
        """A handle on a job by id (for its state and result)."""
        return Job(self, job_id, "", return_type=return_type)

    def build(
        self,
        sig: Signature[Any],
        *,
        job_id: str | None = None,
        parent: FlowLink | None = None,
        children: int = 0,
        inject: str = "none",
        schedule: str | None = None,
        tick: float | None = None,
    ) -> tuple[str, NewMessage]:
        """The message for one job: (job id, message). Nothing is sent."""
        o = sig.opts
        jid = job_id or o.job_id or uuid.uuid4().hex
        ser = self.serializer
        env = Envelope(
            task=sig.task.name,
            id=jid,
            args=[ser.raw(a) for a in sig.args],
            kwargs={k: ser.raw(v) for k, v in sig.kwargs.items()},
            enqueued_at=time.time(),
            max_attempts=o.max_attempts,
            timeout=o.timeout,
            keep_result=o.keep_result,
            dedup_mode=o.dedup.mode if o.dedup else None,
            dedup_key=o.dedup.key if o.dedup else None,
            parent=parent,
            children=children,
            inject=inject,
            schedule=schedule,
            tick=tick,
        )
        delay = o.delay_seconds()
        if o.dedup is not None and o.dedup.mode == "debounce":
            delay = max(delay or 0.0, o.dedup.window)
        msg = NewMessage(
            body=ser.encode(env),
            properties=Properties(content_type=ser.content_type, message_id=jid, type=env.task),
            priority=o.priority if o.priority is not None else sig.task.opts.priority,
            delay=delay or None,
            ttl=o.ttl,
            dedup_id=o.job_id,
        )
        return jid, msg

    async def _job_queue(self, queue: str) -> Any:
        cfg = self.queue_config(queue)
        return await self.runtime().queue(self.names.queue(queue), cfg.options())

    async def _enqueue_many(self, sigs: list[Signature[Any]]) -> list[Job[Any]]:
        jobs: list[Job[Any] | None] = [None] * len(sigs)
        plain: dict[str, list[tuple[int, str, NewMessage]]] = {}
        for i, sig in enumerate(sigs):
            if sig.opts.dedup is not None and sig.opts.dedup.mode != "debounce":
                jobs[i] = await self._enqueue_locked(sig)
                continue
            jid, msg = self.build(sig)
            plain.setdefault(sig.queue, []).append((i, jid, msg))
        for queue, items in plain.items():
            q = await self._job_queue(queue)
            results = await self.runtime().conn.backend.send_batch(q.name, [m for _, _, m in items])
            for (i, jid, _), res in zip(items, results, strict=True):
                rt = sigs[i].task.return_type
                jobs[i] = Job(self, jid, queue, return_type=rt, deduplicated=not res.stored)
            for i, jid, _ in items:
                d = sigs[i].opts.dedup
                if d is not None and d.mode == "debounce":
                    await self._debounce_mark(d, jid)
        return [j for j in jobs if j is not None]

    async def _enqueue_locked(self, sig: Signature[Any]) -> Job[Any]:
        """simple / throttle dedup: a one-slot queue per key (max_length=1, reject-new)
        holds a marker naming the job; a full slot means "duplicate"."""
        d = sig.opts.dedup
        assert d is not None
        rt = self.runtime()
        lock = await rt.queue(
            self.names.lock(d.mode, d.key),
            {"max_length": 1, "overflow": "reject-new", "expires": LOCK_QUEUE_EXPIRES},
        )
        jid, msg = self.build(sig)
        try:
            await lock.send(jid.encode(), ttl=d.window)
        except errors.QueueFull:
            held = await lock.peek(1)
            holder = held[0].body.decode() if held else jid
            return Job(self, holder, sig.queue, return_type=sig.task.return_type, deduplicated=True)
        q = await self._job_queue(sig.queue)
        (res,) = await rt.conn.backend.send_batch(q.name, [msg])
        return Job(self, jid, sig.queue, return_type=sig.task.return_type,
                   deduplicated=not res.stored)  # fmt: skip

    async def _debounce_mark(self, d: Dedup, job_id: str) -> None:
        latest = await self.runtime().queue(
            self.names.lock("debounce", d.key),
            {"max_length": 1, "overflow": "drop-oldest", "expires": LOCK_QUEUE_EXPIRES},
        )
        await latest.send(job_id.encode())

    # -- records ---------------------------------------------------------------------------
    async def _status_queue(self, job_id: str) -> Any:
        return await self.runtime().queue(self.names.status(job_id), st.status_options(self.names))

    def removal_policy(self, task: str, outcome: str) -> retention.Policy:
        """The removal policy for records of ``task``'s jobs that ended in ``outcome``
        ("completed" or "failed")."""
        t = self.tasks.get(task)
        if outcome == "completed":
            return retention.resolve(t.opts.remove_on_complete if t else None,
                                     self.remove_on_complete)  # fmt: skip
        return retention.resolve(t.opts.remove_on_fail if t else None, self.remove_on_fail)

    async def _send_status(self, rec: st.StatusRecord, *, final: bool = False) -> None:
        """Store ``rec`` as the job's latest record. ``final``: the job ended (completed
        or failed); its task's removal policy applies (age: the record's TTL; count:
        an entry in the task's index)."""
        policy = self.removal_policy(rec.task, rec.state) if final else retention.OFF
        body = st.encode(rec)
        try:
            await (await self._status_queue(rec.job_id)).send(body, ttl=policy.age)
        except errors.QueueNotFound:
            # Removed (or expired) since this runtime declared it: the job ran again.
            self.runtime().forget(self.names.status(rec.job_id))
            await (await self._status_queue(rec.job_id)).send(body, ttl=policy.age)
        if policy.count is not None:
            await retention.index(self, rec.task, rec, policy.count)

    async def _record(self, job_id: str) -> st.StatusRecord | None:
        try:
            q = await self.runtime().conn.get_queue(self.names.status(job_id))
        except errors.QueueNotFound:
            return None
        recs = await q.peek(10)
        if not recs:
            return None
        return st.decode_status(max(recs, key=lambda d: d.sequence).body)

    async def _wait_record(self, job_id: str, timeout: float | None) -> st.StatusRecord:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        q = await self._status_queue(job_id)
        # Long polls are woken by sends in this process (or on the server); a worker in
        # another process writing to the same directory is seen at the next poll.
        slice_ = 5.0 if self.remote else 0.25
        held: list[Any] = []
        try:
            while True:
                try:
                    recs = await q.peek(10)
                    if recs:
                        rec = st.decode_status(max(recs, key=lambda d: d.sequence).body)
                        if rec.state in st.TERMINAL:
                            return rec
                    left = None if deadline is None else deadline - loop.time()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
                    wait = slice_ if left is None else min(slice_, left)
                    # Hold non-final records leased so the next poll waits for a new one.
                    got = await q.receive(10, wait=wait, visibility_timeout=wait + 30)
                except errors.QueueNotFound:
                    # Removed by a removal policy, or expired: its record is gone. Wait
                    # on a fresh queue (the job may run again) until the deadline.
                    held.clear()
                    self.runtime().forget(q.name)
                    q = await self._status_queue(job_id)
                    continue
                for m in got:
                    rec = st.decode_status(m.body)
                    if rec.state in st.TERMINAL:
                        return rec
                    held.append(m)
        finally:
            if held:
                with _suppress():
                    await q.nack_batch(held)

    # -- failed jobs -----------------------------------------------------------------------
    async def afailed(self, queue: str, limit: int = 100) -> list[FailedJob]:
        rt = await self.astart()
        return await rt.acall(self._failed(queue, limit))

    def failed(self, queue: str, limit: int = 100) -> list[FailedJob]:
        """Jobs of ``queue`` that ran out of attempts (oldest first), with their errors."""
        return self.runtime().call(self._failed(queue, limit))

    async def _failed(self, queue: str, limit: int) -> list[FailedJob]:
        q = await self.runtime().queue(self.names.failed(queue))
        out: list[FailedJob] = []
        for d in await q.peek(limit):
            h = d.headers
            out.append(
                FailedJob(
                    job_id=d.properties.message_id or "",
                    task=d.properties.type or "",
                    error=str(h.get("x-error", "")),
                    error_type=str(h.get("x-error-type", "")),
                    traceback=str(h.get("x-traceback", "")),
                    attempts=int(h.get("x-attempts", 0)),
                    failed_at=float(h.get("x-failed-at", 0.0)),
                )
            )
        return out

    def retry_failed(self, queue: str, max_jobs: int | None = None) -> int:
        """Move failed jobs of ``queue`` back to it, with fresh attempts."""
        return self.runtime().call(self._retry_failed(queue, max_jobs))

    async def _retry_failed(self, queue: str, max_jobs: int | None) -> int:
        dead = await self.runtime().queue(self.names.failed(queue))
        target = await self._job_queue(queue)
        moved = 0
        while max_jobs is None or moved < max_jobs:
            n = 100 if max_jobs is None else min(100, max_jobs - moved)
            got = await dead.receive(n)
            if not got:
                break
            fresh = [
                NewMessage(body=m.body, properties=m.delivery.properties, priority=m.priority)
                for m in got
            ]
            await self.runtime().conn.backend.send_batch(target.name, fresh)
            await dead.ack_batch(got)
            moved += len(got)
        return moved

    # -- events ---------------------------------------------------------------------------
    @asynccontextmanager
    async def subscribe(
        self,
        queue: str = "*",
        events: Sequence[str] = ("completed", "failed", "progress", "retried"),
    ) -> AsyncIterator[Subscription]:
        """Receive job events published after this call, in order per worker.

        ``async with app.subscribe("emails", ["completed"]) as sub: async for ev in sub``.
        The subscription is a queue of its own, deleted when unused for a minute.
        """
        rt = await self.astart()
        sub = await rt.acall(self._open_subscription(queue, events))
        try:
            yield sub
        finally:
            with _suppress():
                await rt.acall(sub._close())

    async def _open_subscription(self, queue: str, events: Sequence[str]) -> Subscription:
        rt = self.runtime()
        await rt.exchange(self.names.events(), "topic")
        name = self.names.subscriber(uuid.uuid4().hex[:16])
        q = await rt.conn.queue(name, expires=60.0, message_ttl=3600.0)
        x = await rt.conn.exchange(self.names.events(), "topic")
        for ev in events:
            await x.bind(q, f"{queue}.{ev}")
        return Subscription(self, q)


class Subscription:
    def __init__(self, app: App, queue: Any) -> None:
        self.app = app
        self._q = queue

    def __aiter__(self) -> AsyncIterator[st.Event]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[st.Event]:
        while True:
            got = await self.get(wait=5.0)
            for ev in got:
                yield ev

    async def get(self, wait: float = 1.0, max_events: int = 100) -> list[st.Event]:
        """Events that arrived (waiting up to ``wait`` seconds for the first)."""
        rt = self.app.runtime()
        return await rt.acall(self._get(wait, max_events))

    async def _get(self, wait: float, max_events: int) -> list[st.Event]:
        got = await self._q.receive(max_events, wait=wait)
        if got:
            await self._q.ack_batch(got)
        return [st.decode_event(m.body) for m in got]

    async def _close(self) -> None:
        with _suppress():
            await self._q.delete()


@dataclass
class FailedJob:
    job_id: str
    task: str
    error: str
    error_type: str
    traceback: str
    attempts: int
    failed_at: float


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, e: Any, tb: Any) -> bool:
        return et is not None and issubclass(et, errors.ConveyorError)


def _default_name(fn: Callable[..., Any]) -> str:
    module = fn.__module__
    if module == "__main__":
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name:
            module = spec.name
        else:
            path = getattr(main, "__file__", None)
            module = os.path.splitext(os.path.basename(path))[0] if path else module
    return f"{module}.{fn.__qualname__}"


async def gather_limited(coros: Iterable[Awaitable[T]], limit: int = 16) -> list[T]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[T]) -> T:
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))
