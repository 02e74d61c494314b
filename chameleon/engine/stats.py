"""What `EngineCore.stats()` reports: requests, KV, memory, the adapter cache and the scheduler."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class EngineStats:
    running: int
    waiting: int
    kv_blocks_in_use: int
    kv_blocks_total: int
    num_preemptions: int
    num_finished: int
    num_policy_preemptions: int = 0
    swapped_out_bytes: int = 0
    swapped_in_bytes: int = 0
    scheduler_metrics: dict[str, Any] = attrs.field(factory=dict)
    adapters_registered: int = 0
    adapters_resident: int = 0
    adapter_resident_bytes: int = 0
    adapter_hits: int = 0
    adapter_misses: int = 0
    adapter_loads: int = 0
    adapter_prefetches: int = 0
    adapter_evictions: int = 0
    adapter_bytes_loaded: int = 0
    adapter_load_critical_s: float = 0.0
    adapter_ref_count: int = 0
    memory_budget_bytes: int = 0
    kv_bytes: int = 0
    memory_free_bytes: int = 0

    @property
    def adapter_hit_rate(self) -> float | None:
        lookups = self.adapter_hits + self.adapter_misses
        return self.adapter_hits / lookups if lookups else None

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def collect_stats(core: Any) -> EngineStats:
    """The stats of an `EngineCore` (typed Any: the core imports this module)."""
    cache = core.adapter_cache.stats
    return EngineStats(
        running=len(core.scheduler.running),
        waiting=core.scheduler.num_waiting,
        kv_blocks_in_use=core.blocks.num_in_use,
        kv_blocks_total=core.blocks.num_blocks,
        num_preemptions=core.scheduler.stats.preemptions,
        num_policy_preemptions=core.scheduler.stats.policy_preemptions,
        swapped_out_bytes=core.scheduler.stats.swapped_out_bytes,
        swapped_in_bytes=core.scheduler.stats.swapped_in_bytes,
        scheduler_metrics=core.scheduler.policy.metrics(),
        num_finished=core._num_finished,
        adapters_registered=len(core.adapters),
        adapters_resident=len(core.adapter_cache.resident()),
        adapter_resident_bytes=core.memory.adapter_bytes,
        adapter_hits=cache.hits,
        adapter_misses=cache.misses,
        adapter_loads=cache.loads,
        adapter_prefetches=cache.prefetches,
        adapter_evictions=cache.evictions,
        adapter_bytes_loaded=cache.bytes_loaded,
        adapter_load_critical_s=core.adapter_load_critical_s,
        adapter_ref_count=core.adapter_cache.total_ref_count,
        memory_budget_bytes=core.memory.total_bytes,
        kv_bytes=core.memory.kv_bytes,
        memory_free_bytes=core.memory.free_bytes,
    )
