"""The paper's length factor: scaling before clipping, and C derived from the SLO rule (issue 13)."""

from __future__ import annotations

import argparse

import attrs
import pytest

from chameleon.harness.length_factor import PAPER, length_scale_arg
from chameleon.harness.workload import paper_workload, scale_length, scale_lengths
from chameleon.sim.analytic import AnalyticCostModel
from chameleon.sim.hardware import A40_48GB, LLAMA_7B
from chameleon.sim.length_scale import derive_length_scale, mean_unloaded_latency_s
from chameleon.sim.shape import BatchShape


def test_scale_length_rounds_and_keeps_one_token() -> None:
    assert scale_length(1000, 0.16) == 160
    assert scale_length(3, 0.1) == 1
    with pytest.raises(ValueError):
        scale_length(10, 0.0)


def test_paper_workload_scales_before_clipping() -> None:
    raw = paper_workload(rate=5, duration_s=20, seed=1)
    scaled = paper_workload(rate=5, duration_s=20, seed=1, length_scale=0.5, max_prompt_len=300)
    for a, b in zip(raw.requests, scaled.requests, strict=True):
        assert b.prompt_len == min(max(1, round(a.prompt_len * 0.5)), 300)
        assert b.output_len == max(1, round(a.output_len * 0.5))
        assert (a.arrival_s, a.adapter) == (b.arrival_s, b.adapter)
    generic = scale_lengths(raw, 0.5)
    assert [r.output_len for r in generic.requests] == [r.output_len for r in scaled.requests]


def test_length_scale_arg() -> None:
    assert length_scale_arg("paper") == PAPER
    assert length_scale_arg("0.25") == 0.25
    with pytest.raises(argparse.ArgumentTypeError):
        length_scale_arg("-1")


@attrs.frozen
class _Linear:
    """Prefill 1 ms per token, decode 10 ms per step, loads free: latency(C) = 1e-3 pC + 1e-2 (oC - 1)."""

    def iteration_s(self, shape: BatchShape) -> float:
        return 1e-3 * shape.prefill_tokens if shape.prefill_tokens else 1e-2

    def load_s(self, nbytes: int) -> float:
        return 0.0

    def time_factor(self, u: float) -> float:
        return 1.0


def test_bisection_finds_the_factor_of_the_slo_rule() -> None:
    cost = _Linear()
    kw = {"ranks": (0,), "adapter_row_bytes": 1, "max_model_len": 4096}
    # p = o = 1000: latency(C) = C + 10 C - 0.01; target 5 s / 5 = 1 s -> C = 1.01 / 11.
    got = derive_length_scale(cost, [1000], [1000], **kw)
    assert got.scale == pytest.approx(1.01 / 11, abs=2e-3)
    assert mean_unloaded_latency_s(cost, [1000], [1000], got.scale, **kw) == pytest.approx(1.0, abs=0.02)
    assert derive_length_scale(cost, [1000], [1000], slo_s=2.5, **kw).scale < got.scale  # tighter SLO


def test_a40_llama7b_conversation_factor_is_about_0_16() -> None:
    from chameleon.harness.traces import load_trace

    rows = load_trace("conv")[:3000]
    cost = AnalyticCostModel(A40_48GB, LLAMA_7B)
    got = derive_length_scale(
        cost, [r.context_tokens for r in rows], [r.generated_tokens for r in rows],
        ranks=(8, 128), adapter_row_bytes=cost.adapter_row_bytes, max_model_len=2048,
    )  # fmt: skip
    assert 0.12 < got.scale < 0.20
