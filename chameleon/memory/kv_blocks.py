"""Paged KV cache bookkeeping: fixed-size blocks, a free list, and one block table per request."""

from __future__ import annotations

from collections import deque

from chameleon.memory.budget import MemoryBudget
from chameleon.sched.request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVBlockManager:
    """Hands out KV blocks. Knows nothing about tensors: the executor owns the memory itself.

    A block needs a free slot in the KV tensor *and* room in the shared memory budget (where idle
    adapters may sit; the scheduler evicts them first when KV needs the room).
    """

    def __init__(self, num_blocks: int, block_size: int, budget: MemoryBudget | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.budget = budget
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Extra blocks `request` needs so that its first `num_tokens` tokens have slots."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(request.block_table))

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Grow the block table to cover `num_tokens`; all or nothing."""
        needed = self.blocks_needed(request, num_tokens)
        if needed > len(self._free) or (self.budget is not None and not self.budget.kv_fits(needed)):
            return False
        request.block_table.extend(self._free.popleft() for _ in range(needed))
        if self.budget is not None:
            self.budget.add_kv(needed)
        return True

    def free(self, request: Request) -> None:
        # Freed blocks go to the front so recently used (cache-warm) memory is reused first.
        self._free.extendleft(reversed(request.block_table))
        if self.budget is not None:
            self.budget.add_kv(-len(request.block_table))
        request.block_table = []
