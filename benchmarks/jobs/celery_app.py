"""Celery over RabbitMQ, tuned for short tasks as its optimizing guide says: results
ignored, a larger prefetch multiplier, no gossip/mingle/heartbeat (worker flags)."""

from celery import Celery

app = Celery("bench", broker="amqp://guest:guest@127.0.0.1:5672//")
app.conf.update(
    task_ignore_result=True,
    worker_prefetch_multiplier=64,
    task_acks_late=False,
    broker_connection_retry_on_startup=True,
    task_default_queue="bench-celery",
    worker_hijack_root_logger=False,
)


@app.task(ignore_result=True)
def noop() -> None:
    return None
