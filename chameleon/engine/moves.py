"""The memory moves of one iteration, in the order the schedule needs them (docs/design.md).

KV swaps first (swap-outs before swap-ins: their blocks may be reused in this same iteration),
then adapter evictions, the loads this batch waits for (timed: the critical path), and the
prefetches that overlap it. A failing load is the adapter's, never the batch's.
"""

from __future__ import annotations

from typing import Any

from chameleon.clock import Clock
from chameleon.engine.checks import try_load
from chameleon.sched.scheduler import SchedulerOutput


def move_kv(executor: Any, batch: SchedulerOutput) -> None:
    for swap in batch.swap_out:  # first: the blocks may belong to someone else this iteration
        executor.swap_out(swap.request_id, swap.block_ids)
    for request_id in batch.swap_drop:
        executor.drop_swapped(request_id)
    for swap in batch.swap_in:
        executor.swap_in(swap.request_id, swap.block_ids)


def move_adapters(executor: Any, batch: SchedulerOutput, clock: Clock) -> tuple[dict[str, str], float]:
    """Evict, load and prefetch. Returns the adapters whose load failed (with the reason) and the
    seconds the loads held the critical path."""
    for name in batch.adapter_evictions:
        executor.evict_adapter(name)
    failed: dict[str, str] = {}
    start = clock.now()
    for load in batch.adapter_loads:  # on the critical path: this batch needs them
        try_load(executor.load_adapter, load.name, load.row, failed)
    critical = clock.now() - start
    for load in batch.adapter_prefetches:  # overlapped with this batch
        try_load(executor.prefetch_adapter, load.name, load.row, failed)
    return failed, critical
