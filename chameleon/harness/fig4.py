"""Fig. 4 of the paper on the simulated GPU: S-LoRA's P99 TTFT at 8 req/s with 1 / 50 / 500 adapters.

The paper (Fig. 4, §3): with 50 / 500 adapters the P99 TTFT is 1.69x / 2.60x that with one adapter
("the PCIe bus is saturated"). `fig4_ratios` runs the `slora` baseline on the paper workload (lengths
scaled by C) with N adapters: uniform rank over {8..128}, Zipf within a rank (N / 5 per rank); one
adapter = every request on one rank-32 adapter (the middle rank). The link is the analytic cost
model's (`Calibration.h2d_per_tensor_s`; `docs/simulator.md`, The link).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from chameleon.config import EngineConfig
from chameleon.harness.driver import run_workload
from chameleon.harness.metrics import summarize
from chameleon.harness.workload import Workload, paper_workload
from chameleon.sim.analytic import Calibration
from chameleon.sim.engine import build_sim_engine

__all__ = ["PAPER_FIG4", "fig4_p99", "fig4_ratios", "fig4_workload"]

PAPER_FIG4 = {50: 1.69, 500: 2.60}  # P99 TTFT relative to one adapter, at 8 req/s


def fig4_workload(num_adapters: int, *, rate: float, duration_s: float, seed: int, length_scale: float) -> Workload:
    """The paper workload with `num_adapters` adapters (a multiple of 5, or 1: see the module docstring)."""
    per_rank = max(1, num_adapters // 5)
    w = paper_workload(rate=rate, duration_s=duration_s, seed=seed, per_rank=per_rank, length_scale=length_scale)
    if num_adapters != 1:
        return w
    one = next(a for a in w.adapters if a.rank == 32)
    return Workload([attrs.evolve(r, adapter=one.name) for r in w.requests], [one], w.description + ", one adapter")


def fig4_p99(
    num_adapters: int, calibration: Calibration, *, rate: float = 8.0, duration_s: float = 120.0, seed: int = 0,
    length_scale: float = 0.1606, gpu: str = "A40", model: str = "llama-7b",
) -> float:  # fmt: skip
    """S-LoRA's P99 TTFT (s) with `num_adapters` adapters on the simulated GPU."""
    w = fig4_workload(num_adapters, rate=rate, duration_s=duration_s, seed=seed, length_scale=length_scale)
    config = EngineConfig(scheduler="fifo", adapter_cache="slora")
    core, clock = build_sim_engine(gpu, model, config, adapters=w.adapters, calibration=calibration)
    return summarize(run_workload(core, w, clock), slo_ttft_s=5.0, slo_tbt_s=0.15).ttft_p99_s


def fig4_ratios(calibration: Calibration, counts: Sequence[int] = (50, 500), **kw: float) -> dict[int, float]:
    """P99 TTFT with each count of adapters over that with one adapter."""
    base = fig4_p99(1, calibration, **kw)  # type: ignore[arg-type]
    return {n: fig4_p99(n, calibration, **kw) / base for n in counts}  # type: ignore[arg-type]
