"""MLQ policy math: WRS, exact 1-D k-means and the K rule, M/M/1 quotas, the ledger, load estimates."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chameleon.errors import ConfigError
from chameleon.sched.mlq.clustering import QueueLayout, choose_k, kmeans_1d, queue_cutoffs
from chameleon.sched.mlq.estimators import ArrivalRateEstimator
from chameleon.sched.mlq.quotas import QueueStats, QuotaLedger, assign_quotas, mm1_min_tokens
from chameleon.sched.mlq.sizing import adapter_factor, request_tokens, weighted_request_size
from chameleon.sched.options import SchedulerOptions

# --- weighted request size -------------------------------------------------------------------

NORM = {"max_input": 1024, "max_output": 1024, "max_adapter": 128, "min_adapter": 8}


def test_wrs_matches_the_paper_formula() -> None:
    # (0.4 * 512/1024 + 0.6 * 256/1024) * 32/128 = (0.2 + 0.15) * 0.25
    assert weighted_request_size(512, 256, 32, **NORM) == pytest.approx(0.0875)
    assert weighted_request_size(1024, 1024, 128, **NORM) == pytest.approx(1.0)
    assert weighted_request_size(0, 0, 128, **NORM) == 0.0


def test_wrs_units_only_need_to_agree() -> None:
    by_rank = weighted_request_size(300, 40, 16, **NORM)
    mib = 2 << 20  # a rank-r adapter of Llama-7B q,k,v,o is 2 MiB * r
    by_bytes = weighted_request_size(
        300, 40, 16 * mib, max_input=1024, max_output=1024, max_adapter=128 * mib, min_adapter=8 * mib
    )
    assert by_rank == pytest.approx(by_bytes)


def test_wrs_custom_weights() -> None:
    wrs = weighted_request_size(512, 256, 128, **NORM, input_weight=1.0, output_weight=0.0)
    assert wrs == pytest.approx(0.5)


def test_base_model_requests_are_sized_like_the_smallest_adapter() -> None:
    base = weighted_request_size(512, 256, None, **NORM)
    assert base == pytest.approx(0.35 / 16)
    assert base == pytest.approx(weighted_request_size(512, 256, 8, **NORM))
    assert base < weighted_request_size(512, 256, 16, **NORM)
    assert weighted_request_size(100, 10, None, **NORM) < base  # length ordering survives
    with pytest.raises(ValueError):
        weighted_request_size(512, 256, None, max_input=1024, max_output=1024, max_adapter=128)


def test_adapter_factor_without_adapters() -> None:
    assert adapter_factor(None, max_adapter=None) == 1.0
    assert weighted_request_size(512, 256, None, max_input=1024, max_output=1024, max_adapter=None) == 0.35
    with pytest.raises(ValueError):
        adapter_factor(8, max_adapter=None)
    with pytest.raises(ValueError):
        adapter_factor(0, max_adapter=128)


def test_request_tokens_counts_adapter_memory_in_kv_tokens() -> None:
    assert request_tokens(100, 50, 1000, kv_bytes_per_token=384) == 100 + 50 + 3  # ceil(1000 / 384)
    assert request_tokens(100, 50, kv_bytes_per_token=384) == 150
    assert request_tokens(1, 1, 768, kv_bytes_per_token=384) == 4


# --- k-means ---------------------------------------------------------------------------------


def clusters(centres: list[float], n: int, spread: float, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(v) for c in centres for v in rng.normal(c, spread, n)]


def test_kmeans_hand_example() -> None:
    assert kmeans_1d([1, 2, 3, 10, 11, 12], 2) == pytest.approx((2.0, 11.0))
    assert kmeans_1d([20, 1, 11, 2, 3, 10], 3) == pytest.approx((2.0, 10.5, 20.0))  # unsorted input is fine
    assert kmeans_1d([5.0] * 10, 3) == (5.0,)  # at most the number of distinct values
    assert kmeans_1d([4.0, 1.0], 1) == (2.5,)


def test_kmeans_finds_clear_clusters() -> None:
    values = clusters([0.1, 0.5, 0.9], 200, 0.01)
    centroids = kmeans_1d(values, 3, seed=123)
    assert centroids == pytest.approx((0.1, 0.5, 0.9), abs=0.005)
    assert list(centroids) == sorted(centroids)


def brute_force_wcss(values: list[float], k: int) -> float:
    best = math.inf
    for labels in itertools.product(range(k), repeat=len(values)):
        wcss = 0.0
        for c in range(k):
            members = [v for v, lab in zip(values, labels) if lab == c]
            if members:
                mean = sum(members) / len(members)
                wcss += sum((v - mean) ** 2 for v in members)
        best = min(best, wcss)
    return best


def wcss_of(values: list[float], centroids: tuple[float, ...]) -> float:
    return sum(min((v - c) ** 2 for c in centroids) for v in values)


def test_kmeans_is_optimal_against_brute_force() -> None:
    rng = random.Random(5)
    for _ in range(12):
        values = [rng.choice([rng.random(), rng.random() * 10]) for _ in range(rng.randint(3, 7))]
        for k in (2, 3):
            assert wcss_of(values, kmeans_1d(values, k)) == pytest.approx(brute_force_wcss(values, k), abs=1e-9)


def test_kmeans_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        kmeans_1d([], 2)
    with pytest.raises(ValueError):
        kmeans_1d([1.0, float("nan")], 2)
    with pytest.raises(ValueError):
        kmeans_1d([1.0], 0)


# --- choosing K and cut-offs -----------------------------------------------------------------


def test_choose_k_is_one_for_uniform_and_degenerate_data() -> None:
    assert choose_k(list(np.linspace(0.0, 1.0, 500))) == 1
    assert choose_k(list(np.random.default_rng(1).uniform(0, 1, 3000))) == 1
    assert choose_k([0.3] * 500) == 1
    assert choose_k([0.0, 1.0] * 10) == 1  # 20 samples: under min_samples
    assert choose_k([0.0, 1.0] * 10, min_samples=10) == 2
    assert choose_k(clusters([0.1, 0.9], 100, 0.01), k_max=1) == 1


@pytest.mark.parametrize("centres", [[0.1, 0.6], [0.05, 0.3, 0.8], [0.0, 1.0, 2.0, 3.0]])
def test_choose_k_finds_well_separated_clusters(centres: list[float]) -> None:
    assert choose_k(clusters(centres, 150, 0.02)) == len(centres)


def test_choose_k_respects_k_max() -> None:
    assert choose_k(clusters([0.0, 1.0, 2.0, 3.0], 100, 0.02), k_max=2) == 2


def test_choose_k_on_a_large_window_downsamples() -> None:
    assert choose_k(clusters([0.1, 0.5], 5000, 0.01)) == 2  # 10k values, clustered on 2048 order stats


def test_cutoffs_are_midpoints_of_centroids() -> None:
    values = [0.0] * 40 + [1.0] * 40 + [3.0] * 40
    assert queue_cutoffs(values) == (0.5, 2.0)
    spread = clusters([0.1, 0.5, 0.9], 100, 0.02)
    c = kmeans_1d(spread, 3)
    assert queue_cutoffs(spread) == pytest.approx(((c[0] + c[1]) / 2, (c[1] + c[2]) / 2))
    assert queue_cutoffs([0.2] * 100) == ()


def test_queue_layout_maps_wrs_to_queues() -> None:
    layout = QueueLayout((0.5, 2.0))
    assert layout.num_queues == 3
    assert [layout.queue_of(w) for w in (0.0, 0.5, 0.51, 2.0, 2.01, 9.0)] == [0, 0, 1, 1, 2, 2]
    assert QueueLayout().queue_of(123.0) == 0
    assert QueueLayout.fit([]) == QueueLayout()
    assert QueueLayout.fit([0.0] * 40 + [1.0] * 40).cutoffs == (0.5,)
    with pytest.raises(ValueError):
        QueueLayout((2.0, 0.5))
    with pytest.raises(ValueError):
        QueueLayout((0.5, 0.5))


# --- quotas ----------------------------------------------------------------------------------


def test_mm1_bound() -> None:
    assert mm1_min_tokens(1000, 2.0, 5.0, 0.5) == pytest.approx(1400.0)  # 1000 * 2 * (0.2 + 0.5)
    assert mm1_min_tokens(100, 1.0, 5.0, 0.0) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        mm1_min_tokens(100, 1.0, 0.0, 1.0)


def test_quotas_minimum_plus_leftover_by_demand() -> None:
    stats = [
        QueueStats(max_request_tokens=100, expected_service_s=1.0, arrival_rate=2.0, demand_tokens=1000),  # min 220
        QueueStats(max_request_tokens=1000, expected_service_s=2.0, arrival_rate=0.5, demand_tokens=3000),  # min 1400
    ]
    # leftover 10000 - 1620 = 8380, split 1:3 -> 2095, 6285
    assert assign_quotas(10_000, stats, slo_s=5.0) == (220 + 2095, 1400 + 6285)


def test_zero_demand_queues_get_only_their_minimum() -> None:
    stats = [
        QueueStats(100, 1.0, 2.0, 0),  # min 220
        QueueStats(1000, 2.0, 0.5, 50),  # min 1400
        QueueStats(10, 1.0, 0.0, 0),  # min max(ceil(2), 10) = 10
    ]
    assert assign_quotas(5000, stats, slo_s=5.0) == (220, 5000 - 230, 10)


def test_quotas_scale_down_when_minima_exceed_the_total() -> None:
    stats = [QueueStats(100, 1.0, 2.0, 999), QueueStats(1000, 2.0, 0.5, 1)]  # minima 220, 1400
    assert assign_quotas(810, stats, slo_s=5.0) == (110, 700)
    assert sum(assign_quotas(1000, stats, slo_s=5.0)) == 1000
    assert assign_quotas(0, stats, slo_s=5.0) == (0, 0)


def test_quota_floor_at_largest_request() -> None:
    stats = [QueueStats(1000, 0.1, 0.0, 0)]  # bound 1000 * 0.1 * 0.2 = 20
    assert stats[0].min_tokens(5.0) == 1000
    assert stats[0].min_tokens(5.0, floor_at_max_request=False) == 20


def test_quota_leftover_without_any_demand() -> None:
    stats = [QueueStats(100, 1.0, 2.0, 0), QueueStats(1000, 2.0, 0.5, 0)]  # minima 220, 1400
    assert assign_quotas(3240, stats, slo_s=5.0) == (440, 2800)  # leftover follows the minima
    empty = [QueueStats(0, 0, 0, 0)] * 3
    assert assign_quotas(10, empty, slo_s=5.0) == (4, 3, 3)  # equal, remainder to the smaller queue


queue_stats = st.builds(
    QueueStats,
    max_request_tokens=st.integers(0, 4000),
    expected_service_s=st.floats(0, 30, allow_nan=False),
    arrival_rate=st.floats(0, 20, allow_nan=False),
    demand_tokens=st.one_of(st.just(0), st.floats(0, 1e6, allow_nan=False)),
)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(0, 10**7), stats=st.lists(queue_stats, min_size=1, max_size=6))
def test_quotas_always_sum_exactly(total: int, stats: list[QueueStats]) -> None:
    quotas = assign_quotas(total, stats, slo_s=5.0)
    assert sum(quotas) == total and all(q >= 0 for q in quotas)
    minima = [s.min_tokens(5.0) for s in stats]
    if sum(minima) <= total:
        assert all(q >= m for q, m in zip(quotas, minima))
        if any(s.demand_tokens > 0 for s in stats):
            assert all(q == m for q, m, s in zip(quotas, minima, stats) if s.demand_tokens == 0)


# --- ledger ----------------------------------------------------------------------------------


def test_ledger_take_and_return_in_full() -> None:
    ledger = QuotaLedger((100, 200))
    assert ledger.try_take(0, 60, "r1")
    assert ledger.remaining(0) == 40 and ledger.held(0) == 60
    assert not ledger.try_take(0, 50, "r2")  # 50 > 40 left
    assert ledger.try_take(0, 40, "r3")
    assert ledger.remaining(0) == 0
    assert ledger.give_back("r1").cost == 60
    assert ledger.remaining(0) == 60
    ledger.give_back("r3")
    assert ledger.remaining(0) == 100 and ledger.held(0) == 0
    with pytest.raises(KeyError):
        ledger.give_back("r1")  # returning twice is a bug, not a no-op


def test_ledger_leftover_is_borrowed_and_returned_to_the_lenders() -> None:
    ledger = QuotaLedger((100, 200, 50))
    assert ledger.try_take(2, 50, "big")
    assert not ledger.try_take(2, 120, "r")  # its own queue is spent
    assert ledger.leftover([0, 1]) == 300
    assert ledger.try_take_leftover(2, 120, "r", lenders=[0, 1])
    charge = ledger.charges["r"]
    assert charge.parts == ((0, 100), (1, 20)) and charge.borrowed and charge.queue == 2
    assert ledger.remaining(0) == 0 and ledger.remaining(1) == 180
    assert not ledger.try_take_leftover(2, 181, "s", lenders=[0, 1])
    assert not ledger.charges.get("s")
    ledger.give_back("r")
    assert (ledger.remaining(0), ledger.remaining(1), ledger.remaining(2)) == (100, 200, 0)


def test_ledger_rejects_misuse() -> None:
    ledger = QuotaLedger((10,))
    assert ledger.try_take(0, 0, "zero")
    with pytest.raises(ValueError):
        ledger.try_take(0, 1, "zero")  # already holds
    with pytest.raises(ValueError):
        ledger.try_take(0, -1, "neg")
    with pytest.raises(IndexError):
        ledger.try_take(1, 1, "x")
    with pytest.raises(ValueError):
        QuotaLedger(())
    with pytest.raises(ValueError):
        QuotaLedger((5, -1))


def test_ledger_reset_carries_in_flight_holdings() -> None:
    ledger = QuotaLedger((100, 100, 100))
    assert ledger.try_take(0, 80, "a")
    assert ledger.try_take(2, 90, "b")
    assert ledger.try_take_leftover(2, 10, "c", lenders=[1])
    ledger.reset((50, 300))  # 3 -> 2 queues: "b" and "c" move to queue 1, loans collapse onto it
    assert ledger.held(0) == 80 and ledger.remaining(0) == 0  # over its new quota: no admissions
    assert ledger.held(1) == 100 and ledger.remaining(1) == 200
    assert not ledger.try_take(0, 1, "d")
    ledger.give_back("a")
    assert ledger.remaining(0) == 50
    ledger.reset((100, 100), requeue={"b": 0})
    assert ledger.held(0) == 90 and ledger.held(1) == 10
    with pytest.raises(IndexError):
        ledger.reset((100,), requeue={"b": 3})
    assert ledger.quotas == (100, 100)  # a failed reset changes nothing
    ledger.give_back("b")
    ledger.give_back("c")
    assert ledger.held(0) == ledger.held(1) == 0


op = st.one_of(
    st.tuples(st.just("take"), st.integers(0, 3), st.integers(0, 120)),
    st.tuples(st.just("borrow"), st.integers(0, 3), st.integers(0, 200), st.sets(st.integers(0, 3))),
    st.tuples(st.just("give"), st.integers(0, 50)),
    st.tuples(st.just("reset"), st.lists(st.integers(0, 300), min_size=1, max_size=4)),
)


@settings(max_examples=200, deadline=None)
@given(quotas=st.lists(st.integers(0, 300), min_size=4, max_size=4), ops=st.lists(op, max_size=60))
def test_ledger_never_goes_negative_and_returns_in_full(quotas: list[int], ops: list[tuple]) -> None:
    ledger = QuotaLedger(quotas)
    live: list[str] = []
    was_reset = False
    for n, (kind, *args) in enumerate(ops):
        holder = f"h{n}"
        if kind == "take" and args[0] < ledger.num_queues:
            if ledger.try_take(args[0], args[1], holder):
                live.append(holder)
        elif kind == "borrow" and args[0] < ledger.num_queues:
            lenders = [q for q in sorted(args[2]) if q < ledger.num_queues]
            if ledger.try_take_leftover(args[0], args[1], holder, lenders):
                live.append(holder)
        elif kind == "give" and live:
            ledger.give_back(live.pop(args[0] % len(live)))
        elif kind == "reset":
            ledger.reset(args[0])
            was_reset = True
        for q in range(ledger.num_queues):
            assert ledger.held(q) >= 0 and ledger.remaining(q) >= 0
            assert ledger.held(q) == sum(t for c in ledger.charges.values() for p, t in c.parts if p == q)
            if not was_reset:  # admissions alone never overcommit a queue
                assert ledger.held(q) <= ledger.quotas[q]
    for holder in live:
        ledger.give_back(holder)
    assert not ledger.charges
    assert all(ledger.held(q) == 0 for q in range(ledger.num_queues))
    assert all(ledger.remaining(q) == ledger.quotas[q] for q in range(ledger.num_queues))


# --- load estimates --------------------------------------------------------------------------


def test_arrival_rate_over_a_sliding_window() -> None:
    est = ArrivalRateEstimator(start_s=0.0, window_s=10.0)
    for t in (1.0, 2.0, 3.0):
        est.record_arrival(t)
    assert est.arrival_rate(3.0) == pytest.approx(1.0)  # 3 arrivals over 3 s observed
    assert est.arrival_rate(10.0) == pytest.approx(0.3)  # 3 over the full 10 s window
    assert est.arrival_rate(12.5) == pytest.approx(0.1)  # arrivals at 1 and 2 have left (12.5 - 10)
    assert est.arrival_rate(30.0) == 0.0


def test_arrival_rate_right_after_start_is_not_infinite() -> None:
    est = ArrivalRateEstimator(start_s=100.0, window_s=10.0, min_span_s=1.0)
    est.record_arrival(100.0)
    est.record_arrival(100.0)
    assert est.arrival_rate(100.0) == pytest.approx(2.0)


def test_service_time_and_largest_request() -> None:
    est = ArrivalRateEstimator(start_s=0.0, window_s=10.0, default_service_s=0.7)
    assert est.mean_service_s(0.0) == 0.7
    assert est.max_request_tokens(0.0) == 0
    est.record_arrival(1.0, 500)
    est.record_arrival(2.0, 100)
    est.record_service(3.0, 2.0)
    est.record_arrival(8.0, 200)
    est.record_service(9.0, 4.0)
    assert est.max_request_tokens(10.0) == 500
    assert est.mean_service_s(10.0) == pytest.approx(3.0)
    assert est.max_request_tokens(11.5) == 200  # 500 (t=1) and 100 (t=2) left the window
    assert est.mean_service_s(13.0) == pytest.approx(4.0)  # the finish at t=3 left
    assert est.mean_service_s(30.0) == pytest.approx(4.0)  # none in window: the last one seen
    stats = est.stats(30.0, demand_tokens=42)
    assert stats == QueueStats(max_request_tokens=0, expected_service_s=4.0, arrival_rate=0.0, demand_tokens=42)
    with pytest.raises(ValueError):
        est.record_arrival(29.0)  # time went backwards


def test_estimates_feed_the_quota_formula() -> None:
    cfg = SchedulerOptions(rate_window_s=10.0)
    est = cfg.estimator(start_s=0.0)
    for i in range(20):  # 2 arrivals per second of 300 tokens, each served in 0.5 s
        est.record_arrival(i * 0.5, 300)
        est.record_service(i * 0.5, 0.5)
    stats = est.stats(10.0, demand_tokens=600)
    assert stats.arrival_rate == pytest.approx(1.9)  # the arrival at t=0 left the (0, 10] window
    assert mm1_min_tokens(stats.max_request_tokens, stats.expected_service_s, cfg.slo_ttft_s, stats.arrival_rate) == (
        pytest.approx(300 * 0.5 * (0.2 + 1.9))
    )


# --- config ----------------------------------------------------------------------------------


def test_config_defaults_follow_the_paper() -> None:
    cfg = SchedulerOptions()
    assert (cfg.k_max, cfg.refresh_period_s, cfg.slo_ttft_s) == (4, 300.0, 5.0)
    assert (cfg.input_weight, cfg.output_weight) == (0.4, 0.6)
    assert cfg.fit_layout([0.0] * 40 + [1.0] * 40).cutoffs == (0.5,)


@pytest.mark.parametrize(
    "kw",
    [
        {"k_max": 0},
        {"k_max": 2.5},
        {"k_max": True},
        {"refresh_period_s": 0},
        {"slo_ttft_s": -1.0},
        {"input_weight": -0.1},
        {"input_weight": 0.0, "output_weight": 0.0},
        {"min_silhouette": 1.5},
        {"rate_window_s": float("inf")},
        {"wrs_window": 0},
        {"min_cluster_samples": 1},
    ],
)
def test_config_rejects_bad_values(kw: dict) -> None:
    with pytest.raises(ConfigError):
        SchedulerOptions(**kw)
