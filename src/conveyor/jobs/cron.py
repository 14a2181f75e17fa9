"""Cron expressions and repeatable schedules, enqueued once per tick across workers.

Every worker runs the schedule loop. For a tick T of schedule S, a worker *claims* the
tick by sending ``{"tick": T}`` to S's state queue ``<app>.cron.<S>`` with dedup id
``str(T)`` (dedup window 1 day). Only the send that stores the record (SendResult.stored)
enqueues the job, so each tick is enqueued exactly once however many workers run and
however far apart their clocks are (up to the window). The state queue keeps only the
latest record (max_length=1, drop-oldest): the last claimed tick, read with ``peek``.

Catch-up after downtime: when a worker starts (or wakes late), it looks at the most
recent due tick. If that tick is newer than the last claimed one and at most
``misfire_grace`` seconds old, it is enqueued once; older missed ticks are skipped
(coalesced). Default grace: one interval, at most one hour.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import msgspec

from conveyor.jobs import serialization

if TYPE_CHECKING:
    from conveyor.jobs.app import App, Schedule

log = logging.getLogger("conveyor.jobs.cron")

CLAIM_WINDOW = 86400.0

_NAMES = {
    "jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6, "jul": 7, "aug": 8,
    "sep": 9, "oct": 10, "nov": 11, "dec": 12,
    "sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6,
}  # fmt: skip
_ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}  # fmt: skip


def _field(text: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.lower().split(","):
        step = 1
        if "/" in part:
            part, step_s = part.split("/", 1)
            step = int(step_s)
            if step < 1:
                raise ValueError(f"bad step in {text!r}")
        if part in ("*", ""):
            a, b = low, high
        elif "-" in part:
            a_s, b_s = part.split("-", 1)
            a, b = _num(a_s), _num(b_s)
        else:
            a = _num(part)
            b = high if step > 1 else a
        if not (low <= a <= high and low <= b <= high and a <= b):
            raise ValueError(f"{text!r} is outside {low}-{high}")
        values.update(range(a, b + 1, step))
    return frozenset(values)


def _num(s: str) -> int:
    return _NAMES[s] if s in _NAMES else int(s)


class Cron:
    """A five-field cron expression (minute hour day-of-month month day-of-week), with
    ``*``, lists, ranges, steps, month/day names and @daily-style aliases. As in
    Vixie cron, when both day fields are restricted a day matching either one fires."""

    def __init__(self, expr: str, tz: str = "UTC") -> None:
        text = _ALIASES.get(expr.strip(), expr)
        parts = text.split()
        if len(parts) != 5:
            raise ValueError(f"cron expression {expr!r} needs 5 fields")
        try:
            self.minute = _field(parts[0], 0, 59)
            self.hour = _field(parts[1], 0, 23)
            self.dom = _field(parts[2], 1, 31)
            self.month = _field(parts[3], 1, 12)
            dow = _field(parts[4].replace("7", "0"), 0, 6)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"cron expression {expr!r}: {exc}") from None
        self.dow = dow
        self.dom_any = parts[2] == "*"
        self.dow_any = parts[4] == "*"
        self.tz = ZoneInfo(tz)
        self.expr = expr

    def _day_ok(self, d: datetime) -> bool:
        dom_ok = d.day in self.dom
        dow_ok = (d.weekday() + 1) % 7 in self.dow
        if self.dom_any or self.dow_any:
            return dom_ok and dow_ok
        return dom_ok or dow_ok

    def next_after(self, ts: float) -> float:
        """The first fire time strictly after ``ts`` (epoch seconds)."""
        t = datetime.fromtimestamp(ts, self.tz).replace(second=0, microsecond=0)
        t += timedelta(minutes=1)
        limit = t + timedelta(days=366 * 5)
        while t < limit:
            if t.month not in self.month:
                t = (t.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
                continue
            if not self._day_ok(t):
                t = t.replace(hour=0, minute=0) + timedelta(days=1)
                continue
            if t.hour not in self.hour:
                t = t.replace(minute=0) + timedelta(hours=1)
                continue
            if t.minute not in self.minute:
                t += timedelta(minutes=1)
                continue
            return t.timestamp()
        raise ValueError(f"cron expression {self.expr!r} never fires")

    def last_at_or_before(self, ts: float, horizon: float = 366 * 86400) -> float | None:
        """The latest fire time <= ``ts`` within ``horizon`` seconds, or None."""
        t = self.next_after(ts - horizon - 60)
        if t > ts:
            return None
        while True:
            n = self.next_after(t)
            if n > ts:
                return t
            t = n


class Ticker:
    """Tick arithmetic for one schedule (cron or every N seconds)."""

    def __init__(self, sched: Schedule) -> None:
        self.sched = sched
        self.cron = Cron(sched.cron, sched.tz) if sched.cron else None
        if self.cron is not None:
            a = self.cron.next_after(time.time())
            interval = self.cron.next_after(a) - a
        else:
            assert sched.every is not None
            interval = sched.every
        self.grace = (
            sched.misfire_grace if sched.misfire_grace is not None else min(interval, 3600.0)
        )

    def next_after(self, ts: float) -> float:
        if self.cron is not None:
            return self.cron.next_after(ts)
        every = self.sched.every
        assert every is not None
        return (math.floor(ts / every) + 1) * every

    def last_due(self, ts: float) -> float | None:
        if self.cron is not None:
            return self.cron.last_at_or_before(ts, horizon=max(self.grace, 60.0) + 60)
        every = self.sched.every
        assert every is not None
        return math.floor(ts / every) * every


class _Claim(msgspec.Struct):
    tick: float
    job_id: str = ""


async def claim_and_enqueue(app: App, sched: Schedule, tick: float) -> str | None:
    """Enqueue the job for ``tick`` if no worker has; returns the job id if this call
    enqueued it."""
    rt = app.runtime()
    state = await rt.queue(
        app.names.schedule(sched.name),
        {"max_length": 1, "overflow": "drop-oldest", "dedup_window": CLAIM_WINDOW},
    )
    sig = sched.signature
    jid, msg = app.build(sig, schedule=sched.name, tick=tick)
    claim = serialization.encode_value(_Claim(tick, jid), "json")
    from conveyor.model import NewMessage

    (res,) = await rt.conn.backend.send_batch(
        state.name, [NewMessage(body=claim, dedup_id=repr(tick))]
    )
    if not res.stored:
        return None
    if sig.opts.dedup is not None:
        (job,) = await app._enqueue_many([sig])  # honours simple/throttle/debounce keys
        jid = job.id
    else:
        q = await app._job_queue(sig.queue)
        await rt.conn.backend.send_batch(q.name, [msg])
    log.info("schedule %s: enqueued tick %s as job %s", sched.name, _iso(tick), jid)
    return jid


async def last_claimed(app: App, sched: Schedule) -> float | None:
    rt = app.runtime()
    state = await rt.queue(
        app.names.schedule(sched.name),
        {"max_length": 1, "overflow": "drop-oldest", "dedup_window": CLAIM_WINDOW},
    )
    recs = await state.peek(10)
    if not recs:
        return None
    best = max(recs, key=lambda d: d.sequence)
    claim: _Claim = serialization.decode_value(best.body, "json", _Claim)
    return claim.tick


async def run_schedules(app: App, stop: asyncio.Event) -> None:
    """The schedule loop every worker runs."""
    tickers = {name: Ticker(s) for name, s in app.schedules.items()}
    if not tickers:
        return
    now = time.time()
    nxt: dict[str, float] = {}
    for name, tk in tickers.items():
        try:
            due = tk.last_due(now)
            if due is not None and now - due <= tk.grace:
                last = await last_claimed(app, tk.sched)
                if last is None or last < due:
                    await claim_and_enqueue(app, tk.sched, due)
        except Exception:
            log.exception("schedule %s: catch-up failed", name)
        nxt[name] = tk.next_after(now)
    while not stop.is_set():
        name = min(nxt, key=lambda n: nxt[n])
        wait = nxt[name] - time.time()
        if wait > 0:
            try:
                await asyncio.wait_for(stop.wait(), min(wait, 60.0))
                return
            except TimeoutError:
                continue
        tick = nxt[name]
        tk = tickers[name]
        if time.time() - tick <= tk.grace:
            try:
                await claim_and_enqueue(app, tk.sched, tick)
            except Exception:
                log.exception("schedule %s: enqueue of tick %s failed", name, _iso(tick))
        nxt[name] = tk.next_after(max(tick, time.time() - tk.grace))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts).isoformat(timespec="seconds")


def describe(app: App) -> list[dict[str, Any]]:
    out = []
    for s in app.schedules.values():
        tk = Ticker(s)
        out.append({"name": s.name, "next": _iso(tk.next_after(time.time()))})
    return out
