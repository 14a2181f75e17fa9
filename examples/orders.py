"""An order pipeline: charge payment, update inventory, send the confirmation,
notify shipping -- one job per step, chained, each retried on failure.

Retries make every step run at least once, so each step is idempotent: the payment
provider takes an idempotency key (the order id), so a charge whose reply was lost
and is retried never charges twice; inventory and shipping do the same with their
own keys.

    python examples/orders.py [DATA_DIR]
"""

from __future__ import annotations

import sys
import tempfile
import threading
from typing import Any

from conveyor.jobs import App, NonRetryableError, Worker, chain, fixed

app = App("shop")


class PaymentProvider:
    """A stand-in for Stripe & co: charges are keyed by an idempotency key."""

    def __init__(self) -> None:
        self.charges: dict[str, int] = {}
        self.calls = 0
        self._lock = threading.Lock()
        self.drop_reply_once: set[str] = set()

    def charge(self, idempotency_key: str, cents: int) -> str:
        with self._lock:
            self.calls += 1
            if idempotency_key not in self.charges:
                self.charges[idempotency_key] = cents
            if idempotency_key in self.drop_reply_once:  # charged, but the reply is lost
                self.drop_reply_once.discard(idempotency_key)
                raise TimeoutError("payment provider did not answer")
        return f"ch_{idempotency_key}"


payments = PaymentProvider()
stock = {"widget": 10, "gadget": 5}
reserved: set[str] = set()
emails: list[str] = []
shipments: dict[str, str] = {}


@app.task(queue="orders", max_attempts=4, backoff=fixed(0.05))
def charge_payment(order: dict[str, Any]) -> dict[str, Any]:
    charge = payments.charge(idempotency_key=order["id"], cents=order["cents"])
    return {**order, "charge": charge}


@app.task(queue="orders", max_attempts=4, backoff=fixed(0.05))
def update_inventory(order: dict[str, Any]) -> dict[str, Any]:
    if order["id"] not in reserved:  # idempotent: reserve once per order
        if stock[order["item"]] < order["qty"]:
            raise NonRetryableError(f"out of stock: {order['item']}")
        stock[order["item"]] -= order["qty"]
        reserved.add(order["id"])
    return order


@app.task(queue="orders", max_attempts=4, backoff=fixed(0.05))
def send_confirmation(order: dict[str, Any]) -> dict[str, Any]:
    note = f"order {order['id']} confirmed ({order['charge']})"
    if note not in emails:
        emails.append(note)
    return order


@app.task(queue="orders", max_attempts=4, backoff=fixed(0.05))
def notify_shipping(order: dict[str, Any]) -> str:
    shipments.setdefault(order["id"], f"ship {order['qty']} x {order['item']}")
    return shipments[order["id"]]


def place_order(order: dict[str, Any]) -> Any:
    return chain(
        charge_payment.s(order), update_inventory.s(), send_confirmation.s(), notify_shipping.s()
    ).enqueue()


def main(data: str) -> dict[str, Any]:
    app.connect(data)
    payments.drop_reply_once.add("o-2")
    stop = threading.Event()
    worker = threading.Thread(target=Worker(app, concurrency=8).run, args=(stop,))
    worker.start()
    try:
        flows = [
            place_order({"id": f"o-{i}", "item": "widget", "qty": 2, "cents": 1999})
            for i in range(1, 4)
        ]
        for f in flows:
            print(f.result(timeout=30))
    finally:
        stop.set()
        worker.join()
        app.close()
    print("charges:", payments.charges, "provider calls:", payments.calls)
    return {"charges": payments.charges, "calls": payments.calls, "stock": stock,
            "emails": emails, "shipments": shipments}  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="conveyor-"))
