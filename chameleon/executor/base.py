"""The interface between the engine core and whatever runs a batch."""

from __future__ import annotations

from typing import Any, Protocol

from chameleon.outputs import AdapterInfo
from chameleon.sched.scheduler import SchedulerOutput


class Executor(Protocol):
    @property
    def num_kv_blocks(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    @property
    def adapter_pool_rows(self) -> int:
        """Rank rows of device memory for adapters (the adapter cache's capacity)."""
        ...

    @property
    def kv_block_bytes(self) -> int:
        """Device bytes of one KV block (all layers, K and V): the budget's unit for KV."""
        ...

    @property
    def adapter_row_bytes(self) -> int:
        """Device bytes of one rank row of an adapter across all layers and target modules."""
        ...

    def read_adapter(self, name: str, path: str) -> Any:
        """Validate an adapter against the model and read it into host memory.

        Touches no shared state, so the async front end runs it in a worker thread.
        """
        ...

    def register_adapter(self, adapter: Any) -> AdapterInfo: ...

    def unregister_adapter(self, name: str) -> None: ...

    def load_adapter(self, name: str, row: int) -> None:
        """Make a registered adapter usable at pool rows `row...`; returns once it is.

        If `prefetch_adapter` already started this copy, this only waits for it to finish.
        """
        ...

    def prefetch_adapter(self, name: str, row: int) -> None:
        """Start copying an adapter into pool rows `row...` without waiting (overlaps compute)."""
        ...

    def evict_adapter(self, name: str) -> None: ...

    def swap_out(self, request_id: str, block_ids: tuple[int, ...]) -> None:
        """Copy these KV blocks (all layers) to host memory, kept under `request_id`."""
        ...

    def swap_in(self, request_id: str, block_ids: tuple[int, ...]) -> None:
        """Copy `request_id`'s swapped KV back into these (new) blocks and forget the host copy."""
        ...

    def drop_swapped(self, request_id: str) -> None:
        """Forget a host copy that will never be swapped in (the request was aborted)."""
        ...

    def execute(self, batch: SchedulerOutput) -> list[int]:
        """Run one iteration; return one sampled token per scheduled request that samples, in order."""
        ...
