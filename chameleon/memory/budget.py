"""One device-memory budget shared by KV blocks, an activation reserve and adapter weights.

KV always has priority: adapters live only in bytes the KV cache is not using ("idle memory"),
and a KV allocation that finds the budget short evicts idle adapters first (the scheduler asks
the adapter cache to). The invariant, checked on every change:

    kv_blocks_in_use * kv_block_bytes + adapter_rows * adapter_row_bytes + reserve <= total

This is accounting, not allocation: the executor owns the tensors. On CPU both fit in host RAM;
on CUDA the KV tensor is sized for the whole budget and the adapter pool is a separate tensor,
so the budget decides what may be *used*, as the paper's policy does, while unified paging of
both in one arena (S-LoRA) is not done.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs


class BudgetExceededError(RuntimeError):
    """An internal accounting bug: someone used memory the budget did not have."""


@attrs.define
class MemoryBudget:
    total_bytes: int
    reserve_bytes: int
    kv_block_bytes: int
    adapter_row_bytes: int
    kv_blocks: int = 0  # in use
    adapter_rows: int = 0  # resident
    # Prefix caching: unreferenced blocks that keep a cached prefix. They live in idle memory
    # (`free_bytes` counts them as free) and are given up first: whenever KV or adapters grow into
    # their bytes, `reclaim_cached(nbytes)` drops that many, least recently used first.
    cached_kv_blocks: int = 0
    reclaim_cached: Callable[[int], None] | None = attrs.field(default=None, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if self.reserve_bytes + self.kv_block_bytes > self.total_bytes:
            raise ValueError("the budget cannot hold the reserve and a single KV block")

    @property
    def kv_bytes(self) -> int:
        return self.kv_blocks * self.kv_block_bytes

    @property
    def adapter_bytes(self) -> int:
        return self.adapter_rows * self.adapter_row_bytes

    @property
    def cached_kv_bytes(self) -> int:
        return self.cached_kv_blocks * self.kv_block_bytes

    @property
    def usable_bytes(self) -> int:
        """What KV and adapters may share: the budget less the activation reserve."""
        return self.total_bytes - self.reserve_bytes

    @property
    def free_bytes(self) -> int:
        """Idle bytes, cached prefix blocks included (they are reclaimable at any time)."""
        return self.usable_bytes - self.kv_bytes - self.adapter_bytes

    def kv_fits(self, blocks: int) -> bool:
        return blocks * self.kv_block_bytes <= self.free_bytes

    def adapter_fits(self, rows: int) -> bool:
        return rows * self.adapter_row_bytes <= self.free_bytes

    def add_kv(self, blocks: int) -> None:
        self.kv_blocks += blocks
        self._check()

    def add_adapter_rows(self, rows: int) -> None:
        self.adapter_rows += rows
        self._check()

    def add_cached_kv(self, blocks: int) -> None:
        self.cached_kv_blocks += blocks
        self._check()

    def _check(self) -> None:
        over = self.cached_kv_bytes - max(0, self.free_bytes)
        if over > 0 and self.reclaim_cached is not None:
            self.reclaim_cached(over)
        if (
            self.free_bytes < self.cached_kv_bytes
            or min(self.kv_blocks, self.adapter_rows, self.cached_kv_blocks) < 0
        ):
            raise BudgetExceededError(
                f"memory budget broken: kv {self.kv_bytes} + adapters {self.adapter_bytes} + reserve "
                f"{self.reserve_bytes} > {self.total_bytes}"
            )

    def as_dict(self) -> dict[str, int]:
        return {
            "budget_bytes": self.total_bytes,
            "reserve_bytes": self.reserve_bytes,
            "kv_bytes": self.kv_bytes,
            "adapter_bytes": self.adapter_bytes,
            "free_bytes": self.free_bytes,
            "cached_kv_bytes": self.cached_kv_bytes,
        }
