"""Paged KV cache bookkeeping: fixed-size blocks, a free list, one block table per request, and
(optionally) prefix caching: full blocks shared by content (`prefix_cache.py`), and a bounded
window: sink blocks + recent blocks per sequence, the blocks between them freed (docs/kv_cache.md)."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from chameleon.memory.budget import MemoryBudget
from chameleon.memory.prefix_cache import PrefixCache, block_key
from chameleon.sched.request import Request

if TYPE_CHECKING:
    from chameleon.config import KVWindow


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVBlockManager:
    """Hands out KV blocks. Knows nothing about tensors: the executor owns the memory itself.

    A block needs a free slot in the KV tensor *and* room in the shared memory budget (where idle
    adapters may sit; the scheduler evicts them first when KV needs the room). With prefix caching,
    unreferenced blocks that hold an indexed prefix stay cached in idle memory: they are the first
    thing given up when KV or an adapter needs the bytes (the budget calls `_trim_cached`).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        budget: MemoryBudget | None = None,
        *,
        prefix_caching: bool = False,
        window: KVWindow | None = None,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.budget = budget
        self._free: deque[int] = deque(range(num_blocks))
        self.prefix: PrefixCache | None = PrefixCache() if prefix_caching else None
        if budget is not None and self.prefix is not None:
            budget.reclaim_cached = self._trim_cached
        # Bounded window: the sink blocks always stay; blocks wholly before the recent window go.
        self.window = window
        self.sink_blocks = blocks_for(window.sink_tokens, block_size) if window is not None else 0
        self.window_evictions = 0  # blocks freed because they left a sequence's window

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: free ones and cached (unreferenced) ones."""
        return len(self._free) + self.num_cached

    @property
    def num_cached(self) -> int:
        return len(self.prefix.lru) if self.prefix is not None else 0

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def window_edges(self) -> tuple[int, int, int] | None:
        """(sink tokens kept, block-aligned; recent tokens; block size), or None without a window."""
        if self.window is None:
            return None
        return self.sink_blocks * self.block_size, self.window.recent_tokens, self.block_size

    def peak_blocks(self, num_tokens: int, chunk: int | None = None) -> int:
        """The most blocks a request of `num_tokens` tokens (prompt + output) ever holds at once,
        computing at most `chunk` tokens per step (None: any number, e.g. a whole prompt)."""
        full = blocks_for(num_tokens, self.block_size)
        if self.window is None or chunk is None:
            return full
        # After a step the table keeps the sinks and the blocks from (computed - recent) // bs on;
        # the next step adds up to `chunk` tokens: at most blocks_for(recent + chunk + bs - 1) past the sinks.
        reach = self.window.recent_tokens + min(chunk, num_tokens) + self.block_size - 1
        return min(full, self.sink_blocks + blocks_for(reach, self.block_size))

    def table_blocks(self, request: Request, num_tokens: int) -> int:
        """Entries of `request`'s block table that hold its first `num_tokens` tokens."""
        return blocks_for(num_tokens, self.block_size) - request.num_evicted_blocks

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Extra blocks `request` needs so that its first `num_tokens` tokens have slots."""
        return max(0, self.table_blocks(request, num_tokens) - len(request.block_table))

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Grow the block table to cover `num_tokens`; all or nothing. Free blocks go first, then
        the least recently used cached ones (their content is dropped)."""
        needed = self.blocks_needed(request, num_tokens)
        if needed == 0:  # most decode steps: the last block has room
            return True
        if needed > self.num_free or (self.budget is not None and not self.budget.kv_fits(needed)):
            return False
        taken = 0  # cached blocks whose content is dropped
        for _ in range(needed):
            if self._free:
                block = self._free.popleft()
            else:  # the least recently used cached block
                assert self.prefix is not None
                block = self.prefix.evict_oldest()
                taken += 1
            request.block_table.append(block)
            if self.prefix is not None:
                self.prefix.ref(block)
        if taken:
            self._add_cached(-taken)
        if self.budget is not None:
            self.budget.add_kv(needed)
        return True

    def free(self, request: Request) -> None:
        table, request.block_table = request.block_table, []
        request.num_registered_blocks = 0
        if not request.swapped:  # a swapped request's host copy holds exactly its retained blocks
            request.num_evicted_blocks = 0
        self._release(table)

    def _release(self, table: list[int]) -> None:
        released, unheld, parked = [], 0, 0
        for block in reversed(table):  # the tail first: it is the least likely to be shared
            if self.prefix is None:
                released.append(block)
            elif self.prefix.unref(block):  # nobody else holds it
                unheld += 1
                if self.prefix.park(block):
                    parked += 1
                else:
                    released.append(block)
        if self.prefix is None:
            unheld = len(table)
        if self.budget is not None:
            self.budget.add_kv(-unheld)  # first: the parked blocks' bytes become idle memory
        if parked:
            self._add_cached(parked)
        # Freed blocks go to the front so recently used (cache-warm) memory is reused first.
        self._free.extendleft(released)

    # --- prefix caching -----------------------------------------------------------------------

    def attach_prefix(self, request: Request) -> int | None:
        """At admission: share the cached full blocks that start `request`'s tokens and skip
        computing them. At least the last token is always computed (the step must sample). A
        request asking for prompt logprobs attaches nothing (it still indexes its blocks for others).
        Returns the tokens hit, or None when nothing was looked up (prefix caching off, a swapped
        or half-computed request)."""
        if self.prefix is None or request.block_table or request.num_computed_tokens or not request.prefix_sharing:
            return None
        if request.sampling.prompt_logprobs is not None:  # every prompt position must be computed
            return None
        hits = []
        for i in range((request.num_tokens - 1) // self.block_size):
            block = self.prefix.lookup(self._key(request, i))  # keys past the first miss are never hashed here
            if block is None:
                break
            hits.append(block)
        revived = sum(self.prefix.ref(block) for block in hits)  # were idle in the LRU: cached -> in use
        if revived:
            self._add_cached(-revived)
            if self.budget is not None:
                self.budget.add_kv(revived)
        request.block_table = hits
        request.num_registered_blocks = len(hits)
        request.num_computed_tokens = hit = len(hits) * self.block_size
        self._slide(request)  # a long cached prefix keeps only its sinks and its window
        return hit

    def detach_prefix(self, request: Request, hit: int | None) -> None:
        """Undo `attach_prefix` for a request that could not be admitted after all."""
        if hit is not None:
            self.free(request)
            request.num_computed_tokens = 0

    def admitted(self, request: Request, hit: int | None) -> None:
        """Count an admitted request's lookup in the prefix statistics."""
        request.num_cached_tokens = hit or 0
        if self.prefix is not None and hit is not None:
            self.prefix.stats.queried_tokens += request.num_tokens
            self.prefix.stats.hit_tokens += hit

    def commit(self, request: Request) -> None:
        """After a step: index the blocks `request` has just filled with computed KV, then free
        the blocks that left its window."""
        if self.prefix is not None and request.prefix_sharing:
            self._register(request)
        if self.window is not None:
            self._slide(request)

    def _register(self, request: Request) -> None:
        assert self.prefix is not None
        evicted = request.num_evicted_blocks
        full = min(request.num_computed_tokens // self.block_size, len(request.block_table) + evicted)
        if full <= request.num_registered_blocks:
            return
        for i in range(request.num_registered_blocks, full):  # blocks just filled: never evicted yet
            self.prefix.register(request.block_table[i if i < self.sink_blocks else i - evicted], self._key(request, i))
        request.num_registered_blocks = full

    def _slide(self, request: Request) -> None:
        """Free the blocks wholly between the sinks and the recent window of the next query (at
        position `num_computed_tokens`): logical blocks sink .. (computed - recent) // bs - 1."""
        if self.window is None:
            return
        start = (request.num_computed_tokens - self.window.recent_tokens) // self.block_size
        n = start - self.sink_blocks - request.num_evicted_blocks
        if n <= 0:
            return
        s = self.sink_blocks
        gone = request.block_table[s : s + n]
        del request.block_table[s : s + n]
        request.num_evicted_blocks += n
        self.window_evictions += n
        self._release(gone)  # shared (prefix-cached) blocks stay with their other holders

    def _key(self, request: Request, i: int) -> bytes:
        """The key of full block `i` (memoized on the request: its tokens never change)."""
        keys, bs = request.block_keys, self.block_size
        while len(keys) <= i:
            j, prompt = len(keys), request.prompt_token_ids
            lo, hi, n = j * bs, (j + 1) * bs, len(prompt)
            tokens = prompt[lo:hi] if hi <= n else prompt[lo:] + request.output_token_ids[max(0, lo - n) : hi - n]
            keys.append(block_key(keys[-1] if keys else b"", tokens, request.prefix_salt))
        return keys[i]

    def _add_cached(self, delta: int) -> None:
        if self.budget is not None:
            self.budget.add_cached_kv(delta)

    def _trim_cached(self, nbytes: int) -> None:
        """The budget needs `nbytes` of idle memory back: drop cached blocks, oldest first."""
        assert self.prefix is not None and self.budget is not None
        dropped = 0
        while dropped < nbytes and self.prefix.lru:
            self._free.append(self.prefix.evict_oldest())
            self.budget.cached_kv_blocks -= 1
            dropped += self.budget.kv_block_bytes
