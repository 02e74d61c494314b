"""The paper's length factor, derived from its SLO rule on a cost model (never fitted to a result).

Paper §3.2 scales the trace's prompt and output lengths by one constant factor C and sets the TTFT
SLO to 5x the mean execution time of a request on a low-load system (5 s). Once the GPU is
modelled, that rule pins C down: the factor at which 5x the mean *unloaded* end-to-end latency of
a trace request equals the SLO. "Unloaded" = the request alone on the GPU: its adapter loaded (a
miss, as under S-LoRA at low load), its prompt prefilled in one iteration, then one decode
iteration per further output token at the growing context. The mean is over the given trace rows
and uniformly over the adapter ranks. The latency grows with C, so a bisection finds it.
Details and the sensitivity range: `docs/workloads.md` (Length factor).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np

from chameleon.sim.shape import BatchShape, CostModel

__all__ = ["LengthScale", "derive_length_scale", "mean_unloaded_latency_s"]


@attrs.frozen
class LengthScale:
    """A derived factor and what it was derived from."""

    scale: float
    mean_latency_s: float  # mean unloaded end-to-end latency at `scale`
    target_s: float  # slo_s / slo_multiple


class _Timings:
    """Memoised unloaded prefill and cumulative decode times per rank (context up to `max_len`)."""

    def __init__(self, cost: CostModel, ranks: Sequence[int], row_bytes: int, max_len: int) -> None:
        self.cost, self.max_len = cost, max_len
        load = getattr(cost, "adapter_load_s", cost.load_s)
        self.load = {r: load(r * row_bytes) if r else 0.0 for r in ranks}
        self._prefill: dict[tuple[int, int], float] = {}
        self.decode_cum: dict[int, np.ndarray] = {}
        for r in ranks:  # decode_cum[r][L]: decode steps that take the context from 1 to L tokens
            steps = [cost.iteration_s(BatchShape.decode(1, ctx, r)) for ctx in range(2, max_len + 1)]
            self.decode_cum[r] = np.concatenate(([0.0, 0.0], np.cumsum(steps)))

    def prefill(self, prompt: int, rank: int) -> float:
        key = (prompt, rank)
        if key not in self._prefill:
            self._prefill[key] = self.cost.iteration_s(BatchShape.single_prefill(prompt, rank))
        return self._prefill[key]


def mean_unloaded_latency_s(
    cost: CostModel,
    prompts: Sequence[int],
    outputs: Sequence[int],
    scale: float,
    *,
    ranks: Sequence[int],
    adapter_row_bytes: int,
    max_model_len: int,
    _timings: _Timings | None = None,
) -> float:
    """Mean end-to-end latency of the rows, lengths scaled by `scale` and clipped, each alone."""
    t = _timings or _Timings(cost, ranks, adapter_row_bytes, max_model_len)
    p = np.clip(np.rint(np.asarray(prompts) * scale).astype(np.int64), 1, max_model_len - 1)
    o = np.maximum(np.rint(np.asarray(outputs) * scale).astype(np.int64), 1)
    end = np.minimum(p + o, max_model_len)  # the core stops a request at the context length
    total = 0.0
    for r in ranks:
        uniq, inverse = np.unique(p, return_inverse=True)
        prefill = np.array([t.prefill(int(x), r) for x in uniq])[inverse]
        decode = t.decode_cum[r][end] - t.decode_cum[r][p + 1]  # first token comes from the prefill
        total += float(np.mean(t.load[r] + prefill + decode))
    return total / len(ranks)


def derive_length_scale(
    cost: CostModel,
    prompts: Sequence[int],
    outputs: Sequence[int],
    *,
    ranks: Sequence[int],
    adapter_row_bytes: int,
    max_model_len: int,
    slo_s: float = 5.0,
    slo_multiple: float = 5.0,
    bounds: tuple[float, float] = (1e-3, 1.0),
    steps: int = 40,
) -> LengthScale:
    """The C in `bounds` at which `slo_multiple` x the mean unloaded latency equals `slo_s` (module
    docstring). Clamped to a bound when the target lies outside."""
    target = slo_s / slo_multiple
    timings = _Timings(cost, ranks, adapter_row_bytes, max_model_len)

    def latency(c: float) -> float:
        return mean_unloaded_latency_s(
            cost, prompts, outputs, c, ranks=ranks, adapter_row_bytes=adapter_row_bytes,
            max_model_len=max_model_len, _timings=timings,
        )  # fmt: skip

    lo, hi = bounds
    if latency(hi) <= target:
        return LengthScale(hi, latency(hi), target)
    if latency(lo) >= target:
        return LengthScale(lo, latency(lo), target)
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if latency(mid) < target else (lo, mid)
    c = (lo + hi) / 2
    return LengthScale(c, latency(c), target)
