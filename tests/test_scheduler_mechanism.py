"""The scheduler's mechanism under policy-driven preemption: swapped KV comes back bit for bit."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from chameleon import EngineConfig, SamplingParams
from chameleon.engine.core import EngineCore
from chameleon.engine.factory import build_core
from chameleon.sched.fifo import FifoPolicy
from chameleon.sched.request import Request


class PreemptEveryFewSteps(FifoPolicy):
    """Takes the oldest running request out every `period` iterations (a stand-in for quanta)."""

    def __init__(self, period: int, swap: bool) -> None:
        super().__init__()
        self.period, self.swap_preempted, self.iterations = period, swap, 0

    def on_iteration(self, scheduled, duration_s, now):  # type: ignore[no-untyped-def]
        self.iterations += 1

    def preemptions(self, now: float) -> list[Request]:
        running = list(self.view.running)
        if running and self.iterations % self.period == 0 and self.iterations:
            return running[:1]
        return []


def run(core: EngineCore, work: list[tuple[list[int], int, str | None]]) -> dict[str, list[int]]:
    for i, (prompt, n, adapter) in enumerate(work):
        core.add_request(str(i), prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter=adapter)
    got: dict[str, list[int]] = {}
    while core.has_unfinished_requests():
        for out in core.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
    return got


def workload(adapters: bool) -> list[tuple[list[int], int, str | None]]:
    rng = random.Random(3)
    names = [None, "a8", "b16"] if adapters else [None]
    return [([rng.randrange(1000) for _ in range(rng.randint(1, 40))], rng.randint(2, 14), names[i % len(names)])
            for i in range(12)]


@pytest.mark.parametrize("swap", [True, False], ids=["swap", "recompute"])
def test_policy_preemption_gives_identical_tokens(
    swap: bool, tiny_llama: Path, tiny_adapters: dict[str, Path]
) -> None:
    cfg = EngineConfig(dtype="float32", scheduler="fifo", max_num_seqs=4, block_size=4)
    reference = build_core(tiny_llama, cfg)
    preempting = build_core(tiny_llama, cfg)
    preempting.scheduler.policy = PreemptEveryFewSteps(period=2, swap=swap)
    preempting.scheduler.policy.bind(preempting.scheduler)
    for core in (reference, preempting):
        for name in ("a8", "b16"):
            core.add_adapter(name, str(tiny_adapters[name]))
    work = workload(adapters=True)
    assert run(preempting, work) == run(reference, work)
    stats = preempting.stats()
    assert stats.requests.policy_preemptions > 5
    assert (stats.kv.swapped_out_bytes > 0) == swap and stats.kv.swapped_in_bytes == stats.kv.swapped_out_bytes
    assert stats.kv.blocks_in_use == 0 and stats.adapters.ref_count == 0
    assert not preempting.executor._swapped  # every host copy came back or was dropped


def test_aborting_a_swapped_request_drops_its_host_copy(tiny_llama: Path) -> None:
    core = build_core(tiny_llama, EngineConfig(dtype="float32", scheduler="fifo", max_num_seqs=1))
    core.scheduler.policy = PreemptEveryFewSteps(period=1, swap=True)
    core.scheduler.policy.bind(core.scheduler)
    core.add_request("a", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    core.add_request("b", [4, 5, 6], SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        core.step()
    swapped = [r for r in core.requests.values() if r.swapped]
    assert swapped, "one of them should be waiting in host memory"
    core.abort(swapped[0].request_id)
    core.step()
    assert swapped[0].request_id not in core.executor._swapped


def test_mlfq_preemption_with_swap_is_token_identical(tiny_llama: Path, tiny_adapters: dict[str, Path]) -> None:
    """FastServe's MLFQ with quanta small enough to preempt and swap all the time."""
    from chameleon.clock import ManualClock
    from chameleon.sched import SchedulerOptions

    clock = ManualClock()
    options = SchedulerOptions(mlfq_base_quantum_s=0.02, mlfq_promote_after_s=0.3)
    mlfq = build_core(tiny_llama, EngineConfig(dtype="float32", scheduler="mlfq", max_num_seqs=3,
                                              scheduler_options=options), clock=clock)
    real = mlfq.executor.execute

    def timed(batch):  # type: ignore[no-untyped-def]  # a deterministic 10 ms per iteration
        clock.advance(0.01)
        return real(batch)

    mlfq.executor.execute = timed  # type: ignore[method-assign]
    fifo = build_core(tiny_llama, EngineConfig(dtype="float32", scheduler="fifo"))
    for core in (mlfq, fifo):
        for name in ("a8", "b16"):
            core.add_adapter(name, str(tiny_adapters[name]))
    rng = random.Random(5)
    work = [([rng.randrange(1000) for _ in range(rng.randint(2, 30))], rng.randint(5, 40), [None, "a8", "b16"][i % 3])
            for i in range(10)]
    expected = run(fifo, work)
    got: dict[str, list[int]] = {}
    pending = list(enumerate(work))
    while pending or mlfq.has_unfinished_requests():
        if pending:  # one arrival per iteration: newcomers outrank the demoted long-runners
            i, (prompt, n, adapter) = pending.pop(0)
            mlfq.add_request(str(i), prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter=adapter)
        for out in mlfq.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
    assert got == expected
    stats = mlfq.stats()
    assert stats.requests.policy_preemptions > 0 and stats.kv.swapped_out_bytes > 0
    assert stats.kv.swapped_in_bytes == stats.kv.swapped_out_bytes and not mlfq.executor._swapped
    assert sum(level["demotions"] for level in stats.scheduler["levels"]) > 0
