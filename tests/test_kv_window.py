"""Bounded-window KV (StreamingLLM's sinks + a recent window, `EngineConfig.kv_window`).

What is pinned down: every query attends to the sink blocks and to the blocks from
`((p - recent) // block) * block` on, with its original position (an independent reference:
transformers with that 4D mask, recomputed from scratch every token); blocks outside the window
are freed, so a sequence 10x longer than its window holds a bounded number of blocks; the
windowed KV is a function of the tokens alone, so chunked prefill, batching, recompute and swap
preemption and prefix caching change no token; nothing leaks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from chameleon import EngineConfig, SamplingParams
from chameleon.config import KVWindow
from chameleon.engine.core import EngineCore
from chameleon.engine.factory import build_core
from chameleon.errors import ConfigError, RequestMemoryError
from chameleon.executor.base import StepInput
from chameleon.memory.kv_blocks import KVBlockManager, blocks_for
from chameleon.sched.request import Request
from tests.test_prefix_cache import Work, assert_idle, run

W = KVWindow(recent_tokens=8, sink_tokens=4)  # one sink block and two to three recent ones
BS = 4


def windowed(path: Path, window: KVWindow | None = W, adapters: dict[str, Path] | None = None, **kw: Any) -> EngineCore:
    core = build_core(path, EngineConfig(dtype="float32", block_size=BS, kv_window=window, **kw))
    for name, p in (adapters or {}).items():
        core.add_adapter(name, str(p))
    return core


def held_per_step(core: EngineCore) -> list[int]:
    """Blocks each sequence holds when its step runs (the peak: after allocation, before sliding).
    Checks on every step that the block manager and the budget agree with the block tables."""
    seen: list[int] = []

    def observe(step: StepInput) -> None:
        seen.extend(len(s.block_table) for s in step.sequences)
        held = {b for r in core.requests.values() for b in r.block_table}  # shared blocks count once
        assert core.blocks.num_in_use == core.memory.kv_blocks == len(held)
        for r in core.requests.values():
            assert len(r.block_table) <= core.blocks.table_blocks(r, max(r.num_tokens, 1))

    core.observe_steps(observe)
    return seen


def hf_window_greedy(path: Path, prompt: list[int], n: int, window: KVWindow, block: int) -> list[int]:
    """The reference: transformers' model, every token recomputed from scratch under the window mask."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, sink = list(prompt), blocks_for(window.sink_tokens, block) * block
    for _ in range(n):
        length = len(ids)
        p, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
        lo = torch.div(p - window.recent_tokens, block, rounding_mode="floor") * block
        seen = (j <= p) & ((j < sink) | (j >= lo))
        mask = torch.zeros(1, 1, length, length).masked_fill(~seen, float("-inf"))
        with torch.no_grad():
            logits = model(torch.tensor([ids]), attention_mask=mask, position_ids=torch.arange(length)[None]).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"recent_tokens": 0}, {"recent_tokens": -3}, {"recent_tokens": True}, {"recent_tokens": 2.5},
     {"recent_tokens": 8, "sink_tokens": -1}, {"recent_tokens": 8, "sink_tokens": None}],
)  # fmt: skip
def test_invalid_windows_are_config_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        KVWindow(**kwargs)


@pytest.mark.parametrize("value", [16, (4, 16), {"recent_tokens": 16}, "16"])
def test_kv_window_must_be_a_kv_window(value: object) -> None:
    with pytest.raises(ConfigError, match="kv_window"):
        EngineConfig(kv_window=value)  # type: ignore[arg-type]


def test_a_window_the_kv_cache_cannot_hold_is_a_config_error(tiny_llama: Path) -> None:
    # 8 recent + 64 tokens per step + the sink block: 20 blocks of 4 > 16 blocks.
    with pytest.raises(ConfigError, match="kv_window"):
        windowed(tiny_llama, num_kv_blocks=16, max_num_batched_tokens=64)


# --- what the window means -------------------------------------------------------------------------


def test_matches_the_window_mask_reference_and_holds_bounded_memory(tiny_llama: Path) -> None:
    prompt, n = list(range(10, 30)), 110  # 130 tokens: more than 10x the 12-token window
    core = windowed(tiny_llama)
    held = held_per_step(core)
    got = run(core, [(prompt, n, None)])[0]
    assert got == hf_window_greedy(tiny_llama, prompt, n, W, BS)
    bound = core.blocks.sink_blocks + blocks_for(W.recent_tokens + 1 + BS - 1, BS)  # decoding: one token a step
    assert max(held[1:]) <= bound == 4  # the prompt's own step holds the whole prompt (it is one chunk)
    assert max(held) <= core.blocks.peak_blocks(len(prompt) + n, core.config.max_num_batched_tokens)
    assert core.stats().kv.window_evicted_blocks >= blocks_for(len(prompt) + n, BS) - bound
    full = run(windowed(tiny_llama, None), [(prompt, n, None)])[0]
    assert got != full, "the window was meant to change the output (it is an approximation)"
    assert_idle(core)


def test_a_window_wider_than_the_sequence_changes_nothing(tiny_llama: Path) -> None:
    work: Work = [(list(range(5, 30)), 20, None), (list(range(50, 60)), 30, None)]
    assert run(windowed(tiny_llama, KVWindow(recent_tokens=64)), work) == run(windowed(tiny_llama, None), work)


def test_sequences_longer_than_the_kv_cache_run_in_a_window(tiny_llama: Path) -> None:
    # 12 blocks of 4 = 48 tokens of KV; each sequence is 120 tokens and holds at most 6 blocks.
    core = windowed(tiny_llama, num_kv_blocks=12, max_num_batched_tokens=8)
    assert core.limits.max_model_len == 512  # not capped by the KV cache: memory per sequence is bounded
    held = held_per_step(core)
    work: Work = [(list(range(7, 27)), 100, None), (list(range(60, 80)), 100, None)]
    got = run(core, work)
    assert max(held) <= core.blocks.peak_blocks(120, 8) == 1 + blocks_for(8 + 8 + 3, 4) == 6
    alone = [run(windowed(tiny_llama), [w])[0] for w in work]  # other chunks, a roomy cache
    assert got == alone
    with pytest.raises(RequestMemoryError):  # a whole-prompt policy cannot chunk: 15 blocks > 12
        windowed(tiny_llama, num_kv_blocks=12, max_num_batched_tokens=8, scheduler="slora-exact").add_request(
            "x", list(range(1, 51)), SamplingParams(max_tokens=10)
        )
    assert_idle(core)


# --- the windowed KV is a function of the tokens -------------------------------------------------


def long_work(names: list[str | None]) -> Work:
    """Long generations (10x the window), some sharing a prompt, staggered so batches mix."""
    prompts = [list(range(100, 120)), list(range(100, 120)), list(range(200, 212)), list(range(300, 330))]
    return [(prompts[i % 4], 40 + 10 * (i % 3), names[i % len(names)]) for i in range(6)]


_TIGHT = {"num_kv_blocks": 14, "max_num_batched_tokens": 16, "device_memory_bytes": 64 << 20}
CASES = [  # (config, prefix caching)
    ({"max_num_batched_tokens": 7}, False),  # chunked prefill: a chunk's later queries masked to their window
    ({"max_num_batched_tokens": 7}, True),
    ({**_TIGHT, "scheduler": "fifo"}, True),  # recompute preemption, re-attaching cached prefixes
    ({**_TIGHT, "scheduler": "mlfq"}, False),  # swap preemption (and MLFQ's own quantum preemptions)
    ({**_TIGHT, "scheduler": "chameleon"}, True),
]


@pytest.fixture(scope="module")
def alone(tiny_llama: Path, tiny_adapters: dict[str, Path]) -> list[list[int]]:
    """Each request of `long_work` by itself: one chunk, never preempted, no prefix cache."""
    core = windowed(tiny_llama, adapters={"a8": tiny_adapters["a8"], "d8": tiny_adapters["d8"]})
    return [run(core, [w])[0] for w in long_work([None, "a8", "d8"])]


@pytest.mark.parametrize(
    ("kw", "prefix"), CASES, ids=["chunked", "chunked-prefix", "recompute-fifo-prefix", "swap-mlfq", "chameleon-prefix"]
)
def test_batching_preemption_and_prefix_caching_change_no_token(
    tiny_llama: Path, tiny_adapters: dict[str, Path], alone: list[list[int]], kw: dict[str, Any], prefix: bool
) -> None:
    two = {"a8": tiny_adapters["a8"], "d8": tiny_adapters["d8"]}
    work, expected = long_work([None, "a8", "d8"]), alone
    core = windowed(tiny_llama, adapters=two, enable_prefix_caching=prefix, **kw)
    held = held_per_step(core)
    assert run(core, work, stagger=3) == expected
    s = core.stats()
    assert max(held) <= core.blocks.peak_blocks(1 << 30, core.config.max_num_batched_tokens)
    if "num_kv_blocks" in kw:
        assert s.requests.preemptions > 0, "the scenario was meant to preempt"
    if prefix and kw.get("scheduler") != "mlfq":  # swapped requests never share
        assert s.prefix.hit_tokens > 0
    assert s.kv.window_evicted_blocks > 0
    assert_idle(core)
    assert core.adapter_cache.total_ref_count == 0


def test_a_cached_prefix_is_attached_then_slid_and_keys_carry_the_window(tiny_llama: Path) -> None:
    from chameleon.engine.kv_stats import prefix_salt

    prompt = list(range(100, 141))
    core = windowed(tiny_llama, enable_prefix_caching=True)
    first = run(core, [(prompt, 20, None)])
    assert run(core, [(prompt, 20, None)]) == first
    assert core.stats().prefix.hit_tokens == 40  # 10 blocks attached, the middle ones slid out again
    salts = {prefix_salt(None, EngineConfig(kv_window=w)) for w in (None, W, KVWindow(recent_tokens=16))}
    assert len(salts) == 3  # windowed KV saw only its window: never shared with full attention's
    assert_idle(core)


# --- the block manager ---------------------------------------------------------------------------


def test_block_manager_slides_frees_and_keeps_the_sinks() -> None:
    bm = KVBlockManager(40, 4, window=KVWindow(recent_tokens=8, sink_tokens=5))  # sinks: 2 blocks (8 tokens)
    r = Request("r", list(range(40)), SamplingParams(), 0.0)
    assert bm.allocate(r, 40) and len(r.block_table) == 10
    first = list(r.block_table)
    r.num_computed_tokens = 40
    bm.commit(r)  # the next query sits at 40: it sees 0..7 and 32..40
    assert r.num_evicted_blocks == 6 and r.block_table == first[:2] + first[8:]
    assert bm.num_in_use == 4 and bm.window_evictions == 6
    assert bm.table_blocks(r, 41) == 5 and bm.blocks_needed(r, 41) == 1
    assert bm.window_edges == (8, 8, 4)
    r.swapped = True
    bm.free(r)  # a swapped request keeps its evicted count: its host copy is the retained blocks
    assert r.num_evicted_blocks == 6 and bm.num_in_use == 0
    r.swapped = False
    bm.free(r)
    assert r.num_evicted_blocks == 0
