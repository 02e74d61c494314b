"""A simulated engine: the real `EngineCore` over a `SimulatedExecutor` (no torch).

For a GPU/model preset (the analytic cost model) or a measured `CostProfile`; adapters are
synthetic (a name and a rank). The scheduler and adapter cache are the real ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from chameleon.clock import ManualClock
from chameleon.engine.core import CoreLimits, EngineCore
from chameleon.sim.analytic import A40_LLAMA7B_CALIBRATION, Calibration
from chameleon.sim.executor import SimulatedExecutor, synthetic_path
from chameleon.sim.hardware import DEFAULT_RESERVE_FRACTION, GPUSpec, ModelCost, get_gpu, get_model
from chameleon.sim.profile import CostProfile

__all__ = ["NamedRank", "build_sim_engine"]


class NamedRank(Protocol):
    """What a synthetic adapter needs: a name and a rank (e.g. a workload's `AdapterSpec`)."""

    @property
    def name(self) -> str: ...

    @property
    def rank(self) -> int: ...


def build_sim_engine(
    gpu: GPUSpec | str | None,
    model: ModelCost | str | None,
    *,
    scheduler: str = "fifo",
    adapter_cache: str = "lru",
    adapters: Sequence[NamedRank] = (),
    profile: CostProfile | None = None,
    calibration: Calibration = A40_LLAMA7B_CALIBRATION,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    max_model_len: int | None = None,
    block_size: int = 16,
    adapter_pool_rows: int | None = None,
    reserve_fraction: float = DEFAULT_RESERVE_FRACTION,
    seed: int = 0,
    core_options: Mapping[str, Any] | None = None,
) -> tuple[EngineCore, ManualClock]:
    """The real engine core over a simulated executor, with `adapters` registered (synthetic).

    With `profile`, the profiled engine's timings and sizes are used (`gpu`/`model` are ignored);
    otherwise the analytic model of `model` on `gpu`. Unset limits default to the profiled engine's,
    or to `EngineConfig`'s defaults (128 sequences, 2048 batched tokens) and the model's context.
    `core_options` go to `EngineCore` as they are (e.g. `scheduler_options`, `prefetch_depth`).
    """
    clock = ManualClock()
    if profile is not None:
        executor = SimulatedExecutor.from_profile(profile, clock, adapter_pool_rows=adapter_pool_rows, seed=seed)
        e = profile.engine
        assert e is not None
        limits = CoreLimits(
            max_model_len=max_model_len or e.max_model_len,
            vocab_size=e.vocab_size,
            max_num_seqs=max_num_seqs or e.max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens or e.max_num_batched_tokens,
        )
    else:
        if gpu is None or model is None:
            raise ValueError("build_sim_engine needs a GPU and a model preset, or a cost profile")
        m = get_model(model)
        executor = SimulatedExecutor.from_gpu(
            get_gpu(gpu),
            m,
            clock,
            calibration=calibration,
            block_size=block_size,
            adapter_pool_rows=adapter_pool_rows,
            reserve_fraction=reserve_fraction,
        )
        limits = CoreLimits(
            max_model_len=min(max_model_len or m.max_model_len, executor.num_kv_blocks * block_size),
            vocab_size=m.vocab_size,
            max_num_seqs=max_num_seqs or 128,
            max_num_batched_tokens=max_num_batched_tokens or 2048,
        )
    core = EngineCore(
        executor,
        limits,
        scheduler=scheduler,
        adapter_cache=adapter_cache,  # type: ignore[arg-type]
        clock=clock,
        seed=seed,
        **dict(core_options or {}),
    )
    for spec in adapters:
        core.add_adapter(spec.name, synthetic_path(spec.rank))
    return core, clock
