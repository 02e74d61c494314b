"""Prometheus metrics of one app: request counters and latency histograms, engine gauges at scrape.

Names follow vLLM's (`vllm:` becomes `chameleon:`). Each app has its own registry, so several apps
(tests, replicas in one process) never collide. Engine and adapter-cache figures come from
`engine.stats()` when /metrics is scraped; per-adapter running/waiting counts come from the
server's own view of its in-flight requests.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

P = "chameleon:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
_CACHE_COUNTERS = ("hits", "misses", "loads", "prefetches", "evictions", "bytes_loaded")


class InFlight:
    """The server's in-flight requests by adapter ("" is the base model) and state."""

    def __init__(self) -> None:
        self.waiting: Tally[str] = Tally()
        self.running: Tally[str] = Tally()

    @property
    def total(self) -> int:
        return sum(self.waiting.values()) + sum(self.running.values())

    def add(self, adapter: str | None) -> None:
        self.waiting[adapter or ""] += 1

    def started(self, adapter: str | None) -> None:
        self.waiting[adapter or ""] -= 1
        self.running[adapter or ""] += 1

    def done(self, adapter: str | None, started: bool) -> None:
        (self.running if started else self.waiting)[adapter or ""] -= 1


class ServerMetrics:
    """Everything /metrics shows; `observe_*` are called by the request handlers."""

    def __init__(
        self,
        stats: Callable[[], dict[str, Any]],
        adapter_names: Callable[[], list[str]],
        in_flight: InFlight,
        model_name: str,
    ) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name
        self.requests = Counter(
            f"{P}request_success", "Finished requests", [*labels, "finished_reason"], registry=self.registry
        )
        self.prompt_tokens = Counter(f"{P}prompt_tokens", "Prompt tokens processed", labels, registry=self.registry)
        self.generation_tokens = Counter(f"{P}generation_tokens", "Tokens generated", labels, registry=self.registry)
        self.ttft = Histogram(
            f"{P}time_to_first_token_seconds",
            "Time to first token",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tbt = Histogram(
            f"{P}inter_token_latency_seconds",
            "Time between tokens",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            f"{P}request_rejected",
            "Requests refused before reaching the engine",
            [*labels, "status"],
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(stats, adapter_names, in_flight, model_name))

    def observe_finished(self, reason: str | None, prompt_tokens: int, generated: int) -> None:
        self.requests.labels(self.model_name, reason or "abort").inc()
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self.generation_tokens.labels(self.model_name).inc(generated)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def observe_tbt(self, seconds: float) -> None:
        self.tbt.labels(self.model_name).observe(seconds)

    def observe_rejected(self, status: int) -> None:
        self.rejected.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges and cumulative counters read from `engine.stats()` at scrape time."""

    def __init__(
        self,
        stats: Callable[[], dict[str, Any]],
        adapter_names: Callable[[], list[str]],
        in_flight: InFlight,
        model_name: str,
    ) -> None:
        self._stats = stats
        self._adapter_names = adapter_names
        self._in_flight = in_flight
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield self._gauge("num_requests_running", "Requests in the running batch", s["requests"]["running"])
        yield self._gauge("num_requests_waiting", "Requests waiting for admission", s["requests"]["waiting"])
        yield self._gauge("num_requests_in_flight", "Requests the server is answering", self._in_flight.total)
        total = s["kv"]["blocks_total"] or 1
        yield self._gauge("kv_cache_usage_perc", "KV cache usage (1 = full)", s["kv"]["blocks_in_use"] / total)
        yield self._gauge("kv_blocks_in_use", "KV blocks in use", s["kv"]["blocks_in_use"])
        yield self._gauge("num_preemptions", "Preemptions so far", s["requests"]["preemptions"])
        yield self._gauge("adapters_registered", "Adapters registered", s["adapters"]["registered"])
        yield self._gauge("adapters_resident", "Adapters resident on the device", s["adapters"]["resident"])
        for name in _CACHE_COUNTERS:
            c = CounterMetricFamily(
                f"{P}adapter_{name}", f"Adapter cache {name.replace('_', ' ')}", labels=["model_name"]
            )
            c.add_metric([self._model], s["adapters"][name])
            yield c
        names = sorted(set(self._adapter_names()) | {a for a in self._in_flight.running if a})
        yield self._per_adapter(names)
        yield self._lora_info()

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(f"{P}{name}", doc, labels=["model_name"])
        g.add_metric([self._model], value)
        return g

    def _per_adapter(self, names: list[str]) -> GaugeMetricFamily:
        g = GaugeMetricFamily(
            f"{P}lora_requests", "In-flight requests per adapter and state", labels=["lora_name", "state"]
        )
        for name in names:
            g.add_metric([name, "running"], self._in_flight.running[name])
            g.add_metric([name, "waiting"], self._in_flight.waiting[name])
        return g

    def _lora_info(self) -> GaugeMetricFamily:
        """vLLM's `lora_requests_info`: adapters with running / waiting requests, as label values."""
        running = ",".join(sorted(a for a, n in self._in_flight.running.items() if a and n > 0))
        waiting = ",".join(sorted(a for a, n in self._in_flight.waiting.items() if a and n > 0))
        g = GaugeMetricFamily(
            f"{P}lora_requests_info",
            "Running and waiting adapters",
            labels=["running_lora_adapters", "waiting_lora_adapters"],
        )
        g.add_metric([running, waiting], time.time())
        return g
