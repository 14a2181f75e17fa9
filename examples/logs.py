"""Log processing: many producers write log lines to a queue; an aggregator job
takes them in batches of up to 500 and keeps counts per service and level.

Producers only send (they never wait for processing), so bursts are absorbed by the
queue. The aggregator is a repeatable job (every 0.2 s here); however many workers run,
each tick is enqueued once, and the simple-dedup key keeps a single aggregation at a
time. Counts live in a small state queue holding the latest totals (max_length=1).

    python examples/logs.py [DATA_DIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from collections import Counter

import conveyor
from conveyor.jobs import App, Worker, simple

app = App("logs")
RAW = "logs.raw"
TOTALS = "logs.totals"
LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


@app.task(queue="aggregate", keep_result=False)
async def aggregate(batch: int = 500) -> int:
    """Fold waiting log lines into the totals; returns how many were folded."""
    conn = app.runtime().conn
    raw = await conn.queue(RAW)
    totals_q = await conn.queue(TOTALS, max_length=1, overflow="drop-oldest")
    last = await totals_q.peek(1)
    totals = Counter(json.loads(last[0].body) if last else {})
    folded = 0
    while True:
        msgs = await raw.receive(batch)
        if not msgs:
            break
        for m in msgs:
            service, level, _ = m.body.decode().split(" ", 2)
            totals[f"{service}:{level}"] += 1
        # Totals first, then ack: a crash in between re-counts a batch at most once.
        await totals_q.send(json.dumps(totals))
        await raw.ack_batch(msgs)
        folded += len(msgs)
    return folded


# One aggregation at a time: a tick while the previous run is still going is dropped.
app.schedule(
    "aggregate-logs", aggregate.with_options(dedup=simple("aggregate-logs")).s(), every=0.2
)


def producer(q: conveyor.Queue, service: str, lines: int) -> None:
    batch = []
    for i in range(lines):
        batch.append(f"{service} {LEVELS[i % 4]} request {i} took {i % 97} ms")
        if len(batch) == 100:
            q.send_batch(batch)
            batch = []
    if batch:
        q.send_batch(batch)


def main(data: str, producers: int = 8, lines: int = 500) -> dict[str, int]:
    app.connect(data)
    stop = threading.Event()
    worker = threading.Thread(target=Worker(app).run, args=(stop,))
    worker.start()
    # The producers are threads sharing one blocking connection (it is thread-safe).
    with conveyor.connect(data) as mq:
        raw = mq.queue(RAW)
        threads = [
            threading.Thread(target=producer, args=(raw, f"svc{i}", lines))
            for i in range(producers)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    want = producers * lines
    totals: dict[str, int] = {}
    try:
        with conveyor.connect(data) as mq:
            q = mq.queue(TOTALS, max_length=1, overflow="drop-oldest")
            while time.monotonic() - t0 < 60:
                last = q.peek(1)
                totals = json.loads(last[0].body) if last else {}
                if sum(totals.values()) >= want:
                    break
                time.sleep(0.1)
    finally:
        stop.set()
        worker.join()
        app.close()
    print(f"{sum(totals.values())} lines from {producers} producers in "
          f"{time.monotonic() - t0:.2f}s")  # fmt: skip
    return totals


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="conveyor-"))
