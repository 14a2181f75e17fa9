"""Prometheus metrics for ``GET /metrics``.

Per-queue gauges and counters are read from ``broker.stats`` at scrape time (the
engine keeps the totals, so they survive restarts and count every protocol);
latency histograms are observed by the listeners as they deliver.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from conveyor import errors
from conveyor.model import Delivery, QueueStats

if TYPE_CHECKING:
    from conveyor.broker import Broker

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip

#: How prometheus_client writes an ``le`` label (typed here: the library's is not).
_le_label: Callable[[float], str] = floatToGoString

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


class _Series:
    """One label value's bucket counts (not cumulative; the last bucket is +Inf)."""

    __slots__ = ("_bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # A value lands in the first bucket whose bound is >= it, as in prometheus_client.
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value

    def observe_many(self, values: Iterable[float]) -> None:
        bounds, counts = self._bounds, self.counts
        total = 0.0
        for value in values:
            counts[bisect_left(bounds, value)] += 1
            total += value
        self.sum += total


class BatchHistogram:
    """A histogram with one label that takes many observations in one call.

    prometheus_client's Histogram costs a lock and a bucket scan per value (2-3 us); a
    receive reports up to hundreds of deliveries at once, so the server spent more on
    this metric than on encoding the messages (measured). This exposes the same samples
    (``_bucket`` by ``le``, ``_count``, ``_sum``, ``_created``, per label value created
    at its first observation) in the same order. Observed and collected on the event
    loop only, which is why it needs no lock.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self._bounds = (*(float(b) for b in buckets), math.inf)
        self._le = tuple(_le_label(b) for b in self._bounds)
        self._series: dict[str, _Series] = {}
        registry.register(self)

    def labels(self, value: str) -> _Series:
        series = self._series.get(value)
        if series is None:
            series = self._series[value] = _Series(self._bounds)
        return series

    def describe(self) -> Iterable[Metric]:
        return [Metric(self.name, self.documentation, "histogram")]

    def collect(self) -> Iterator[Metric]:
        name, label = self.name, self.label
        metric = Metric(name, self.documentation, "histogram")
        # prometheus_client's switch (disable_created_metrics / its environment variable).
        created = getattr(prometheus_metrics, "_use_created", True)
        for value, series in list(self._series.items()):
            acc = 0.0
            for le, n in zip(self._le, series.counts, strict=True):
                acc += n
                metric.add_sample(name + "_bucket", {label: value, "le": le}, acc)
            metric.add_sample(name + "_count", {label: value}, acc)
            metric.add_sample(name + "_sum", {label: value}, series.sum)
            if created:
                metric.add_sample(name + "_created", {label: value}, series.created)
        yield metric


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.receive_seconds = BatchHistogram(
            "conveyor_receive_seconds",
            "Time a receive call took, long-poll wait included",
            "protocol",
            _LATENCY_BUCKETS,
            self.registry,
        )
        self.deliver_seconds = BatchHistogram(
            "conveyor_publish_to_deliver_seconds",
            "From a message's send to its first delivery",
            "protocol",
            _LATENCY_BUCKETS,
            self.registry,
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
        self.deliver_seconds.labels(protocol).observe_many(
            [max(0.0, now - d.sent_at) for d in deliveries if d.receive_count <= 1]
        )

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
