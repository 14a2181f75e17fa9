"""Dramatiq over RabbitMQ (its recommended broker); no result backend."""

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

broker = RabbitmqBroker(url="amqp://guest:guest@127.0.0.1:5672/%2F")
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench-dramatiq", max_retries=0)
def noop() -> None:
    return None
