"""Serving metrics: per-request records in, one `RunSummary` out. Pure Python + numpy.

Every rule and its reason: `docs/workloads.md` (Metrics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import numpy as np

__all__ = [
    "HEADLINE_KEYS",
    "RequestRecord",
    "RunSummary",
    "percentile",
    "summarize",
    "throughput_at_slo",
]

_NAN = float("nan")
# The keys every benchmark table shows, in this order (`RunSummary.as_dict` puts them first).
HEADLINE_KEYS: tuple[str, ...] = (
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "tbt_p99_s",
    "throughput_rps",
    "slo_attainment",
    "adapter_hit_rate",
    "queue_share",
)


def _float_tuple(values: Iterable[float]) -> tuple[float, ...]:
    return tuple(values)


@attrs.frozen
class RequestRecord:
    """What an engine run records per request (finished or not)."""

    request_id: str
    adapter: str | None
    arrival_s: float
    first_scheduled_s: float | None
    first_token_s: float | None
    finish_s: float | None
    prompt_len: int
    output_len: int  # tokens generated
    token_times_s: tuple[float, ...] = attrs.field(default=(), converter=_float_tuple)  # time of each generated token
    finish_reason: str = "length"

    @property
    def finished(self) -> bool:
        return self.finish_s is not None and self.finish_reason != "abort"

    @property
    def ttft_s(self) -> float:
        """Time to first token; +inf if it never got one."""
        return math.inf if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def queue_s(self) -> float | None:
        return None if self.first_scheduled_s is None else self.first_scheduled_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    def tbt_gaps_s(self) -> list[float]:
        t = self.token_times_s
        return [t[i] - t[i - 1] for i in range(1, len(t))]

    def own_tbt_s(self) -> float:
        """P99 of own gaps; mean gap fallback without token times; 0.0 with < 2 tokens."""
        gaps = self.tbt_gaps_s()
        if gaps:
            return percentile(gaps, 99)
        if self.finished and self.first_token_s is not None and self.output_len >= 2:
            return (self.finish_s - self.first_token_s) / (self.output_len - 1)  # type: ignore[operator]
        return 0.0

    @classmethod
    def from_metrics(
        cls,
        request_id: str,
        adapter: str | None,
        metrics: Any,
        *,
        token_times_s: Sequence[float] = (),
        finish_reason: str | None = "length",
    ) -> RequestRecord:
        """Build from a `chameleon.outputs.RequestMetrics` (duck-typed: no engine import here)."""
        return cls(
            request_id=request_id,
            adapter=adapter,
            arrival_s=metrics.arrival_time,
            first_scheduled_s=metrics.first_scheduled_time,
            first_token_s=metrics.first_token_time,
            finish_s=metrics.finish_time,
            prompt_len=metrics.num_prompt_tokens,
            output_len=metrics.num_generated_tokens,
            token_times_s=tuple(token_times_s),
            finish_reason=finish_reason or "length",
        )


def percentile(values: Iterable[float], q: float) -> float:
    """numpy's 'linear' percentile (q in [0, 100]); NaN for no values; +inf-safe."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    v = sorted(float(x) for x in values)
    if not v:
        return _NAN
    h = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(h), math.ceil(h)
    if v[lo] == v[hi]:
        return v[lo]  # also avoids inf - inf
    return v[lo] + (h - lo) * (v[hi] - v[lo])


@attrs.frozen(kw_only=True)
class RunSummary:
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tbt_p50_s: float
    tbt_p99_s: float
    queue_share: float  # mean fraction of TTFT spent queued before first admission
    throughput_rps: float  # finished requests / makespan
    tokens_per_s: float  # generated tokens of finished requests / makespan
    slo_attainment: float  # fraction of all requests finished within both SLOs
    num_requests: int
    num_finished: int
    adapter_hit_rate: float | None
    duration_s: float  # makespan: last finish - first arrival
    # extras
    ttft_mean_s: float = _NAN  # over served requests only (the mean of +inf would say nothing)
    tbt_p90_s: float = _NAN
    queue_share_e2e: float = _NAN
    mean_queue_s: float = _NAN
    num_unserved: int = 0  # requests that never got a first token
    ttft_p999_s: float = _NAN  # the extreme tail, beside P99 (what SLO triage trades)
    ttft_max_s: float = _NAN
    ttft_miss_share: float = _NAN  # fraction of requests whose TTFT exceeds the TTFT SLO (or unserved)
    slo_ttft_s: float = _NAN
    slo_tbt_s: float = _NAN

    def as_dict(self) -> dict[str, Any]:
        """Headline keys first (in the order benchmarks print them), then the rest."""
        d = attrs.asdict(self)
        return {**{k: d[k] for k in HEADLINE_KEYS}, **{k: v for k, v in d.items() if k not in HEADLINE_KEYS}}


def summarize(
    records: Iterable[RequestRecord],
    *,
    slo_ttft_s: float,
    slo_tbt_s: float,
    adapter_hit_rate: float | None = None,
) -> RunSummary:
    """Aggregate one run's records (see the module docstring for every definition)."""
    recs = list(records)
    ttft = [r.ttft_s for r in recs]
    tbt = [g for r in recs for g in r.tbt_gaps_s()]
    finished = [r for r in recs if r.finished]
    makespan = _makespan(recs)
    served_ttft = [t for t in ttft if math.isfinite(t)]
    return RunSummary(
        ttft_p50_s=percentile(ttft, 50),
        ttft_p90_s=percentile(ttft, 90),
        ttft_p99_s=percentile(ttft, 99),
        tbt_p50_s=percentile(tbt, 50),
        tbt_p90_s=percentile(tbt, 90),
        tbt_p99_s=percentile(tbt, 99),
        queue_share=_queue_share(recs),
        queue_share_e2e=_queue_share_e2e(finished),
        mean_queue_s=_mean([q for r in recs if (q := r.queue_s) is not None]),
        throughput_rps=len(finished) / makespan if makespan > 0 else 0.0,
        tokens_per_s=sum(r.output_len for r in finished) / makespan if makespan > 0 else 0.0,
        slo_attainment=_slo_attainment(recs, slo_ttft_s, slo_tbt_s),
        num_requests=len(recs),
        num_finished=len(finished),
        num_unserved=len(recs) - len(served_ttft),
        adapter_hit_rate=adapter_hit_rate,
        duration_s=makespan,
        ttft_mean_s=_mean(served_ttft),
        ttft_p999_s=percentile(ttft, 99.9),
        ttft_max_s=max(ttft, default=_NAN),
        ttft_miss_share=sum(1 for t in ttft if not t <= slo_ttft_s) / len(ttft) if ttft else _NAN,
        slo_ttft_s=slo_ttft_s,
        slo_tbt_s=slo_tbt_s,
    )


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else _NAN


def _makespan(recs: Sequence[RequestRecord]) -> float:
    ends = [r.finish_s for r in recs if r.finish_s is not None]
    if not ends:
        return 0.0
    return max(ends) - min(r.arrival_s for r in recs)


def _queue_share(recs: Sequence[RequestRecord]) -> float:
    shares = [
        r.queue_s / r.ttft_s  # type: ignore[operator]
        for r in recs
        if r.queue_s is not None and math.isfinite(r.ttft_s) and r.ttft_s > 0
    ]
    return _mean(shares)


def _queue_share_e2e(finished: Sequence[RequestRecord]) -> float:
    shares = [
        r.queue_s / r.e2e_s  # type: ignore[operator]
        for r in finished
        if r.queue_s is not None and r.e2e_s is not None and r.e2e_s > 0
    ]
    return _mean(shares)


def _slo_attainment(recs: Sequence[RequestRecord], slo_ttft_s: float, slo_tbt_s: float) -> float:
    if not recs:
        return _NAN
    ok = sum(1 for r in recs if r.finished and r.ttft_s <= slo_ttft_s and r.own_tbt_s() <= slo_tbt_s)
    return ok / len(recs)


def throughput_at_slo(
    run: Callable[[float], RunSummary],
    rates: Sequence[float],
    *,
    slo_ttft_s: float,
    refine_steps: int = 4,
) -> float:
    """Highest request rate whose P99 TTFT ≤ `slo_ttft_s`.

    Assumes P99 TTFT is non-decreasing in the rate (more load never helps), so: evaluate `rates`
    in ascending order and stop at the first failing one; then bisect `refine_steps` times between
    the last passing and the first failing rate, keeping the passing side. The answer is a passing
    rate within (first_fail - last_pass) / 2**refine_steps below the true threshold. Returns the
    highest given rate if all pass (nothing above it was tried) and 0.0 if the lowest one fails.
    A NaN P99 (a run without requests) counts as failing. `run` is called once per evaluated rate.
    """
    lo, hi = _scan(run, sorted(rates), slo_ttft_s)
    if lo is None:
        return 0.0
    if hi is None:
        return lo
    for _ in range(refine_steps):
        mid = (lo + hi) / 2.0
        if _passes(run(mid), slo_ttft_s):
            lo = mid
        else:
            hi = mid
    return lo


def _scan(
    run: Callable[[float], RunSummary], rates: Sequence[float], slo_ttft_s: float
) -> tuple[float | None, float | None]:
    """(last passing rate, first failing rate) of an ascending scan that stops at the first failure."""
    last_pass: float | None = None
    for rate in rates:
        if not _passes(run(rate), slo_ttft_s):
            return last_pass, rate
        last_pass = rate
    return last_pass, None


def _passes(summary: RunSummary, slo_ttft_s: float) -> bool:
    return summary.ttft_p99_s <= slo_ttft_s  # False for NaN
