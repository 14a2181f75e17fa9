"""Prometheus metrics for ``GET /metrics``.

Per-queue gauges and counters are read from ``broker.stats`` at scrape time (the
engine keeps the totals, so they survive restarts and count every protocol);
latency histograms are observed by the listeners as they deliver.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from conveyor import errors
from conveyor.model import Delivery, QueueStats

if TYPE_CHECKING:
    from conveyor.broker import Broker

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip

_GAUGES = (
    ("ready", "Messages ready for delivery"),
    ("in_flight", "Messages leased and not yet acknowledged"),
    ("delayed", "Messages waiting for their delay to pass"),
    ("consumers", "Long polls waiting plus registered consumers"),
    ("oldest_age", "Age in seconds of the oldest waiting message"),
)
_COUNTERS = (
    ("sent_total", "conveyor_messages_sent", "Messages accepted into the queue"),
    ("received_total", "conveyor_messages_received", "Deliveries (leases) handed out"),
    ("acked_total", "conveyor_messages_acked", "Messages acknowledged"),
    ("nacked_total", "conveyor_messages_nacked", "Leases released by nack"),
    ("expired_total", "conveyor_messages_expired", "Messages removed by TTL"),
    ("dead_lettered", "conveyor_messages_dead_lettered", "Messages sent to a dead-letter target"),
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.receive_seconds = Histogram(
            "conveyor_receive_seconds",
            "Time a receive call took, long-poll wait included",
            ["protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.deliver_seconds = Histogram(
            "conveyor_publish_to_deliver_seconds",
            "From a message's send to its first delivery",
            ["protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        #: name -> callable giving the number of open client connections.
        self.connection_sources: dict[str, Callable[[], int]] = {}
        self._snapshot: list[tuple[str, QueueStats]] = []
        self.registry.register(_BrokerCollector(self))

    def observe_receive(
        self, protocol: str, seconds: float, deliveries: Sequence[Delivery]
    ) -> None:
        self.receive_seconds.labels(protocol).observe(seconds)
        now = time.time()
        hist = self.deliver_seconds.labels(protocol)
        for d in deliveries:
            if d.receive_count <= 1:
                hist.observe(max(0.0, now - d.sent_at))

    async def render(self, broker: Broker) -> tuple[bytes, str]:
        snapshot: list[tuple[str, QueueStats]] = []
        for info in await broker.list_queues():
            try:
                snapshot.append((info.name, await broker.stats(info.name)))
            except errors.NotFound:
                continue  # deleted between the list and the stats call
        self._snapshot = snapshot
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _BrokerCollector:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        snapshot = self._metrics._snapshot
        for field, help_text in _GAUGES:
            g = GaugeMetricFamily(f"conveyor_queue_{field}", help_text, labels=["queue"])
            for name, stats in snapshot:
                g.add_metric([name], float(getattr(stats, field)))
            yield g
        for field, metric, help_text in _COUNTERS:
            c = CounterMetricFamily(metric, help_text, labels=["queue"])
            for name, stats in snapshot:
                c.add_metric([name], float(getattr(stats, field)))
            yield c
        conn = GaugeMetricFamily(
            "conveyor_connections", "Open client connections", labels=["protocol"]
        )
        for proto, source in self._metrics.connection_sources.items():
            conn.add_metric([proto], float(source()))
        yield conn
        yield GaugeMetricFamily("conveyor_queues", "Number of queues", value=len(snapshot))
