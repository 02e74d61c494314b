"""Which adapters are resident in device memory, where, and which to evict (pure policy, no torch).

Device adapter memory is a pool of rank rows (`chameleon.lora.ops`): an adapter of rank r needs r
consecutive rows in every (layer, module) pool, and r * row_bytes of the shared `MemoryBudget`.
The cache hands out row ranges, counts the requests running with each adapter (reference count,
RC), and evicts only idle adapters (RC = 0, not pinned). The executor does the copying.

Policies (`EngineConfig.adapter_cache`):
- `chameleon` (paper §4.2): idle adapters stay in whatever memory KV does not use. When room is
  needed, idle adapters that no queued request needs go first, lowest score first, where
      score = 0.45 * frequency + 0.10 * recency + 0.45 * size
  and each term is normalised to [0, 1] over the current eviction candidates:
      frequency = uses in the last `window_s` seconds / the largest such count (0 if all are 0),
      recency   = (last_used - oldest last_used) / (newest - oldest)   (1 if they are all equal),
      size      = rows / the largest candidate's rows.
  Larger adapters cost more to reload, so they score higher and stay. Adapters of queued requests
  are evicted only when memory forces it, and then by the same score.
- `lru`: idle adapters stay; least recently used goes first; queued requests do not protect.
- `slora`: no idle cache (the S-LoRA baseline): an adapter leaves as soon as its RC reaches 0 and
  no queued request needs it. Like S-LoRA it still prefetches the adapters of queued requests
  asynchronously into free memory ("asynchronous adapter prefetching without adapter caching",
  Chameleon §5); such an adapter stays until its request has run, and leaves if that request is
  aborted before (`queue`).
- `fairshare` (the paper's Ch-FairShare baseline): `chameleon` with equal score weights 1/3 each.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import attrs

from chameleon.errors import AdapterInUseError, AdapterMemoryError, AdapterNotFoundError
from chameleon.memory.budget import MemoryBudget

CachePolicyName = Literal["chameleon", "lru", "slora", "fairshare"]
CACHE_POLICIES: tuple[str, ...] = ("chameleon", "lru", "slora", "fairshare")
SCORE_WEIGHTS = (0.45, 0.10, 0.45)  # frequency, recency, size (paper §4.2)
FAIRSHARE_WEIGHTS = (1 / 3, 1 / 3, 1 / 3)  # Ch-FairShare (paper §6): equal F/R/S weights


@attrs.define
class CacheEntry:
    name: str
    rows: int  # rank rows the adapter needs in every pool
    row: int | None = None  # first pool row when resident
    ref_count: int = 0
    queued: int = 0  # waiting requests that will need it
    pinned: bool = False
    last_used: float = 0.0
    use_times: deque[float] = attrs.field(factory=deque)  # within the frequency window
    prefetched: bool = False  # loaded ahead of its request; not yet used

    @property
    def resident(self) -> bool:
        return self.row is not None

    @property
    def evictable(self) -> bool:
        return self.resident and self.ref_count == 0 and not self.pinned


@attrs.frozen
class Acquired:
    """What the executor must do before the batch runs: make `name` usable at `row`.

    `load`: a copy is needed now (a miss). `prefetched`: a copy was started earlier; wait for it.
    """

    name: str
    row: int
    load: bool
    prefetched: bool = False
    evicted: tuple[str, ...] = ()


@attrs.define
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0  # copies host -> device, prefetches included
    prefetches: int = 0
    evictions: int = 0
    bytes_loaded: int = 0


class RowAllocator:
    """First-fit allocation of contiguous row ranges, with neighbouring free ranges merged."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free: list[tuple[int, int]] = [(0, capacity)] if capacity else []  # (start, length), sorted

    def copy(self) -> RowAllocator:
        clone = RowAllocator(self.capacity)
        clone.free = list(self.free)
        return clone

    def allocate(self, rows: int) -> int | None:
        for i, (start, n) in enumerate(self.free):
            if n >= rows:
                self.free[i : i + 1] = [(start + rows, n - rows)] if n > rows else []
                return start
        return None

    def release(self, start: int, rows: int) -> None:
        merged: list[tuple[int, int]] = []
        for s, n in sorted([*self.free, (start, rows)]):
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self.free = merged


class AdapterCache:
    def __init__(
        self,
        capacity_rows: int,
        budget: MemoryBudget,
        policy: CachePolicyName = "chameleon",
        *,
        window_s: float = 60.0,
    ) -> None:
        if policy not in CACHE_POLICIES:
            raise ValueError(f"unknown adapter cache policy {policy!r}")
        self.policy = policy
        self.weights = FAIRSHARE_WEIGHTS if policy == "fairshare" else SCORE_WEIGHTS
        self.budget = budget
        self.window_s = window_s
        self.rows = RowAllocator(capacity_rows)
        self.entries: dict[str, CacheEntry] = {}
        self.stats = CacheStats()

    # --- registration ------------------------------------------------------------------------

    def register(self, name: str, rows: int) -> None:
        free = self.rows.capacity - self.pinned_rows()
        if rows > free:
            raise AdapterMemoryError(
                f"adapter {name!r} needs {rows} rank rows; the device pool has {self.rows.capacity}, "
                f"{free} of them not held by pinned adapters"
            )
        self._check_kv_room(f"adapter {name!r}", rows + self.pinned_rows())
        self.entries[name] = CacheEntry(name, rows)

    def unregister(self, name: str) -> None:
        entry = self.entry(name)
        if entry.ref_count:
            raise AdapterInUseError(f"adapter {name!r} is used by {entry.ref_count} running requests")
        self._evict(entry)
        del self.entries[name]

    def pin(self, name: str, pinned: bool = True) -> None:
        """Pinned adapters are never evicted. A pin that would leave some registered adapter no
        room to ever load is refused, since requests for it would wait forever."""
        entry = self.entry(name)
        if pinned and not entry.pinned:
            left = self.rows.capacity - self.pinned_rows() - entry.rows
            largest = max((e.rows for e in self.entries.values() if not e.pinned and e is not entry), default=0)
            if largest > left:
                raise AdapterMemoryError(
                    f"pinning {name!r} would leave {left} rank rows for the other adapters; one needs {largest}"
                )
            self._check_kv_room(f"pinning {name!r}", self.pinned_rows() + entry.rows + largest)
        entry.pinned = pinned

    def entry(self, name: str) -> CacheEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise AdapterNotFoundError(f"no adapter named {name!r} is registered") from None

    # --- requests ----------------------------------------------------------------------------

    def queue(self, name: str, delta: int) -> str | None:
        """A waiting request that needs `name` arrived (+1) or left the queue (-1). Returns the
        adapter's name if `slora` evicted it (prefetched for a request that left without running)."""
        entry = self.entry(name)
        entry.queued += delta
        if self.policy == "slora" and entry.queued == 0 and entry.evictable:
            self._evict(entry)
            return name
        return None

    def can_acquire(self, name: str, now: float) -> bool:
        """True if `name` is resident or could be made resident by evicting idle adapters."""
        entry = self.entry(name)
        return entry.resident or self._plan(entry, now, protect_queued=False) is not None

    def acquire(self, name: str, now: float) -> Acquired | None:
        """Take a reference for a request about to run; None if it cannot fit right now."""
        entry = self.entry(name)
        acquired = self._make_resident(entry, now, protect_queued=False)
        if acquired is None:
            return None
        if acquired.load:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        entry.prefetched = False
        entry.ref_count += 1
        self._touch(entry, now)
        return acquired

    def release(self, name: str, now: float) -> str | None:
        """Drop a request's reference. Returns the adapter's name if the policy evicted it."""
        entry = self.entry(name)
        if entry.ref_count <= 0:
            raise RuntimeError(f"adapter {name!r}: reference count would go negative")
        entry.ref_count -= 1
        entry.last_used = now
        if self.policy == "slora" and entry.evictable and entry.queued == 0:
            self._evict(entry)
            return name
        return None

    def prefetch(self, name: str, now: float, *, evict: bool = True) -> Acquired | None:
        """Load `name` ahead of its request if idle memory allows, never evicting what a queued
        request needs (nor anything at all when `evict` is False, for speculative loads).
        Returns the load to start, or None (already resident, or no room)."""
        entry = self.entry(name)
        if entry.resident:
            return None
        acquired = self._make_resident(entry, now, protect_queued=True, evict=evict)
        if acquired is not None:
            entry.prefetched = True
            self.stats.prefetches += 1
        return acquired

    def reclaim(self, nbytes: int, now: float) -> list[str] | None:
        """KV needs `nbytes` more of the budget: evict idle adapters (by policy order) until it
        fits. Returns the evicted names, or None if even evicting every idle adapter is not enough."""
        short = nbytes - self.budget.free_bytes
        if short <= 0:
            return []
        order = self._eviction_order(now, protect_queued=False)
        if sum(e.rows for e in order) * self.budget.adapter_row_bytes < short:
            return None
        evicted = []
        for entry in order:
            if self.budget.free_bytes >= nbytes:
                break
            self._evict(entry)
            evicted.append(entry.name)
        return evicted

    def drop(self, name: str) -> None:
        """Forget an idle adapter's residency (its load failed, so the device rows are garbage)."""
        entry = self.entries.get(name)
        if entry is not None and entry.ref_count == 0:
            self._evict(entry)

    # --- introspection -----------------------------------------------------------------------

    @property
    def total_ref_count(self) -> int:
        return sum(e.ref_count for e in self.entries.values())

    def resident(self) -> list[CacheEntry]:
        return [e for e in self.entries.values() if e.resident]

    def scores(self, now: float) -> dict[str, float]:
        """Chameleon scores of the idle adapters (the current eviction candidates)."""
        candidates = [e for e in self.entries.values() if e.evictable]
        return {e.name: s for e, s in zip(candidates, self._scores(candidates, now), strict=True)}

    # --- internals ---------------------------------------------------------------------------

    def undo(self, acquired: Acquired, now: float) -> list[str]:
        """Roll back an `acquire` whose request could not be admitted after all (no KV room).

        The adapter is released; one that was loaded for it leaves again, since the executor never
        copied it. Returns what left the device."""
        entry = self.entry(acquired.name)
        entry.ref_count -= 1
        if entry.use_times:
            entry.use_times.pop()
        if acquired.load:
            self.stats.misses -= 1
            self.stats.loads -= 1
            self.stats.bytes_loaded -= entry.rows * self.budget.adapter_row_bytes
            self._evict(entry)
            self.stats.evictions -= 1  # it never really arrived
            return [entry.name]
        self.stats.hits -= 1
        entry.prefetched = acquired.prefetched
        return []

    def _make_resident(
        self, entry: CacheEntry, now: float, *, protect_queued: bool, evict: bool = True
    ) -> Acquired | None:
        if entry.resident:
            return Acquired(entry.name, entry.row, load=False, prefetched=entry.prefetched)  # type: ignore[arg-type]
        victims = self._plan(entry, now, protect_queued=protect_queued, evict=evict)
        if victims is None:
            return None
        for victim in victims:
            self._evict(victim)
        entry.row = self.rows.allocate(entry.rows)
        assert entry.row is not None, "the eviction plan promised room"
        self.budget.add_adapter_rows(entry.rows)
        self.stats.loads += 1
        self.stats.bytes_loaded += entry.rows * self.budget.adapter_row_bytes
        return Acquired(entry.name, entry.row, load=True, evicted=tuple(v.name for v in victims))

    def _plan(
        self, entry: CacheEntry, now: float, *, protect_queued: bool, evict: bool = True
    ) -> list[CacheEntry] | None:
        """Idle adapters to evict, in policy order, until `entry` has contiguous rows and budget."""
        rows = self.rows.copy()
        free_bytes = self.budget.free_bytes
        need_bytes = entry.rows * self.budget.adapter_row_bytes
        victims: list[CacheEntry] = []
        order = self._eviction_order(now, protect_queued=protect_queued) if evict else []
        for candidate in [None, *order]:
            if candidate is not None:
                assert candidate.row is not None
                rows.release(candidate.row, candidate.rows)
                free_bytes += candidate.rows * self.budget.adapter_row_bytes
                victims.append(candidate)
            if free_bytes >= need_bytes and rows.copy().allocate(entry.rows) is not None:
                return victims
        return None

    def _eviction_order(self, now: float, *, protect_queued: bool) -> list[CacheEntry]:
        candidates = [e for e in self.entries.values() if e.evictable]
        if self.policy == "lru":
            return sorted(candidates, key=lambda e: (e.last_used, e.name))
        scores = dict(zip((e.name for e in candidates), self._scores(candidates, now), strict=True))
        # Adapters no queued request needs go first; the rest only when memory forces it.
        ordered = sorted(candidates, key=lambda e: (e.queued > 0, scores[e.name], e.last_used, e.name))
        return [e for e in ordered if not (protect_queued and e.queued > 0)]

    def _scores(self, candidates: list[CacheEntry], now: float) -> list[float]:
        if not candidates:
            return []
        for e in candidates:
            self._expire(e, now)
        freq_max = max(len(e.use_times) for e in candidates)
        oldest = min(e.last_used for e in candidates)
        newest = max(e.last_used for e in candidates)
        rows_max = max(e.rows for e in candidates)
        w_f, w_r, w_s = self.weights
        return [
            w_f * (len(e.use_times) / freq_max if freq_max else 0.0)
            + w_r * ((e.last_used - oldest) / (newest - oldest) if newest > oldest else 1.0)
            + w_s * e.rows / rows_max
            for e in candidates
        ]

    def _touch(self, entry: CacheEntry, now: float) -> None:
        entry.last_used = now
        entry.use_times.append(now)
        self._expire(entry, now)

    def _expire(self, entry: CacheEntry, now: float) -> None:
        while entry.use_times and entry.use_times[0] < now - self.window_s:
            entry.use_times.popleft()

    def _evict(self, entry: CacheEntry) -> None:
        if entry.row is not None:
            self.rows.release(entry.row, entry.rows)
            self.budget.add_adapter_rows(-entry.rows)
            entry.row = None
            entry.prefetched = False
            self.stats.evictions += 1

    def pinned_rows(self, exclude: str | None = None) -> int:
        """Rank rows of the pinned adapters (but `exclude`): memory that never comes back to KV."""
        return sum(e.rows for e in self.entries.values() if e.pinned and e.name != exclude)

    def _check_kv_room(self, what: str, rows: int) -> None:
        """`rows` resident at once must leave room for one KV block, or their requests wait forever."""
        b = self.budget
        usable = b.usable_bytes
        if rows * b.adapter_row_bytes + b.kv_block_bytes > usable:
            raise AdapterMemoryError(
                f"{what}: {rows} rank rows ({rows * b.adapter_row_bytes} bytes) would leave no room for one "
                f"KV block ({b.kv_block_bytes} bytes) in the {usable}-byte budget (after the reserve); "
                "raise device_memory_bytes or num_kv_blocks"
            )
