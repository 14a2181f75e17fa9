"""Send a welcome email on sign-up, in the background.

The sign-up handler enqueues and returns at once; a worker sends the email. The email
provider allows 20 sends per second across all workers (a shared rate limit), a
failed send is retried with exponential backoff, and a double-submitted sign-up sends
one email (dedup by address).

    python examples/email_signup.py [DATA_DIR]
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time

from conveyor.jobs import App, Worker, exponential, simple

app = App("signup")
app.queue("emails", rate_limit="20/s", visibility_timeout=10)

OUTBOX: list[tuple[str, str]] = []
_flaky = {"bob@example.com"}  # the provider fails once for this address


@app.task(queue="emails", max_attempts=5, backoff=exponential(0.05, max=1))
def send_welcome(to: str, name: str) -> str:
    if to in _flaky:
        _flaky.discard(to)
        raise ConnectionError("SMTP provider timed out")
    OUTBOX.append((to, f"Welcome, {name}!"))
    return f"sent to {to}"


def sign_up(email: str, name: str) -> str:
    """The web handler: store the user (not shown), enqueue the email, return."""
    job = send_welcome.with_options(dedup=simple(f"welcome:{email}")).enqueue(email, name)
    return job.id


def main(data: str) -> list[tuple[str, str]]:
    app.connect(data)
    stop = threading.Event()
    worker = threading.Thread(target=Worker(app, concurrency=4).run, args=(stop,))
    worker.start()
    try:
        t0 = time.monotonic()
        ids = [sign_up(f"user{i}@example.com", f"User {i}") for i in range(30)]
        ids.append(sign_up("bob@example.com", "Bob"))
        sign_up("bob@example.com", "Bob")  # double submit: deduplicated
        for jid in ids:
            print(app.job(jid).result(timeout=30))
        print(f"{len(OUTBOX)} emails in {time.monotonic() - t0:.2f}s (limit 20/s)")
    finally:
        stop.set()
        worker.join()
        app.close()
    return OUTBOX


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="conveyor-"))
