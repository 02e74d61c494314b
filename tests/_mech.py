"""A bare scheduling mechanism (KV blocks, adapter cache, one budget) with a fake iteration, for
fast, deterministic policy tests without a model or an executor."""

from __future__ import annotations

from chameleon.memory.adapter_cache import AdapterCache
from chameleon.memory.budget import MemoryBudget
from chameleon.memory.kv_blocks import KVBlockManager
from chameleon.sampling_params import SamplingParams
from chameleon.sched.policy import AdmissionPolicy
from chameleon.sched.request import Request
from chameleon.sched.scheduler import Scheduler, SchedulerOutput

BLOCK = 4  # tokens per block; one token = one byte, one adapter row = 1 token's bytes


def mechanism(
    policy: AdmissionPolicy,
    *,
    kv_tokens: int = 256,
    cache: str = "slora",
    adapters: dict[str, int] | None = None,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 64,
) -> Scheduler:
    blocks = kv_tokens // BLOCK
    budget = MemoryBudget(total_bytes=blocks * BLOCK, reserve_bytes=0, kv_block_bytes=BLOCK, adapter_row_bytes=1)
    c = AdapterCache(kv_tokens, budget, cache)  # type: ignore[arg-type]
    for name, rank in (adapters or {}).items():
        c.register(name, rank)
    return Scheduler(
        policy, KVBlockManager(blocks, BLOCK, budget), c,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=kv_tokens,
    )  # fmt: skip


def request(rid: str, prompt: int, output: int, adapter: str | None = None, t: float = 0.0) -> Request:
    return Request(rid, [1] * prompt, SamplingParams(max_tokens=output, ignore_eos=True), t, adapter)


def step(s: Scheduler, now: float, dt: float = 0.01) -> SchedulerOutput:
    """One iteration: schedule, 'run' it, finish what reached its max_tokens."""
    out = s.schedule(now)
    for item in out.scheduled:
        r = item.request
        samples = item.samples
        r.num_computed_tokens += item.num_new_tokens
        if samples:
            r.output_token_ids.append(0)
            if len(r.output_token_ids) >= r.sampling.max_tokens:
                s.finish(r, now + dt, completed=True)
    s.iteration_done(out.scheduled, dt, now + dt)
    return out
