"""`chameleon.serve.routing` without Ray: affinity by tier, hot-adapter spreading, fallbacks."""

from __future__ import annotations

from chameleon.serve.ray_metrics import merge_replica_metrics, render_fleet_metrics
from chameleon.serve.routing import AffinityRouter, LRUMultiplexRouter, ReplicaState, RoundRobinRouter, make_router


def rs(
    rid: str,
    device: frozenset[str] | set[str] = frozenset(),
    host: frozenset[str] | set[str] = frozenset(),
    queue: int = 0,
    free: int = 0,
    **aq: int,
) -> ReplicaState:
    return ReplicaState(rid, frozenset(device), frozenset(host), queue, free, aq)


def test_prefers_device_then_host_then_least_load() -> None:
    r = AffinityRouter()
    states = [rs("a", queue=0), rs("b", {"x"}, queue=3), rs("c", host={"y"}, queue=2)]
    assert r.choose("x", states) == "b"  # on b's device, though a is emptier
    assert r.choose("y", states) == "c"  # in c's host tier
    assert r.choose("z", states) == "a"  # nowhere: least load
    assert r.choose(None, states) == "a"


def test_device_beats_host_and_ties_break_on_free_memory() -> None:
    r = AffinityRouter()
    assert r.choose("x", [rs("a", host={"x"}), rs("b", {"x"}, queue=1)]) == "b"
    assert r.choose("z", [rs("a", free=10), rs("b", free=20)]) == "b"


def test_hot_adapter_spreads_to_another_replica() -> None:
    r = AffinityRouter(spread_queue=4)
    cool = [rs("a", {"x"}, queue=3, x=3), rs("b", queue=1)]
    assert r.choose("x", cool) == "a"
    hot = [rs("a", {"x"}, queue=5, x=5), rs("b", queue=1)]
    assert r.choose("x", hot) == "b"
    # once both hold it, the less loaded holder wins
    assert r.choose("x", [rs("a", {"x"}, queue=5, x=5), rs("b", {"x"}, queue=2, x=2)]) == "b"


def test_affinity_gives_way_to_a_large_imbalance() -> None:
    r = AffinityRouter(max_imbalance=8)
    assert r.choose("x", [rs("a", {"x"}, queue=20, y=20), rs("b", queue=0)]) == "b"


def test_round_robin_and_lru_baselines() -> None:
    states = [rs("a"), rs("b")]
    rr = RoundRobinRouter()
    assert [rr.choose("x", states) for _ in range(4)] == ["a", "b", "a", "b"]
    lru = LRUMultiplexRouter(max_models=1)
    first = lru.choose("x", states)
    assert all(lru.choose("x", states) == first for _ in range(5))  # sticks to the holder
    lru.choose("y", [s for s in states if s.replica_id == first])  # evicts x there
    assert "x" not in lru.lru[first]
    assert isinstance(make_router("affinity"), AffinityRouter)


def test_from_stats_and_fleet_metrics() -> None:
    s = ReplicaState.from_stats(
        "r1", {"device": ["x"], "host": ["y"], "queue": 2, "free_bytes": 5, "adapter_queue": {"x": 2}}
    )
    assert s.tier("x") == 0 and s.tier("y") == 1 and s.tier("z") == 2 and s.adapter_queue == {"x": 2}
    text = '# HELP chameleon:kv_blocks_in_use KV\n# TYPE chameleon:kv_blocks_in_use gauge\nchameleon:kv_blocks_in_use{model_name="m"} 3.0\n'
    fams = merge_replica_metrics({"r1": text, "r2": text})
    assert len(fams) == 1 and {s.labels["replica"] for s in fams[0].samples} == {"r1", "r2"}
    out = render_fleet_metrics({"r1": {"metrics": text, "device": ["x"]}}, {"r1": 4}, 1).decode()
    assert 'chameleon:kv_blocks_in_use{model_name="m",replica="r1"} 3.0' in out
    assert 'chameleon:replica_requests_total{replica="r1"} 4.0' in out


def test_fleet_simulation_routes_with_the_same_code() -> None:
    from chameleon.config import EngineConfig
    from chameleon.harness.fleet import SimReplica, run_fleet
    from chameleon.harness.workload import slora_workload
    from chameleon.sim.engine import build_sim_engine

    w = slora_workload(num_adapters=32, alpha=1.0, rate=8.0, cv=1.0, duration_s=3.0, seed=0)
    results = {}
    for router in ("affinity", "round-robin", "lru"):
        reps = []
        for i in range(2):
            core, clock = build_sim_engine("A40", "llama-7b", EngineConfig(seed=0), adapters=w.adapters)
            reps.append(SimReplica(f"r{i}", core, clock))
        results[router] = run_fleet(reps, w, router)
        assert len(results[router].records) == len(w) and sum(results[router].per_replica.values()) == len(w)
    assert results["affinity"].hit_rate >= results["round-robin"].hit_rate
