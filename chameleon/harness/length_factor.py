"""`--length-scale C | paper`: parse it, and derive the paper's C on the modelled GPU.

`paper` applies the paper's own rule (TTFT SLO = 5x the mean unloaded execution time,
`chameleon.sim.length_scale`) to the benchmark's cost model, trace and adapter ranks: computed,
never fitted to a policy's result. Real runs have no cost model, so they take a number only.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import numpy as np

from chameleon.harness.traces import load_trace
from chameleon.harness.workload import PAPER_RANKS, SLORA_RANKS
from chameleon.sim.length_scale import LengthScale, derive_length_scale
from chameleon.sim.shape import CostModel

__all__ = ["PAPER", "length_population", "length_scale_arg", "paper_length_scale"]

PAPER = "paper"
SLO_MULTIPLE = 5.0  # paper §5: the TTFT SLO is 5x the mean execution time of a low-load system


def length_scale_arg(text: str) -> float | str:
    """argparse type: a positive number, or `paper`."""
    if text.strip().lower() == PAPER:
        return PAPER
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'paper', got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'paper', got {text!r}")
    return value


def length_population(args: argparse.Namespace) -> tuple[list[int], list[int], tuple[int, ...]]:
    """(prompts, outputs, ranks) the benchmark's workload draws from, before scaling: the trace's
    rows (paper and trace workloads), or 4,096 seeded draws of S-LoRA's uniform ranges."""
    if args.workload == "slora":
        rng = np.random.default_rng(0)
        lo_i, hi_i = args.input_range
        lo_o, hi_o = args.output_range
        prompts = rng.integers(lo_i, hi_i, 4096).tolist()
        outputs = rng.integers(lo_o, hi_o, 4096).tolist()
        return prompts, outputs, SLORA_RANKS
    rows = load_trace(args.trace)
    return [r.context_tokens for r in rows], [r.generated_tokens for r in rows], PAPER_RANKS


def paper_length_scale(
    cost: CostModel,
    prompts: Sequence[int],
    outputs: Sequence[int],
    *,
    ranks: Sequence[int],
    adapter_row_bytes: int,
    max_model_len: int,
    slo_ttft_s: float = 5.0,
) -> LengthScale:
    """The paper's length factor for these lengths and ranks on `cost` (module docstring)."""
    return derive_length_scale(
        cost,
        prompts,
        outputs,
        ranks=ranks,
        adapter_row_bytes=adapter_row_bytes,
        max_model_len=max_model_len,
        slo_s=slo_ttft_s,
        slo_multiple=SLO_MULTIPLE,
    )
