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
