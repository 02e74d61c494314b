"""Prefix caching: token-identical outputs, hits under the same adapter content, never across
adapters (nor a re-used name with new weights), and no leaked blocks (docs/kv_cache.md)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from chameleon import EngineConfig, SamplingParams
from chameleon.engine.core import EngineCore
from chameleon.engine.factory import build_core
from chameleon.memory.budget import MemoryBudget
from chameleon.memory.kv_blocks import KVBlockManager
from chameleon.sampling_params import SamplingParams as SP
from chameleon.sched.request import Request
from tests.conftest import save_peft_adapters

Work = list[tuple[list[int], int, str | None]]


def shared_prefix_workload(vocab: int, names: list[str | None], n: int = 16, seed: int = 0) -> Work:
    """Chat-style: a few long system prompts, each followed by a short random user turn."""
    rng = random.Random(seed)
    systems = [[rng.randrange(vocab) for _ in range(rng.randint(9, 30))] for _ in range(3)]
    return [
        (systems[i % 3] + [rng.randrange(vocab) for _ in range(rng.randint(0, 12))], rng.randint(1, 10),
         names[i % len(names)])
        for i in range(n)
    ]


def run(core: EngineCore, work: Work, stagger: int = 2) -> list[list[int]]:
    got: dict[str, list[int]] = {str(i): [] for i in range(len(work))}
    pending, steps = list(range(len(work))), 0
    while pending or core.has_unfinished_requests():
        if pending and (steps % stagger == 0 or not core.has_unfinished_requests()):
            i = pending.pop(0)
            prompt, n, name = work[i]
            core.add_request(str(i), prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter=name)
        for out in core.step():
            got[out.request_id].extend(out.token_ids)
        steps += 1
    return [got[str(i)] for i in range(len(work))]


def engine(path: Path, adapters: dict[str, Path] | None = None, **kw: Any) -> EngineCore:
    core = build_core(path, EngineConfig(dtype="float32", **kw))
    for name, p in (adapters or {}).items():
        core.add_adapter(name, str(p))
    return core


def assert_idle(core: EngineCore) -> None:
    s = core.stats()
    assert s.kv.blocks_in_use == 0
    assert core.memory.kv_blocks == 0
    assert core.blocks.num_free == core.blocks.num_blocks


# Preempting configs: 30 KV blocks, and a budget with room for adapters next to them (a budget of
# exactly the KV blocks leaves no idle bytes for a rank-16 adapter: it is refused, AdapterMemoryError).
CONFIGS = [
    {"block_size": 4},
    {"block_size": 4, "max_num_batched_tokens": 16},  # chunked prefill
    {"block_size": 4, "num_kv_blocks": 30, "max_model_len": 100, "scheduler": "fifo", "device_memory_bytes": 64 << 20},
    {"block_size": 4, "num_kv_blocks": 30, "max_model_len": 100, "scheduler": "mlfq", "device_memory_bytes": 64 << 20},
]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kw", CONFIGS, ids=["plain", "chunked", "preempt-fifo", "swap-mlfq"])
def test_identical_with_and_without_prefix_caching(arch: str, kw: dict[str, Any], request: Any) -> None:
    path = request.getfixturevalue(f"tiny_{arch}")
    adapters = request.getfixturevalue("tiny_adapters") if arch == "llama" else {}
    names: list[str | None] = [None, *adapters] if adapters else [None]
    off = engine(path, adapters, enable_prefix_caching=False, **kw)
    work = shared_prefix_workload(off.limits.vocab_size, names)
    expected = run(off, work)
    on = engine(path, adapters, enable_prefix_caching=True, **kw)
    assert run(on, work) == expected
    s = on.stats()
    assert s.prefix.enabled and s.prefix.hit_rate is not None
    if kw.get("scheduler") != "mlfq":  # swapped requests never share, and 30 blocks thrash the cache
        assert s.prefix.hit_tokens > 0
    assert_idle(on)
    if "num_kv_blocks" in kw:
        assert s.requests.preemptions > 0, "the scenario was meant to preempt"


def test_repeated_prompt_hits_same_adapter_only(tiny_llama: Path, tiny_adapters: dict[str, Path]) -> None:
    two = {"a8": tiny_adapters["a8"], "b16": tiny_adapters["b16"]}
    core = engine(tiny_llama, two, enable_prefix_caching=True, block_size=4)
    prompt = list(range(100, 141))  # 41 tokens: 10 full blocks can hit, the last token is computed
    first = run(core, [(prompt, 5, "a8")])
    assert core.stats().prefix.hit_tokens == 0
    assert run(core, [(prompt, 5, "a8")]) == first
    assert core.stats().prefix.hit_tokens == 40
    assert core.stats().prefix.cached_blocks > 0
    other = run(core, [(prompt, 5, "b16")])
    assert core.stats().prefix.hit_tokens == 40, "another adapter must not hit"
    base = run(core, [(prompt, 5, None)])
    assert core.stats().prefix.hit_tokens == 40, "the base model must not hit an adapter's blocks"
    fresh = engine(tiny_llama, {"b16": tiny_adapters["b16"]}, block_size=4)
    assert other == run(fresh, [(prompt, 5, "b16")])
    assert base == run(fresh, [(prompt, 5, None)])
    assert_idle(core)


def test_same_name_new_weights_does_not_hit(tiny_llama: Path, tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    # a8's config, other random weights (save_peft_adapters seeds by position: x is second).
    a8 = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    other = save_peft_adapters(tiny_llama, tmp_path, {"y": {"r": 2, "target_modules": ["q_proj"]}, "x": a8})
    core = engine(tiny_llama, {"a": tiny_adapters["a8"]}, enable_prefix_caching=True, block_size=4)
    prompt = list(range(200, 233))
    run(core, [(prompt, 6, "a")])
    core.remove_adapter("a")
    core.add_adapter("a", str(other["x"]))
    got = run(core, [(prompt, 6, "a")])
    assert core.stats().prefix.hit_tokens == 0
    fresh = engine(tiny_llama, {"a": other["x"]}, block_size=4)
    assert got == run(fresh, [(prompt, 6, "a")])
    # The very same weights re-registered under the name do hit: the key is the content.
    core.remove_adapter("a")
    core.add_adapter("a", str(other["x"]))
    assert run(core, [(prompt, 6, "a")]) == got
    assert core.stats().prefix.hit_tokens == 32


def _request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SP(max_tokens=4), 0.0)


def test_cached_blocks_are_idle_memory_given_up_first() -> None:
    """Cached prefix blocks count as free in the budget; adapters (or KV) growing into their bytes
    drop them, least recently used first; referenced blocks are shared, counted once."""
    budget = MemoryBudget(total_bytes=100, reserve_bytes=0, kv_block_bytes=10, adapter_row_bytes=10)
    bm = KVBlockManager(10, 4, budget, prefix_caching=True)
    a = _request("a", list(range(13)))
    assert bm.attach_prefix(a) == 0
    assert bm.allocate(a, 13)
    a.num_computed_tokens = 13
    bm.commit(a)
    assert a.num_registered_blocks == 3
    b = _request("b", list(range(12)) + [99, 98])
    assert bm.attach_prefix(b) == 12
    assert budget.kv_blocks == 4  # 4 of a, 3 of them shared with b: counted once
    assert bm.allocate(b, 14) and budget.kv_blocks == 5
    bm.free(a)
    assert budget.kv_blocks == 4 and bm.num_cached == 0  # shared blocks still held by b; a's tail was not indexed
    bm.free(b)
    assert budget.kv_blocks == 0 and bm.num_cached == 3 and budget.free_bytes == 100
    budget.add_adapter_rows(8)  # 80 bytes: only 2 cached blocks fit in the 20 idle bytes left
    assert bm.num_cached == 2 and budget.cached_kv_bytes <= budget.free_bytes
    c = _request("c", list(range(12)) + [5])
    assert bm.attach_prefix(c) == 8  # the tail block went first; the first two still hit
    bm.free(c)
    assert bm.num_free == 10
