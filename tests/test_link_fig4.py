"""The host->device link against the paper's Fig. 4 (issue 13): what the pageable per-tensor link
reproduces, and that it still meets the TTFT-by-rank figures it was calibrated on."""

from __future__ import annotations

import pytest

from chameleon.harness.fig4 import PAPER_FIG4, fig4_ratios
from chameleon.sim.analytic import (
    A40_LLAMA7B_CALIBRATION,
    A40_LLAMA7B_PAGEABLE_CALIBRATION,
    PAPER_TTFT_BY_RANK_S,
    AnalyticCostModel,
    derive_paper_calibration,
)
from chameleon.sim.hardware import A40_48GB, LLAMA_7B


def test_pageable_link_keeps_the_ttft_by_rank_calibration_and_the_pcie_bound() -> None:
    cost = AnalyticCostModel(A40_48GB, LLAMA_7B, A40_LLAMA7B_PAGEABLE_CALIBRATION)
    for rank, ttft in PAPER_TTFT_BY_RANK_S.items():
        assert cost.unloaded_ttft_s(512, rank) == pytest.approx(ttft, rel=0.05)
    assert A40_LLAMA7B_PAGEABLE_CALIBRATION.h2d_efficiency <= 1.0  # no faster than PCIe Gen4 x16
    assert derive_paper_calibration().h2d_per_tensor_s == 0.0


def test_fig4_more_adapters_cost_more_and_pageable_comes_closer() -> None:
    kw = {"duration_s": 40.0}
    plain = fig4_ratios(A40_LLAMA7B_CALIBRATION, **kw)
    pageable = fig4_ratios(A40_LLAMA7B_PAGEABLE_CALIBRATION, **kw)
    assert 1.0 < plain[50] < pageable[50] and pageable[50] < pageable[500]
    assert pageable[50] == pytest.approx(PAPER_FIG4[50], rel=0.2)  # 1.69x: within 20%
    # Documented shortfall (docs/simulator.md, The link): 500 adapters stay well below 2.60x.
    assert pageable[500] < PAPER_FIG4[500]
