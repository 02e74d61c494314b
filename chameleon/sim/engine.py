"""A simulated engine: the real `EngineCore` over a `SimulatedExecutor` (no torch).

For a GPU/model preset (the analytic cost model) or a measured `CostProfile`; adapters are
synthetic (a name and a rank). The scheduler and adapter cache are the real ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from chameleon.clock import ManualClock
from chameleon.config import EngineConfig
from chameleon.engine.core import CoreLimits, EngineCore
from chameleon.sim.analytic import A40_LLAMA7B_CALIBRATION, Calibration
from chameleon.sim.executor import SimulatedExecutor, SyntheticAdapter, synthetic_path
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
    config: EngineConfig | None = None,
    *,
    adapters: Sequence[NamedRank] = (),
    profile: CostProfile | None = None,
    calibration: Calibration = A40_LLAMA7B_CALIBRATION,
    adapter_pool_rows: int | None = None,
    reserve_fraction: float = DEFAULT_RESERVE_FRACTION,
) -> tuple[EngineCore[SyntheticAdapter], ManualClock]:
    """The real engine core over a simulated executor, with `adapters` registered (synthetic).

    `config` is the same `EngineConfig` a real engine takes (scheduler, cache policy, limits, seed,
    prefix caching, the KV dtype's bytes per token and the KV window; the device fields are ignored). With `profile`, the profiled engine's timings and sizes are
    used (`gpu`/`model` are ignored) and, without a config, its limits; otherwise the analytic
    model of `model` on `gpu`. `max_model_len` defaults to the model's context.
    """
    clock = ManualClock()
    if profile is not None:
        e = profile.engine
        if e is None:
            raise ValueError("this cost profile records no engine shape (num_kv_blocks, ...): re-run calibrate")
        config = config or EngineConfig(max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens)
        if config.kv_cache_dtype != "auto":
            raise ValueError(
                "a cost profile fixes the KV block size it measured: kv_cache_dtype needs a GPU/model preset"
            )
        executor = SimulatedExecutor.from_profile(profile, clock, adapter_pool_rows=adapter_pool_rows, seed=config.seed)
        limits = CoreLimits(max_model_len=config.max_model_len or e.max_model_len, vocab_size=e.vocab_size)
    else:
        if gpu is None or model is None:
            raise ValueError("build_sim_engine needs a GPU and a model preset, or a cost profile")
        config = config or EngineConfig()
        m = get_model(model)
        executor = SimulatedExecutor.from_gpu(
            get_gpu(gpu),
            m,
            clock,
            calibration=calibration,
            block_size=config.block_size,
            adapter_pool_rows=adapter_pool_rows,
            reserve_fraction=reserve_fraction,
            kv_cache_dtype=config.kv_cache_dtype,
        )
        max_len = min(config.max_model_len or m.max_model_len, executor.num_kv_blocks * config.block_size)
        limits = CoreLimits(max_model_len=max_len, vocab_size=m.vocab_size)
    core = EngineCore(executor, config, limits, clock=clock)
    for spec in adapters:
        core.add_adapter(spec.name, synthetic_path(spec.rank))
    return core, clock
