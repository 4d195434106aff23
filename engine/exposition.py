"""Plain numbers as a Prometheus text page, for a server with its own ``/metrics`` handler
(``fair serve-student``'s batching counters). prometheus-client only: the trainer may import it.
A run's engine metrics are ``engine.request.metrics``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


def exposition(
    prefix: str, counters: Mapping[str, float], gauges: Mapping[str, float] | None = None
) -> tuple[bytes, str]:
    """``(body, content type)`` of a ``/metrics`` page: ``{prefix}_{name}`` per number, counters
    with ``_total``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Numbers(prefix, counters, gauges or {}))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class Numbers:
    """A collector of fixed counters and gauges."""

    def __init__(self, prefix: str, counters: Mapping[str, float], gauges: Mapping[str, float]):
        self.prefix, self.counters, self.gauges = prefix, counters, gauges

    def collect(self) -> Iterator[Metric]:
        for name, value in self.counters.items():
            yield CounterMetricFamily(f"{self.prefix}_{name}", name.replace("_", " "), value=value)
        for name, value in self.gauges.items():
            yield GaugeMetricFamily(f"{self.prefix}_{name}", name.replace("_", " "), value=value)
