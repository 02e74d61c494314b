"""The paper's baselines and literal rules as named variants: K=4 by minimal WCSS, Ch-Static,
Ch-FairShare (issue 13)."""

from __future__ import annotations

import pytest

from chameleon.memory.adapter_cache import FAIRSHARE_WEIGHTS, SCORE_WEIGHTS, AdapterCache
from chameleon.memory.budget import MemoryBudget
from chameleon.sched import make_policy
from chameleon.sched.mlq.clustering import QueueLayout
from chameleon.sched.mlq.policy import MLQPolicy

TWO_CLUSTERS = [0.10 + 0.0005 * i for i in range(100)] + [0.90 + 0.0005 * i for i in range(100)]


def test_literal_wcss_rule_always_takes_k_max() -> None:
    assert QueueLayout.fit(TWO_CLUSTERS, k_max=4).num_queues == 2  # silhouette: the two clusters
    assert QueueLayout.fit(TWO_CLUSTERS, k_max=4, k_rule="wcss").num_queues == 4


def test_static_layout_is_equal_ranges() -> None:
    layout = QueueLayout.fit([0.2, 0.4, 1.0], k_max=4, k_rule="static")
    assert layout.cutoffs == pytest.approx((0.4, 0.6, 0.8))
    assert QueueLayout.fit([0.5, 0.5], k_max=4, k_rule="static").num_queues == 1


def test_named_variants() -> None:
    static, k4 = make_policy("chameleon-static"), make_policy("chameleon-k4")
    assert isinstance(static, MLQPolicy) and static.options.k_rule == "static"
    assert isinstance(k4, MLQPolicy) and k4.options.k_rule == "wcss"
    assert make_policy("chameleon").options.k_rule == "silhouette"  # type: ignore[attr-defined]


def test_fairshare_scores_with_equal_weights() -> None:
    budget = MemoryBudget(total_bytes=64, reserve_bytes=0, kv_block_bytes=4, adapter_row_bytes=1)
    caches = {p: AdapterCache(64, budget, p) for p in ("chameleon", "fairshare")}
    for c in caches.values():
        for name, rows in (("big", 16), ("small", 4)):
            c.register(name, rows)
            c.acquire(name, 0.0)
            c.release(name, 1.0 if name == "big" else 2.0)
    assert caches["chameleon"].weights == SCORE_WEIGHTS and caches["fairshare"].weights == FAIRSHARE_WEIGHTS
    # big: size 1, recency 0; small: size 0.25, recency 1 (both used once: frequency 1).
    assert caches["chameleon"].scores(3.0)["big"] == pytest.approx(0.45 + 0.45)
    assert caches["fairshare"].scores(3.0)["small"] == pytest.approx((1 + 1 + 0.25) / 3)
