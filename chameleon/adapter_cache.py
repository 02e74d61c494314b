"""Which adapters are resident in device memory, where, and which to evict (pure policy, no torch).

Device adapter memory is a pool of rank rows (`chameleon.lora.ops`): an adapter of rank r occupies
r consecutive rows in every (layer, module) pool. The cache hands out row ranges, counts the
requests using each adapter (reference count, RC), and evicts only idle (RC = 0), unpinned
adapters. The executor does the copying; this file only decides.

Policies:
- `lru`: idle adapters stay resident; evict the least recently used first.
- `slora`: no idle cache (the S-LoRA baseline): an adapter leaves as soon as its RC reaches 0.
"""

from __future__ import annotations

from typing import Literal

import attrs

from chameleon.errors import AdapterInUseError, AdapterMemoryError, AdapterNotFoundError

CachePolicyName = Literal["lru", "slora"]


@attrs.define
class CacheEntry:
    name: str
    rows: int  # rank rows the adapter needs in every pool
    nbytes: int  # device bytes when resident
    row: int | None = None  # first pool row when resident
    ref_count: int = 0
    pinned: bool = False
    last_used: float = 0.0
    uses: int = 0

    @property
    def resident(self) -> bool:
        return self.row is not None

    @property
    def evictable(self) -> bool:
        return self.resident and self.ref_count == 0 and not self.pinned


@attrs.frozen
class Acquired:
    """What the executor must do before the batch runs: load `name` at `row` if `load` is set."""

    name: str
    row: int
    load: bool
    evicted: tuple[str, ...] = ()


@attrs.define
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    bytes_loaded: int = 0


class RowAllocator:
    """First-fit allocation of contiguous row ranges, with neighbouring free ranges merged."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)] if capacity else []  # (start, length), sorted

    @property
    def free_rows(self) -> int:
        return sum(n for _, n in self._free)

    def allocate(self, rows: int) -> int | None:
        for i, (start, n) in enumerate(self._free):
            if n >= rows:
                self._free[i : i + 1] = [(start + rows, n - rows)] if n > rows else []
                return start
        return None

    def release(self, start: int, rows: int) -> None:
        spans = sorted([*self._free, (start, rows)])
        merged: list[tuple[int, int]] = []
        for s, n in spans:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self._free = merged


class AdapterCache:
    def __init__(self, capacity_rows: int, policy: CachePolicyName = "lru") -> None:
        if policy not in ("lru", "slora"):
            raise ValueError(f"unknown adapter cache policy {policy!r}")
        self.policy = policy
        self.rows = RowAllocator(capacity_rows)
        self.entries: dict[str, CacheEntry] = {}
        self.stats = CacheStats()

    # --- registration ------------------------------------------------------------------------

    def register(self, name: str, rows: int, nbytes: int) -> None:
        free = self.rows.capacity - self._pinned_rows()
        if rows > free:
            raise AdapterMemoryError(
                f"adapter {name!r} needs {rows} rank rows; the device pool has {self.rows.capacity}, "
                f"{free} of them not held by pinned adapters"
            )
        self.entries[name] = CacheEntry(name, rows, nbytes)

    def unregister(self, name: str) -> None:
        entry = self._entry(name)
        if entry.ref_count:
            raise AdapterInUseError(f"adapter {name!r} is used by {entry.ref_count} running requests")
        self._evict(entry)
        del self.entries[name]

    def pin(self, name: str, pinned: bool = True) -> None:
        """Pinned adapters are never evicted. A pin that would leave some registered adapter no
        room to ever load is refused, since requests for it would wait forever."""
        entry = self._entry(name)
        if pinned and not entry.pinned:
            left = self.rows.capacity - self._pinned_rows() - entry.rows
            largest = max((e.rows for e in self.entries.values() if not e.pinned and e is not entry), default=0)
            if largest > left:
                raise AdapterMemoryError(
                    f"pinning {name!r} would leave {left} rank rows for the other adapters; one needs {largest}"
                )
        entry.pinned = pinned

    def _pinned_rows(self) -> int:
        return sum(e.rows for e in self.entries.values() if e.pinned)

    # --- residency ---------------------------------------------------------------------------

    def can_acquire(self, name: str) -> bool:
        """True if `name` is resident or could be made resident by evicting idle adapters."""
        entry = self._entry(name)
        if entry.resident:
            return True
        return self._plan_evictions(entry.rows) is not None

    def acquire(self, name: str, now: float) -> Acquired | None:
        """Take a reference for a request about to run; None if it cannot fit right now."""
        entry = self._entry(name)
        evicted: tuple[str, ...] = ()
        load = not entry.resident
        if load:
            victims = self._plan_evictions(entry.rows)
            if victims is None:
                return None
            for victim in victims:
                self._evict(victim)
            evicted = tuple(v.name for v in victims)
            entry.row = self.rows.allocate(entry.rows)
            assert entry.row is not None, "eviction plan promised room"
            self.stats.misses += 1
            self.stats.loads += 1
            self.stats.bytes_loaded += entry.nbytes
        else:
            self.stats.hits += 1
        entry.ref_count += 1
        entry.uses += 1
        entry.last_used = now
        assert entry.row is not None
        return Acquired(name, entry.row, load, evicted)

    def release(self, name: str, now: float) -> str | None:
        """Drop a request's reference. Returns the adapter's name if the policy evicted it."""
        entry = self._entry(name)
        if entry.ref_count <= 0:
            raise RuntimeError(f"adapter {name!r}: reference count would go negative")
        entry.ref_count -= 1
        entry.last_used = now
        if self.policy == "slora" and entry.evictable:
            self._evict(entry)
            return name
        return None

    def drop(self, name: str) -> None:
        """Forget an idle adapter's residency (its load failed, so the device rows are garbage)."""
        entry = self.entries.get(name)
        if entry is not None and entry.ref_count == 0:
            self._evict(entry)

    @property
    def total_ref_count(self) -> int:
        return sum(e.ref_count for e in self.entries.values())

    def resident(self) -> list[CacheEntry]:
        return [e for e in self.entries.values() if e.resident]

    # --- internals ---------------------------------------------------------------------------

    def _entry(self, name: str) -> CacheEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise AdapterNotFoundError(f"no adapter named {name!r} is registered") from None

    def _plan_evictions(self, rows: int) -> list[CacheEntry] | None:
        """Idle adapters to evict (least recently used first) so `rows` contiguous rows are free."""
        trial = RowAllocator(self.rows.capacity)
        trial._free = list(self.rows._free)
        victims: list[CacheEntry] = []
        candidates = sorted((e for e in self.entries.values() if e.evictable), key=lambda e: e.last_used)
        while trial.allocate(rows) is None:
            if not candidates:
                return None
            victim = candidates.pop(0)
            assert victim.row is not None
            trial.release(victim.row, victim.rows)
            victims.append(victim)
        return victims

    def _evict(self, entry: CacheEntry) -> None:
        if entry.row is not None:
            self.rows.release(entry.row, entry.rows)
            entry.row = None
            self.stats.evictions += 1
