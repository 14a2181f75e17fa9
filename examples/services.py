"""Two services talking through queues, with replies.

The *pricing* service owns the ``quote`` task. The *orders* service does not import
pricing's code: it enqueues ``pricing.quote`` by name and waits for the reply (the job's
result). Each service has its own App with its own tasks and workers; the two Apps
share a namespace ("services"), so they see each other's queues and results, and each
worker serves only its own service's queues. They share nothing else than conveyor (a
data directory here, a server in production).

    python examples/services.py [DATA_DIR]
"""

from __future__ import annotations

import sys
import tempfile
import threading
from typing import Any

from conveyor.jobs import App, Worker

# -- the pricing service -----------------------------------------------------------------
pricing = App("services")
PRICES = {"widget": 1999, "gadget": 4999}


@pricing.task(name="pricing.quote", queue="quotes")
def quote(items: dict[str, int]) -> int:
    return sum(PRICES[name] * qty for name, qty in items.items())


# -- the orders service ------------------------------------------------------------------
orders = App("services")
# pricing's task by name: orders enqueues it into pricing's queue and awaits the reply.
remote_quote = orders.remote_task("pricing.quote", queue="quotes", return_type=int)


@orders.task(queue="checkout")
async def checkout(order_id: str, items: dict[str, int]) -> dict[str, Any]:
    reply = await remote_quote.aenqueue(items)
    total = await reply.aresult(timeout=10)
    return {"order": order_id, "total_cents": total}


def main(data: str) -> list[dict[str, Any]]:
    pricing.connect(data)
    orders.connect(data)
    stop = threading.Event()
    workers = [
        threading.Thread(target=Worker(pricing, concurrency=4).run, args=(stop,)),
        threading.Thread(target=Worker(orders, concurrency=4).run, args=(stop,)),
    ]
    for w in workers:
        w.start()
    try:
        jobs = [checkout.enqueue(f"o-{i}", {"widget": i, "gadget": 1}) for i in range(1, 6)]
        results = [j.result(timeout=30) for j in jobs]
        for r in results:
            print(r)
    finally:
        stop.set()
        for w in workers:
            w.join()
        pricing.close()
        orders.close()
    return results


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="conveyor-"))
