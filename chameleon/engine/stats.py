"""What `EngineCore.stats()` reports, nested by source: requests, KV, memory, adapters, scheduler,
prefix cache.

Each part is a frozen value read from the component that owns the numbers (the scheduler's
mechanism, the KV block manager, the memory budget, the adapter cache, the policy), so a dashboard
or a test reads `stats.kv.blocks_in_use` or `stats.adapters.hit_rate` without knowing the internals.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class RequestStats:
    running: int = 0
    waiting: int = 0
    finished: int = 0
    preemptions: int = 0
    policy_preemptions: int = 0  # asked for by the policy (quantum, squash), not forced by memory


@attrs.frozen
class KVStats:
    blocks_in_use: int = 0
    blocks_total: int = 0
    swapped_out_bytes: int = 0
    swapped_in_bytes: int = 0
    window_evicted_blocks: int = 0  # freed because they left a sequence's bounded window (kv_window)


@attrs.frozen
class MemoryStats:
    budget_bytes: int = 0
    kv_bytes: int = 0
    adapter_bytes: int = 0
    free_bytes: int = 0


@attrs.frozen
class AdapterStats:
    registered: int = 0
    resident: int = 0
    resident_bytes: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0  # host -> device copies, prefetches included
    prefetches: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_critical_s: float = 0.0  # time iterations waited for adapter copies
    ref_count: int = 0

    @property
    def hit_rate(self) -> float | None:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else None


@attrs.frozen
class PrefixCacheStats:
    enabled: bool = False
    queried_tokens: int = 0  # tokens of admitted requests looked up in the prefix cache
    hit_tokens: int = 0  # of those, attached from cached blocks instead of computed
    cached_blocks: int = 0  # unreferenced blocks holding a cached prefix (reclaimable)
    indexed_blocks: int = 0  # all blocks with a prefix key, in use or cached
    evictions: int = 0  # cached blocks whose content was dropped for other uses

    @property
    def hit_rate(self) -> float | None:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else None


@attrs.frozen
class EngineStats:
    requests: RequestStats = attrs.field(factory=RequestStats)
    kv: KVStats = attrs.field(factory=KVStats)
    memory: MemoryStats = attrs.field(factory=MemoryStats)
    adapters: AdapterStats = attrs.field(factory=AdapterStats)
    scheduler: dict[str, Any] = attrs.field(factory=dict)  # the policy's own decisions (`metrics()`)
    prefix: PrefixCacheStats = attrs.field(factory=PrefixCacheStats)

    def as_dict(self) -> dict[str, Any]:
        """Nested plain data (JSON-ready); `adapters.hit_rate` included."""
        d = attrs.asdict(self)
        d["adapters"]["hit_rate"] = self.adapters.hit_rate
        d["prefix"]["hit_rate"] = self.prefix.hit_rate
        return d


def collect_stats(core: Any) -> EngineStats:
    """The stats of an `EngineCore` (typed Any: the core imports this module)."""
    from chameleon.engine.kv_stats import prefix_stats  # kv_stats imports this module's values
    cache, mech, mem = core.adapter_cache.stats, core.scheduler.stats, core.memory
    return EngineStats(
        requests=RequestStats(
            running=len(core.scheduler.running),
            waiting=core.scheduler.num_waiting,
            finished=core._num_finished,
            preemptions=mech.preemptions,
            policy_preemptions=mech.policy_preemptions,
        ),
        kv=KVStats(
            blocks_in_use=core.blocks.num_in_use,
            blocks_total=core.blocks.num_blocks,
            swapped_out_bytes=mech.swapped_out_bytes,
            swapped_in_bytes=mech.swapped_in_bytes,
            window_evicted_blocks=core.blocks.window_evictions,
        ),
        memory=MemoryStats(
            budget_bytes=mem.total_bytes, kv_bytes=mem.kv_bytes, adapter_bytes=mem.adapter_bytes, free_bytes=mem.free_bytes
        ),
        adapters=AdapterStats(
            registered=len(core.adapters),
            resident=len(core.adapter_cache.resident()),
            resident_bytes=mem.adapter_bytes,
            hits=cache.hits,
            misses=cache.misses,
            loads=cache.loads,
            prefetches=cache.prefetches,
            evictions=cache.evictions,
            bytes_loaded=cache.bytes_loaded,
            load_critical_s=core.adapter_load_critical_s,
            ref_count=core.adapter_cache.total_ref_count,
        ),
        scheduler=core.scheduler.policy.metrics(),
        prefix=prefix_stats(core.blocks),
    )
