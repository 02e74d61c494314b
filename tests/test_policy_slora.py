"""S-LoRA as the paper describes it (prefetch, evict at RC 0) and as its source admits (issue 13)."""

from __future__ import annotations

from _mech import mechanism, request, step

from chameleon.memory.adapter_cache import AdapterCache
from chameleon.memory.budget import MemoryBudget
from chameleon.sched import make_policy
from chameleon.sched.fifo import FifoPolicy
from chameleon.sched.options import SchedulerOptions
from chameleon.sched.slora import SLoRAPolicy, peak_reserved_tokens


def test_peak_reservation_is_s_loras_formula() -> None:
    # (held, to come): sorted by to-come desc -> (10, 5), (20, 3): max(10 + 5, 30 + 3 * 2) = 36.
    assert peak_reserved_tokens([(20, 3), (10, 5)]) == 36
    assert peak_reserved_tokens([]) == 0


def test_slora_cache_prefetches_for_queued_requests_and_drops_at_zero() -> None:
    budget = MemoryBudget(total_bytes=64, reserve_bytes=0, kv_block_bytes=4, adapter_row_bytes=1)
    c = AdapterCache(64, budget, "slora")
    c.register("a", 8)
    c.queue("a", +1)
    assert c.prefetch("a", 0.0) is not None and c.entries["a"].resident  # async prefetch, S-LoRA style
    assert c.acquire("a", 1.0) is not None and c.stats.hits == 1
    c.queue("a", -1)
    assert c.release("a", 2.0) == "a"  # refcount 0, nobody queued: gone (no idle cache)
    c.queue("a", +1)
    c.prefetch("a", 3.0)
    assert c.queue("a", -1) == "a"  # its request left without running: the prefetch is dropped


def test_slora_keeps_an_adapter_a_queued_request_needs() -> None:
    budget = MemoryBudget(total_bytes=64, reserve_bytes=0, kv_block_bytes=4, adapter_row_bytes=1)
    c = AdapterCache(64, budget, "slora")
    c.register("a", 8)
    c.acquire("a", 0.0)
    c.queue("a", +1)
    assert c.release("a", 1.0) is None and c.entries["a"].resident


def test_fifo_with_slora_cache_prefetches_behind_the_head() -> None:
    s = mechanism(FifoPolicy(), kv_tokens=64, adapters={"a": 4, "b": 4}, max_num_seqs=1)
    s.add(request("0", 8, 4, "a"), 0.0)
    s.add(request("1", 8, 4, "b"), 0.0)
    out = step(s, 0.0)
    assert [r.request.request_id for r in out.scheduled] == ["0"]
    assert [p.name for p in out.adapter_prefetches] == ["b"]


def test_slora_exact_admits_every_ten_decode_steps() -> None:
    s = mechanism(make_policy("slora-exact"), kv_tokens=1024)
    s.add(request("0", 4, 40), 0.0)
    assert len(step(s, 0.0).scheduled) == 1  # nothing running: joins at once
    s.add(request("1", 4, 40), 0.0)
    joined = None
    for i in range(1, 15):
        out = step(s, i * 0.01)
        if any(x.request.request_id == "1" for x in out.scheduled):
            joined = i
            break
    assert joined == 10  # after 10 decode steps, not before


def test_slora_exact_prefills_whole_prompts_and_stops_at_the_first_misfit() -> None:
    opts = SchedulerOptions(slora_max_wait_tokens=0)
    s = mechanism(SLoRAPolicy(opts), kv_tokens=300, max_num_batched_tokens=16)  # new prompts: max(50, 300)
    for rid, prompt in (("0", 200), ("1", 200), ("2", 8)):
        s.add(request(rid, prompt, 4), 0.0)
    out = step(s, 0.0)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("0", 200)]  # no chunk of "1"


def test_slora_exact_reserves_prompt_plus_full_output() -> None:
    opts = SchedulerOptions(slora_max_wait_tokens=0)
    s = mechanism(SLoRAPolicy(opts), kv_tokens=128, max_num_batched_tokens=128)
    s.add(request("0", 8, 80), 0.0)  # reserves ~88 of 128
    s.add(request("1", 8, 80), 0.0)  # would need a peak of ~176: waits although its prompt fits now
    out = step(s, 0.0)
    assert [x.request.request_id for x in out.scheduled] == ["0"]
    fifo = mechanism(FifoPolicy(), kv_tokens=128, max_num_batched_tokens=128)
    fifo.add(request("0", 8, 80), 0.0)
    fifo.add(request("1", 8, 80), 0.0)
    assert len(step(fifo, 0.0).scheduled) == 2  # lazy KV: both start
