"""The fleet's /metrics: every replica's own series with a `replica` label, plus the ingress's.

Each replica publishes its app's Prometheus text in its routing stats; the ingress merges the
families (one family, samples from every replica, each labelled `replica="<id>"`) and adds its
own per-replica counters: requests answered and requests that failed because a replica died.
Torch-free and Ray-free, so it is tested on plain strings.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

P = "chameleon:"


def merge_replica_metrics(texts: Mapping[str, str]) -> list[Metric]:
    """One family per name; each sample gains `replica`."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            merged = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            for s in fam.samples:
                merged.samples.append(s._replace(labels={**s.labels, "replica": replica}))
    return list(families.values())


class _Fleet:
    def __init__(self, fleet: Mapping[str, Mapping[str, Any]], served: Mapping[str, int], failed: int) -> None:
        self.fleet, self.served, self.failed = fleet, served, failed

    def collect(self) -> Iterator[Metric]:
        texts = {rid: str(s.get("metrics", "")) for rid, s in self.fleet.items() if s.get("metrics")}
        yield from merge_replica_metrics(texts)
        answered = CounterMetricFamily(
            f"{P}replica_requests", "Requests the ingress sent to each replica", labels=["replica"]
        )
        for rid, n in sorted(self.served.items()):
            answered.add_metric([rid], n)
        yield answered
        lost = CounterMetricFamily(f"{P}replica_unavailable", "Requests ended because their replica was unavailable")
        lost.add_metric([], self.failed)
        yield lost
        device = GaugeMetricFamily(
            f"{P}replica_device_adapters", "Adapters on each replica's device", labels=["replica"]
        )
        for rid, s in sorted(self.fleet.items()):
            device.add_metric([rid], len(s.get("device", ())))
        yield device


def render_fleet_metrics(fleet: Mapping[str, Mapping[str, Any]], served: Mapping[str, int], failed: int) -> bytes:
    """Prometheus text for the whole fleet (`fleet`: replica id -> its routing stats)."""
    registry = CollectorRegistry()
    registry.register(_Fleet(fleet, served, failed))  # type: ignore[arg-type]
    return generate_latest(registry)
