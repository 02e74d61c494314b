"""A measured cost profile of the real engine on this machine (`chameleon calibrate`), as a `CostModel`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from chameleon.sim.shape import BatchShape


@attrs.frozen
class ProfileEngine:
    """The shape of the real engine that was profiled, so the simulator can mirror its limits."""

    num_kv_blocks: int
    block_size: int
    kv_block_bytes: int
    adapter_row_bytes: int
    adapter_pool_rows: int
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    max_num_batched_tokens: int


_PROFILE_KIND = "chameleon.cost_profile"
_PROFILE_VERSION = 1


def _float_tuple(values: Iterable[float]) -> tuple[float, ...]:
    return tuple(values)


@attrs.frozen(kw_only=True)
class CostProfile:
    """Iteration and load times fitted to measurements of a real executor (`chameleon calibrate`).

    Fitted forms (seconds):
      prefill_s(tokens)      = a + b · tokens + q · attention pairs   (one sequence; q may be 0)
      decode_s(seqs, ctx)    = c + d · seqs + e · ctx                 (ctx = Σ context tokens)
      lora_s                 = f · Σ tokens · rank + g · distinct adapters  (g: per-segment work)
      load_s(bytes)          = bytes / load_Bps
    and each simulated iteration's time is multiplied by a draw from `step_time_ratios` (the
    measured spread around these forms; see `time_factor`).
    A mixed batch (prefills and decodes in one iteration) costs
      a + b · prefill_tokens + q · prefill pairs + d · (sequences − 1) + e · decode ctx + lora
    when it has a prefill — each sequence past the first costs d, its per-sequence work (LM head
    row, sampling, bookkeeping) — and decode_s otherwise. Both fitted forms are reproduced at
    their own fitting points.
    """

    prefill_a_s: float
    prefill_b_s_per_token: float
    decode_c_s: float
    decode_d_s_per_seq: float
    decode_e_s_per_ctx_token: float
    prefill_q_s_per_pair: float = 0.0
    lora_s_per_token_rank: float = 0.0
    lora_s_per_adapter: float = 0.0
    load_Bps: float = math.inf
    # Measured / predicted time of the calibration steps, sorted (at most 512 order statistics):
    # the spread of step times around the fitted forms. Empty: deterministic.
    step_time_ratios: tuple[float, ...] = attrs.field(default=(), converter=_float_tuple)
    engine: ProfileEngine | None = None
    meta: Mapping[str, Any] = attrs.field(factory=dict)

    def prefill_s(self, tokens: int) -> float:
        return (
            self.prefill_a_s
            + self.prefill_b_s_per_token * tokens
            + self.prefill_q_s_per_pair * tokens * (tokens + 1) / 2
        )

    def decode_s(self, seqs: int, context_tokens: int) -> float:
        return self.decode_c_s + self.decode_d_s_per_seq * seqs + self.decode_e_s_per_ctx_token * context_tokens

    def iteration_s(self, shape: BatchShape) -> float:
        e_ctx = self.decode_e_s_per_ctx_token * shape.decode_context_tokens
        if shape.prefill_seqs:
            t = (
                self.prefill_a_s
                + self.prefill_b_s_per_token * shape.prefill_tokens
                + self.prefill_q_s_per_pair * shape.prefill_attention_pairs
                + self.decode_d_s_per_seq * (shape.num_seqs - 1)
                + e_ctx
            )
        else:
            t = self.decode_c_s + self.decode_d_s_per_seq * shape.decode_seqs + e_ctx
        lora = self.lora_s_per_token_rank * shape.lora_token_ranks + self.lora_s_per_adapter * shape.lora_adapters
        return max(t, 0.0) + lora

    def load_s(self, nbytes: int) -> float:
        return nbytes / self.load_Bps

    def time_factor(self, u: float) -> float:
        """A draw from the measured spread: the order statistic at `u` (an empirical bootstrap).

        Why: queueing grows with the variability of service times, not just their mean
        (Pollaczek–Khinchine), so a simulator with mean step times alone underestimates the
        TTFT tail of a machine whose steps jitter (a CPU with Python on it does).
        """
        ratios = self.step_time_ratios
        return ratios[min(int(u * len(ratios)), len(ratios) - 1)] if ratios else 1.0

    # --- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self, recurse=True)
        d["meta"] = dict(self.meta)
        d["load_Bps"] = None if math.isinf(self.load_Bps) else self.load_Bps
        d["step_time_ratios"] = list(self.step_time_ratios)
        return {"kind": _PROFILE_KIND, "version": _PROFILE_VERSION, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CostProfile:
        if d.get("kind") != _PROFILE_KIND:
            raise ValueError(f"not a chameleon cost profile (kind={d.get('kind')!r})")
        if d.get("version") != _PROFILE_VERSION:
            raise ValueError(f"unsupported cost profile version {d.get('version')!r}")
        fields = {k: v for k, v in d.items() if k not in ("kind", "version")}
        engine = fields.pop("engine", None)
        load = fields.pop("load_Bps", None)
        return cls(
            **fields,
            load_Bps=math.inf if load is None else float(load),
            engine=None if engine is None else ProfileEngine(**engine),
        )

    def to_json(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, allow_nan=False)
            f.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> CostProfile:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def fit_nonnegative(
    columns: Sequence[Iterable[float]], y: Iterable[float], *, relative: bool = False
) -> list[float]:
    """Least squares y ≈ X·β with β ≥ 0: drop the most negative coefficient and refit until none is.

    Costs cannot be negative; a negative coefficient is noise fitting noise, so it is fixed at 0.
    `relative=True` minimises relative errors (each row weighted by 1/y), so that a few large
    observations do not decide the fit for the many small ones.
    """
    X = np.array([list(c) for c in columns], dtype=float).T
    target = np.asarray(list(y), dtype=float)
    if relative:
        weights = 1.0 / np.maximum(target, np.finfo(float).tiny)
        X, target = X * weights[:, None], target * weights
    active = list(range(X.shape[1]))
    beta = np.zeros(X.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(X[:, active], target, rcond=None)
        if (sol >= 0).all():
            beta[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return [float(b) for b in beta]
