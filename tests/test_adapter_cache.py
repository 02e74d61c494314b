"""Chameleon's adapter cache: eviction order, protection, KV priority, prefetch, policies as named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chameleon import EngineConfig, SamplingParams
from chameleon.engine.core import EngineCore
from chameleon.engine.factory import build_core
from chameleon.memory.adapter_cache import AdapterCache
from chameleon.memory.arrival_predictor import ArrivalPredictor
from chameleon.memory.budget import MemoryBudget

ROW = 100  # bytes per rank row in the pure tests


def cache(policy: str = "chameleon", rows: int = 64, budget_rows: int = 64) -> AdapterCache:
    budget = MemoryBudget(total_bytes=budget_rows * ROW + 10, reserve_bytes=0, kv_block_bytes=10, adapter_row_bytes=ROW)
    return AdapterCache(rows, budget, policy)  # type: ignore[arg-type]


def use(c: AdapterCache, name: str, now: float, times: int = 1) -> None:
    for _ in range(times):
        assert c.acquire(name, now) is not None
        c.release(name, now)


# --- pure policy -------------------------------------------------------------------------------


def test_score_is_the_papers_weighted_sum_of_normalised_terms() -> None:
    c = cache()
    for name, rows in [("small", 8), ("big", 32), ("hot", 16)]:
        c.register(name, rows)
    use(c, "small", now=10.0)
    use(c, "big", now=20.0)
    use(c, "hot", now=30.0, times=3)
    scores = c.scores(now=30.0)
    # frequency / 3, recency over [10, 30], size / 32
    assert scores["small"] == pytest.approx(0.45 * 1 / 3 + 0.10 * 0.0 + 0.45 * 8 / 32)
    assert scores["big"] == pytest.approx(0.45 * 1 / 3 + 0.10 * 0.5 + 0.45 * 1.0)
    assert scores["hot"] == pytest.approx(0.45 * 1.0 + 0.10 * 1.0 + 0.45 * 0.5)
    # Lowest score goes first: small (0.2625), then big (0.65); hot (0.775) stays longest.
    assert c.reclaim(nbytes=c.budget.free_bytes + 8 * ROW, now=30.0) == ["small"]
    assert c.reclaim(nbytes=c.budget.free_bytes + 1 * ROW, now=30.0) == ["big"]


def test_frequency_counts_only_the_recent_window() -> None:
    c = cache()
    c.window_s = 10.0
    c.register("old", 8)
    c.register("new", 8)
    use(c, "old", now=0.0, times=5)
    use(c, "new", now=50.0)
    scores = c.scores(now=50.0)
    assert scores["old"] < scores["new"]  # its five uses fell out of the window


def test_running_and_pinned_adapters_are_never_evicted() -> None:
    c = cache(rows=32, budget_rows=32)
    for name in ("running", "pinned", "idle"):
        c.register(name, 8)
    assert c.acquire("running", 0.0) is not None
    use(c, "pinned", 1.0)
    c.pin("pinned")
    use(c, "idle", 2.0)
    assert c.reclaim(nbytes=32 * ROW, now=3.0) is None  # only 'idle' could go: not enough
    assert all(e.resident for e in c.entries.values())
    assert c.reclaim(nbytes=c.budget.free_bytes + 8 * ROW, now=3.0) == ["idle"]


def test_queued_adapters_go_last_and_prefetch_never_evicts_them() -> None:
    c = cache(rows=16, budget_rows=16)
    c.register("queued", 8)
    c.register("unqueued", 8)
    c.register("new", 8)
    use(c, "queued", 0.0)
    use(c, "unqueued", 0.0, times=5)  # a much higher score...
    c.queue("queued", +1)
    assert c.reclaim(nbytes=c.budget.free_bytes + ROW, now=1.0) == ["unqueued"]  # ...but nobody waits for it
    use(c, "unqueued", 2.0)  # back in, memory full again
    c.queue("unqueued", +1)
    assert c.prefetch("new", 3.0) is None  # both residents are protected from a prefetch
    assert c.acquire("new", 3.0) is not None  # an admission may evict when memory forces it


def test_slora_evicts_at_zero_references_and_lru_keeps_idle_adapters() -> None:
    s = cache("slora")
    s.register("a", 8)
    assert s.acquire("a", 0.0) is not None and s.release("a", 1.0) == "a"
    assert not s.entries["a"].resident  # no idle cache (it still prefetches for queued requests)
    lru = cache("lru", rows=16, budget_rows=16)
    for name in ("a", "b", "c"):
        lru.register(name, 8)
    use(lru, "a", 0.0, times=9)  # frequency does not matter to LRU
    use(lru, "b", 1.0)
    acquired = lru.acquire("c", 2.0)
    assert acquired is not None and acquired.evicted == ("a",)


def test_undo_restores_the_cache_exactly() -> None:
    c = cache()
    c.register("a", 8)
    acquired = c.acquire("a", 0.0)
    assert acquired is not None and acquired.load
    assert c.undo(acquired, 0.0) == ["a"]
    assert not c.entries["a"].resident and c.entries["a"].ref_count == 0
    assert (c.stats.misses, c.stats.loads, c.stats.evictions, c.budget.adapter_rows) == (0, 0, 0, 0)


def test_arrival_predictor() -> None:
    p = ArrivalPredictor(history_s=10.0, horizon_s=1.0, threshold=0.5)
    for t in range(10):
        p.observe("busy", float(t))
    p.observe("rare", 9.0)
    assert p.probability("busy", 10.0) == pytest.approx(1 - math.exp(-1.0))
    assert p.likely(10.0) == ("busy",)
    assert p.probability("busy", 100.0) == 0.0  # history expired


# --- in the engine -----------------------------------------------------------------------------


def small_budget(num_blocks: int, **kw: object) -> EngineConfig:
    """KV of `num_blocks` blocks; adapters only fit in what KV leaves idle."""
    return EngineConfig(dtype="float32", num_kv_blocks=num_blocks, block_size=16, activation_reserve_bytes=1, **kw)  # type: ignore[arg-type]


def register(core: EngineCore, adapters: dict[str, Path], names: tuple[str, ...] = ("a8", "b16", "d8")) -> None:
    for name in names:
        core.add_adapter(name, str(adapters[name]))


def drain(core: EngineCore) -> dict[str, list]:
    outs: dict[str, list] = {}
    while core.has_unfinished_requests():
        for o in core.step():
            outs.setdefault(o.request_id, []).append(o)
        check_invariants(core)
    return outs


def check_invariants(core: EngineCore) -> None:
    m = core.memory
    assert m.kv_bytes + m.adapter_bytes + m.reserve_bytes <= m.total_bytes
    # Blocks in use, each once: with prefix caching (on by default) requests share full blocks.
    assert m.kv_blocks == len({b for r in core.requests.values() for b in r.block_table})
    assert m.adapter_rows == sum(e.rows for e in core.adapter_cache.resident())
    for e in core.adapter_cache.entries.values():
        running = sum(1 for r in core.scheduler.running if r.adapter == e.name)
        assert e.ref_count == running and e.ref_count >= 0
        assert not (running and not e.resident)


def test_kv_pressure_evicts_idle_adapters_never_running_ones_and_they_regrow(
    tiny_llama: Path, tiny_adapters: dict[str, Path]
) -> None:
    core = build_core(tiny_llama, small_budget(64))
    register(core, tiny_adapters)
    for name in ("a8", "b16", "d8"):
        core.add_request(f"warm-{name}", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True), adapter=name)
    drain(core)
    assert len(core.adapter_cache.resident()) == 3  # idle memory keeps them (32 rows = 32 blocks)
    core.add_request("runner", [1, 2, 3], SamplingParams(max_tokens=60, ignore_eos=True), adapter="a8")
    core.step()
    for i in range(3):  # a burst of long prompts needs ~48 blocks of KV
        core.add_request(f"long-{i}", list(range(5, 5 + 250)), SamplingParams(max_tokens=4, ignore_eos=True))
    seen_evictions = False
    while core.has_unfinished_requests():
        core.step()
        check_invariants(core)
        assert core.adapter_cache.entries["a8"].resident  # running: never evicted
        seen_evictions |= not core.adapter_cache.entries["b16"].resident
    assert seen_evictions, "the burst should have pushed idle adapters out"
    core.add_request("back", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True), adapter="b16")
    drain(core)
    assert core.adapter_cache.entries["b16"].resident  # regrowth once KV let go
    assert core.stats().adapters.ref_count == 0 and core.stats().kv.blocks_in_use == 0


@pytest.mark.parametrize("depth", [8, 0])
def test_prefetch_turns_a_miss_into_a_hit(tiny_llama: Path, tiny_adapters: dict[str, Path], depth: int) -> None:
    core = build_core(tiny_llama, EngineConfig(dtype="float32", max_num_seqs=1, adapter_prefetch_depth=depth))
    register(core, tiny_adapters, ("a8", "b16"))
    core.add_request("first", [1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True), adapter="a8")
    core.add_request("second", [1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True), adapter="b16")
    drain(core)
    stats = core.stats()
    if depth:
        assert (stats.adapters.hits, stats.adapters.misses, stats.adapters.prefetches) == (1, 1, 1)
    else:
        assert (stats.adapters.hits, stats.adapters.misses, stats.adapters.prefetches) == (0, 2, 0)


def test_prefetched_outputs_equal_unprefetched(tiny_llama: Path, tiny_adapters: dict[str, Path]) -> None:
    results = []
    for depth in (0, 8):
        core = build_core(tiny_llama, EngineConfig(dtype="float32", max_num_seqs=2, adapter_prefetch_depth=depth))
        register(core, tiny_adapters)
        for i, name in enumerate(["a8", "b16", "d8", None, "b16", "a8"]):
            core.add_request(str(i), [1 + i, 2, 3], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), adapter=name)
        results.append({k: [t for o in v for t in o.token_ids] for k, v in drain(core).items()})
    assert results[0] == results[1]


def test_host_tier_reloads_from_disk(tiny_llama: Path, tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    reference = build_core(tiny_llama, EngineConfig(dtype="float32"))
    tight = build_core(tiny_llama, EngineConfig(dtype="float32", max_cpu_adapters=1, max_loras=1, max_lora_rank=16))
    for core in (reference, tight):
        register(core, tiny_adapters)
    work = [("a8", 1), ("b16", 2), ("d8", 3), ("a8", 4)]
    outs = []
    for core in (reference, tight):
        tokens = {}
        for name, i in work:
            core.add_request(f"{name}{i}", [i, 2, 3], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), adapter=name)
            tokens.update({k: [t for o in v for t in o.token_ids] for k, v in drain(core).items()})  # one at a time
        outs.append(tokens)
    assert outs[0] == outs[1]
    assert tight.executor.host_reloads >= 2 and len(tight.executor.host_adapters) == 1


def test_adapter_changed_on_disk_fails_its_request_not_the_engine(
    tiny_llama: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    path = tmp_path / "a8"
    shutil.copytree(tiny_adapters["a8"], path)
    core = build_core(tiny_llama, EngineConfig(dtype="float32", max_cpu_adapters=1))
    core.add_adapter("a8", str(path))
    core.add_adapter("b16", str(tiny_adapters["b16"]))  # pushes a8 out of host memory
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 99}))
    core.add_request("x", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), adapter="a8")
    out = drain(core)["x"][-1]
    assert out.finish_reason == "abort" and "changed" in (out.error or "")
    core.add_request("y", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), adapter="b16")
    assert drain(core)["y"][-1].finish_reason == "length"
    assert core.stats().adapters.ref_count == 0


# --- property: the budget invariant under random traffic ----------------------------------------

op = st.one_of(
    st.tuples(st.just("add"), st.sampled_from([None, "a8", "b16", "d8"]), st.integers(1, 120), st.integers(1, 12)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
    st.tuples(st.just("step"), st.integers(1, 4)),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=5, max_size=40), policy=st.sampled_from(["chameleon", "lru", "slora"]))
def test_budget_invariant_and_references_return_to_zero(
    tiny_llama: Path, tiny_adapters: dict[str, Path], ops: list, policy: str
) -> None:
    core = build_core(tiny_llama, small_budget(48, adapter_cache=policy, max_num_seqs=6))
    register(core, tiny_adapters)
    ids: list[str] = []
    for o in ops:
        if o[0] == "add":
            rid = str(len(ids))
            ids.append(rid)
            core.add_request(rid, list(range(1, 1 + o[2])), SamplingParams(max_tokens=o[3], ignore_eos=True), adapter=o[1])
        elif o[0] == "abort" and ids:
            core.abort(ids[o[1] % len(ids)])
        else:
            for _ in range(o[1]):
                core.step()
        check_invariants(core)
    drain(core)
    stats = core.stats()
    assert stats.adapters.ref_count == 0 and stats.kv.blocks_in_use == 0 and stats.requests.waiting == 0
    assert all(e.queued == 0 for e in core.adapter_cache.entries.values())


def test_can_acquire_has_no_side_effects() -> None:
    c = cache(rows=16, budget_rows=16)
    for name in ("a", "b", "c"):
        c.register(name, 8)
    use(c, "a", 0.0)
    assert c.acquire("b", 1.0) is not None  # running
    assert c.can_acquire("c", 2.0)  # by evicting idle "a"
    assert c.entries["a"].resident and c.stats.evictions == 0
    c.acquire("a", 3.0)
    assert not c.can_acquire("c", 4.0)  # both running now


def test_the_adapter_pool_never_exceeds_the_memory_budget(tiny_llama: Path) -> None:
    """max_loras=500 once allocated a pool many times the budget; the pool is capped by the budget."""
    budget = 40 << 20  # 30 MiB of it is the activation reserve of the default batch limits
    core = build_core(tiny_llama, EngineConfig(dtype="float32", device_memory_bytes=budget, max_loras=500))
    pool = core.executor.lora_pool  # type: ignore[attr-defined]
    assert pool.capacity_rows < 500 * 64
    assert pool.capacity_rows * pool.bytes_per_row <= budget
