"""Metrics on hand-computed cases, and the throughput-at-SLO search."""

from __future__ import annotations

import math

import attrs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chameleon.harness.metrics import (
    HEADLINE_KEYS,
    RequestRecord,
    RunSummary,
    percentile,
    summarize,
    throughput_at_slo,
)


def _rec(rid: str, arrival: float, sched: float | None, tokens: tuple[float, ...], **kw: object) -> RequestRecord:
    return RequestRecord(
        request_id=rid,
        adapter=kw.pop("adapter", None),  # type: ignore[arg-type]
        arrival_s=arrival,
        first_scheduled_s=sched,
        first_token_s=tokens[0] if tokens else None,
        finish_s=kw.pop("finish", tokens[-1] if tokens else None),  # type: ignore[arg-type]
        prompt_len=10,
        output_len=len(tokens),
        token_times_s=tokens,
        **kw,  # type: ignore[arg-type]
    )


# A: queued 1 s, TTFT 2, gaps 0.1, 0.2.  B: no queueing, TTFT 0.5, gap 0.1.  C: queued 2 s, TTFT 4, gaps .5 .1 .1
A = _rec("A", 0.0, 1.0, (2.0, 2.1, 2.3), adapter="x")
B = _rec("B", 1.0, 1.0, (1.5, 1.6))
C = _rec("C", 2.0, 4.0, (6.0, 6.5, 6.6, 6.7), adapter="y")


def test_hand_computed_summary() -> None:
    s = summarize([A, B, C], slo_ttft_s=3.0, slo_tbt_s=0.3, adapter_hit_rate=0.75)
    # TTFT sorted [0.5, 2, 4]: h = 2q/100
    assert s.ttft_p50_s == pytest.approx(2.0)
    assert s.ttft_p90_s == pytest.approx(2 + 0.8 * 2)  # h = 1.8
    assert s.ttft_p99_s == pytest.approx(2 + 0.98 * 2)  # h = 1.98
    # TBT pooled [.1 .1 .1 .1 .2 .5]: p50 h=2.5 -> .1; p99 h=4.95 -> .2 + .95*.3
    assert s.tbt_p50_s == pytest.approx(0.1)
    assert s.tbt_p99_s == pytest.approx(0.485)
    # queue share of TTFT: A 1/2, B 0/0.5, C 2/4
    assert s.queue_share == pytest.approx(1 / 3)
    assert s.queue_share_e2e == pytest.approx((1 / 2.3 + 0 + 2 / 4.7) / 3)
    assert s.mean_queue_s == pytest.approx(1.0)
    # makespan 0 -> 6.7
    assert s.duration_s == pytest.approx(6.7)
    assert s.throughput_rps == pytest.approx(3 / 6.7)
    assert s.tokens_per_s == pytest.approx(9 / 6.7)
    # SLO: A (ttft 2, own p99 TBT .199) ok, B ok, C ttft 4 > 3
    assert s.slo_attainment == pytest.approx(2 / 3)
    assert (s.num_requests, s.num_finished, s.num_unserved) == (3, 3, 0)
    assert s.adapter_hit_rate == 0.75
    assert s.ttft_mean_s == pytest.approx(6.5 / 3)


def test_tbt_slo_uses_own_p99() -> None:
    assert A.own_tbt_s() == pytest.approx(0.1 + 0.99 * 0.1)
    s = summarize([A, B, C], slo_ttft_s=5.0, slo_tbt_s=0.15)
    # A's own p99 gap .199 > .15; B's .1 ok; C's gaps [.5 .1 .1] -> p99 .496 > .15
    assert s.slo_attainment == pytest.approx(1 / 3)


def test_unserved_and_aborted_requests() -> None:
    D = _rec("D", 3.0, None, ())  # never scheduled: TTFT = inf
    E = _rec("E", 0.5, 0.5, (1.0, 1.1), finish=1.1, finish_reason="abort")
    s = summarize([A, B, C, D, E], slo_ttft_s=3.0, slo_tbt_s=0.3)
    # TTFT [0.5, 0.5, 2, 4, inf]: p50 = 2, p90 h=3.6 touches inf
    assert s.ttft_p50_s == pytest.approx(2.0)
    assert s.ttft_p90_s == math.inf and s.ttft_p99_s == math.inf
    assert (s.num_requests, s.num_finished, s.num_unserved) == (5, 3, 1)
    assert s.slo_attainment == pytest.approx(2 / 5)  # D unserved and E aborted are misses
    assert s.throughput_rps == pytest.approx(3 / 6.7)


def test_tbt_fallback_without_token_times() -> None:
    r = RequestRecord("r", None, 0.0, 0.0, 1.0, 3.0, prompt_len=4, output_len=5)
    assert r.own_tbt_s() == pytest.approx(0.5)  # (3 - 1) / (5 - 1)
    s = summarize([r], slo_ttft_s=2.0, slo_tbt_s=0.4)
    assert math.isnan(s.tbt_p99_s) and s.slo_attainment == 0.0


def test_empty_inputs() -> None:
    s = summarize([], slo_ttft_s=5.0, slo_tbt_s=0.15)
    assert math.isnan(s.ttft_p99_s) and math.isnan(s.tbt_p99_s) and math.isnan(s.queue_share)
    assert math.isnan(s.slo_attainment)
    assert (s.num_requests, s.num_finished, s.throughput_rps, s.duration_s) == (0, 0, 0.0, 0.0)
    assert math.isnan(percentile([], 50))
    assert throughput_at_slo(lambda r: s, [], slo_ttft_s=5.0) == 0.0


def test_as_dict_keys() -> None:
    d = summarize([A, B], slo_ttft_s=5.0, slo_tbt_s=0.15).as_dict()
    assert tuple(d)[: len(HEADLINE_KEYS)] == HEADLINE_KEYS
    assert set(HEADLINE_KEYS) == {
        "ttft_p50_s",
        "ttft_p90_s",
        "ttft_p99_s",
        "tbt_p99_s",
        "throughput_rps",
        "slo_attainment",
        "adapter_hit_rate",
        "queue_share",
    }
    assert {"tbt_p50_s", "tokens_per_s", "num_requests", "num_finished", "duration_s"} <= set(d)


def test_from_metrics_duck_typed() -> None:
    from chameleon.outputs import RequestMetrics

    m = RequestMetrics(
        arrival_time=1.0,
        first_scheduled_time=1.5,
        first_token_time=2.0,
        finish_time=3.0,
        num_prompt_tokens=7,
        num_generated_tokens=3,
    )
    r = RequestRecord.from_metrics("q", "x", m, token_times_s=(2.0, 2.5, 3.0), finish_reason="stop")
    assert (r.ttft_s, r.queue_s, r.e2e_s, r.output_len, r.finish_reason) == (1.0, 0.5, 2.0, 3, "stop")


@given(
    st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=50),
    st.floats(min_value=0.0, max_value=100.0),
)
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q, method="linear")), abs=1e-6)


def test_percentile_with_inf() -> None:
    assert percentile([1.0, math.inf, math.inf], 99) == math.inf
    assert percentile([1.0, 3.0, math.inf], 50) == 3.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


# ----------------------------------------------------------------------------- throughput at SLO

_BASE = summarize([], slo_ttft_s=5.0, slo_tbt_s=0.15)


def _synthetic(threshold: float, calls: list[float]) -> object:
    """P99 TTFT = 5 s · exp(rate - threshold): monotone, crosses the 5 s SLO exactly at `threshold`."""

    def run(rate: float) -> RunSummary:
        calls.append(rate)
        return attrs.evolve(_BASE, ttft_p99_s=5.0 * math.exp(rate - threshold))

    return run


@pytest.mark.parametrize("threshold", [6.9, 8.6, 12.9])
def test_throughput_at_slo_bisects(threshold: float) -> None:
    calls: list[float] = []
    rates = [10.0, 2.0, 4.0, 6.0, 8.0, 14.0, 12.0]  # unsorted on purpose
    run = _synthetic(threshold, calls)
    got = throughput_at_slo(run, rates, slo_ttft_s=5.0, refine_steps=4)  # type: ignore[arg-type]
    assert threshold - 2.0 / 16 <= got <= threshold  # passing side, within the bisection width
    first_fail = min(r for r in rates if r > threshold)
    assert calls[: len(calls) - 4][-1] == first_fail  # the scan stopped at the first failure
    assert len(calls) == sum(r <= threshold for r in rates) + 1 + 4


def test_throughput_at_slo_edges() -> None:
    assert throughput_at_slo(_synthetic(1.0, []), [2.0, 3.0], slo_ttft_s=5.0) == 0.0  # type: ignore[arg-type]
    assert throughput_at_slo(_synthetic(99.0, []), [2.0, 3.0], slo_ttft_s=5.0) == 3.0  # type: ignore[arg-type]
    nan_run = lambda rate: _BASE  # noqa: E731  # NaN P99 counts as failing
    assert throughput_at_slo(nan_run, [1.0], slo_ttft_s=5.0) == 0.0
