"""Which replica serves a request: adapter affinity from Chameleon's own cache state.

Pure and torch-free, Ray-free: the Ray Serve request router (`chameleon.serve.ray`) and the
simulator's multi-replica mode call the same `choose`. Each replica reports a `ReplicaState`
(adapters resident on its device and in its host tier, queue depth, free memory, in-flight
requests per adapter). `AffinityRouter` prefers a replica with the adapter on its device, then in
its host tier; when every holder's queue for that adapter has grown past `spread_queue`, it adds a
replica (the least loaded one that does not hold it), so a hot adapter spreads instead of piling
onto one replica; with no holder it falls back to least load, then most free memory.
`RoundRobinRouter` and `LRUMultiplexRouter` (Ray's default multiplexing: per-replica LRU of model
ids, power of two choices on queue length) are the baselines the benchmark compares against.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import attrs


@attrs.frozen
class ReplicaState:
    """What one replica reports to the router (and what the simulator tracks per replica)."""

    replica_id: str
    device: frozenset[str] = frozenset()  # adapters resident on the device
    host: frozenset[str] = frozenset()  # adapters in the host tier (a cheap copy away)
    queue: int = 0  # requests waiting + running
    free_bytes: int = 0
    adapter_queue: Mapping[str, int] = attrs.field(factory=dict)  # in-flight requests per adapter

    @classmethod
    def from_stats(cls, replica_id: str, stats: Mapping[str, object]) -> ReplicaState:
        """From the plain dict a replica publishes (`chameleon.serve.ray` routing stats)."""
        get = stats.get
        return cls(
            replica_id=replica_id,
            device=frozenset(get("device", ()) or ()),  # type: ignore[call-overload]
            host=frozenset(get("host", ()) or ()),  # type: ignore[call-overload]
            queue=int(get("queue", 0) or 0),  # type: ignore[call-overload]
            free_bytes=int(get("free_bytes", 0) or 0),  # type: ignore[call-overload]
            adapter_queue=dict(get("adapter_queue", {}) or {}),  # type: ignore[call-overload]
        )

    def tier(self, adapter: str | None) -> int:
        """0: on the device (or the base model), 1: in host memory, 2: must be read from disk."""
        if adapter is None or adapter in self.device:
            return 0
        return 1 if adapter in self.host else 2


def _least_loaded(states: Sequence[ReplicaState]) -> ReplicaState:
    return min(states, key=lambda s: (s.queue, -s.free_bytes, s.replica_id))


@attrs.define
class AffinityRouter:
    """Adapter affinity that knows Chameleon's tiers, with hot-adapter spreading.

    `spread_queue`: in-flight requests for one adapter on each of its holders beyond which the
    router adds a replica for it. `max_imbalance`: a holder is skipped when its total queue is this
    many requests longer than the least-loaded replica's (affinity is worth a load, not a pile-up).
    """

    spread_queue: int = 4
    max_imbalance: int = 8

    def choose(self, adapter: str | None, states: Sequence[ReplicaState]) -> str:
        """The replica id to send a request for `adapter` (None: the base model) to."""
        if not states:
            raise ValueError("no replicas to choose from")
        lightest = _least_loaded(states)
        if adapter is None:
            return lightest.replica_id
        for tier in (0, 1):
            holders = [s for s in states if s.tier(adapter) == tier]
            if holders:
                return self._among_holders(adapter, holders, states, lightest).replica_id
        return lightest.replica_id

    def _among_holders(
        self, adapter: str, holders: list[ReplicaState], states: Sequence[ReplicaState], lightest: ReplicaState
    ) -> ReplicaState:
        best = _least_loaded(holders)
        hot = all(h.adapter_queue.get(adapter, 0) >= self.spread_queue for h in holders)
        others = [s for s in states if s.tier(adapter) > 0 and s not in holders] if hot else []
        if hot and others:
            extra = _least_loaded(others)
            if extra.queue < best.queue:
                return extra
        if best.queue - lightest.queue > self.max_imbalance:
            return lightest
        return best


@attrs.define
class RoundRobinRouter:
    """Each request to the next replica, whatever it holds."""

    _next: int = 0

    def choose(self, adapter: str | None, states: Sequence[ReplicaState]) -> str:
        ordered = sorted(states, key=lambda s: s.replica_id)
        pick = ordered[self._next % len(ordered)]
        self._next += 1
        return pick.replica_id


@attrs.define
class LRUMultiplexRouter:
    """Ray Serve's default multiplexing, modelled: per-replica LRU of model ids, power of two.

    A replica that served a model id keeps it in an LRU of `max_models` ids; a request goes to the
    shorter queue of two random replicas holding its id, else of two random replicas (which then
    load it, evicting their least recently used id). It knows nothing of Chameleon's tiers.
    """

    max_models: int = 8
    seed: int = 0
    lru: dict[str, OrderedDict[str, None]] = attrs.field(factory=dict)
    _rng: random.Random = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def choose(self, adapter: str | None, states: Sequence[ReplicaState]) -> str:
        key = adapter or ""
        holders = [s for s in states if key in self.lru.get(s.replica_id, {})]
        pool = holders or list(states)
        two = self._rng.sample(pool, min(2, len(pool)))
        pick = min(two, key=lambda s: s.queue)
        ids = self.lru.setdefault(pick.replica_id, OrderedDict())
        ids[key] = None
        ids.move_to_end(key)
        while len(ids) > self.max_models:
            ids.popitem(last=False)
        return pick.replica_id


ROUTERS = {"affinity": AffinityRouter, "round-robin": RoundRobinRouter, "lru": LRUMultiplexRouter}


def make_router(name: str) -> AffinityRouter | RoundRobinRouter | LRUMultiplexRouter:
    """A router by its `--router` name."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {sorted(ROUTERS)}")
    return ROUTERS[name]()
