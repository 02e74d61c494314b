"""Drive an engine core with a workload, open loop, and record what happened to every request.

Every rule and its reason: `docs/workloads.md` (The open-loop driver).
"""

from __future__ import annotations

import gc
import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from chameleon.clock import Clock, ManualClock
from chameleon.engine.core import EngineCore
from chameleon.errors import ChameleonError
from chameleon.harness.metrics import RequestRecord
from chameleon.harness.workload import Workload, WorkloadRequest
from chameleon.outputs import RequestOutput
from chameleon.sampling_params import SamplingParams

__all__ = ["POLICIES", "PROMPT_TOKEN_ID", "Progress", "prompt_tokens", "resolve_policy", "run_workload", "warm_up"]

# name -> (scheduler, adapter_cache), as passed to `EngineCore`. SPEC §1/§3 and the paper's ablation:
# `slora` is the baseline (FIFO, no idle cache); `chameleon-nocache` / `-nosched` take one idea away.
POLICIES: dict[str, tuple[str, str]] = {
    "chameleon": ("chameleon", "chameleon"),
    "slora": ("fifo", "slora"),
    "slora-exact": ("slora-exact", "slora"),
    "slora-sjf": ("sjf", "slora"),
    "chameleon-nocache": ("chameleon", "slora"),
    "chameleon-nosched": ("fifo", "chameleon"),
    "chameleon-lru": ("chameleon", "lru"),
    "chameleon-fairshare": ("chameleon", "fairshare"),
    "chameleon-static": ("chameleon-static", "chameleon"),
    "chameleon-k4": ("chameleon-k4", "chameleon"),
    "chameleon-paper": ("chameleon-paper", "chameleon"),
    "chameleon-noslo": ("chameleon-noslo", "chameleon"),
    "fastserve": ("mlfq", "slora"),
}

PROMPT_TOKEN_ID = 1  # the warm-up request's prompt token
_FIRST_TOKEN_ID = 2  # workload prompts draw ids from [2, vocab): clear of the usual bos/eos ids 0 and 1


def prompt_tokens(request: WorkloadRequest, vocab_size: int) -> list[int]:
    """The token ids of a workload request's prompt: the shared prefix of its `prefix_id` (the same
    ids for every request with that id), then ids of its own. Seeded by the ids, so a run is
    reproducible and no two requests share a block by accident (with prefix caching on, identical
    prompts would hit whatever the workload says)."""
    top = max(vocab_size, _FIRST_TOKEN_ID + 1)
    head = _ids(request.prefix_id, request.prefix_len, top) if request.prefix_id is not None else []
    return head + _ids(request.request_id, request.prompt_len - len(head), top)


def _ids(key: str, n: int, top: int) -> list[int]:
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    ids: list[int] = np.random.default_rng(seed).integers(_FIRST_TOKEN_ID, top, n).tolist()
    return ids


def resolve_policy(name: str, table: Mapping[str, tuple[str, str]] = POLICIES) -> tuple[str, str]:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(table)}") from None


class Progress(Protocol):
    """tqdm-like: told once per finished request."""

    def update(self, n: int = 1) -> object: ...


def _sampling(output_len: int) -> SamplingParams:
    return SamplingParams(max_tokens=max(1, output_len), ignore_eos=True, temperature=0.0)


class _Recorder:
    """Turns the core's outputs into `RequestRecord`s, with times relative to the run's start."""

    def __init__(self, t0: float, progress: Progress | None) -> None:
        self.t0 = t0
        self.progress = progress
        self.token_times: dict[str, list[float]] = {}
        self.records: dict[str, RequestRecord] = {}
        self.adapters: dict[str, str | None] = {}

    def submitted(self, request: WorkloadRequest) -> None:
        self.token_times[request.request_id] = []
        self.adapters[request.request_id] = request.adapter

    def refused(self, request: WorkloadRequest) -> None:
        self.records[request.request_id] = RequestRecord(
            request_id=request.request_id,
            adapter=request.adapter,
            arrival_s=request.arrival_s,
            first_scheduled_s=None,
            first_token_s=None,
            finish_s=None,
            prompt_len=request.prompt_len,
            output_len=0,
            finish_reason="abort",
        )
        self._tick()

    def output(self, out: RequestOutput, now: float) -> None:
        times = self.token_times[out.request_id]
        rel = now - self.t0
        times.extend(rel for _ in out.token_ids)
        if out.finished:
            self._finish(out)

    def _finish(self, out: RequestOutput) -> None:
        m, t0 = out.metrics, self.t0

        def rel(t: float | None) -> float | None:
            return None if t is None else t - t0

        self.records[out.request_id] = RequestRecord(
            request_id=out.request_id,
            adapter=self.adapters[out.request_id],
            arrival_s=m.arrival_time - t0,
            first_scheduled_s=rel(m.first_scheduled_time),
            first_token_s=rel(m.first_token_time),
            finish_s=rel(m.finish_time),
            prompt_len=m.num_prompt_tokens,
            output_len=m.num_generated_tokens,
            token_times_s=tuple(self.token_times.pop(out.request_id)),
            finish_reason=out.finish_reason or "length",
        )
        self._tick()

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress.update(1)


def run_workload(
    core: EngineCore,
    workload: Workload,
    clock: Clock,
    *,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
    stall_timeout_s: float = 60.0,
    on_step: Callable[[float], None] | None = None,
) -> list[RequestRecord]:
    """Replay `workload` against `core` open-loop; one record per request, in workload order.

    `clock` must be the clock the core was built with. `stall_timeout_s` (real clocks only): with
    nothing left to arrive and no output for this long, the remaining requests are aborted.
    `on_step(t)` runs after every step, `t` seconds into the run (e.g. to sample memory).
    """
    manual = isinstance(clock, ManualClock)
    t0 = clock.now()
    rec = _Recorder(t0, progress)
    pending = workload.requests
    i, n = 0, len(pending)
    last_progress = t0
    while i < n or core.has_unfinished_requests():
        now = clock.now()
        while i < n and t0 + pending[i].arrival_s <= now:
            _submit(core, pending[i], t0, rec)
            i += 1
            last_progress = now
        if not core.has_unfinished_requests():
            if i < n:
                _wait_until(clock, t0 + pending[i].arrival_s, manual, sleep)
            continue
        outputs = core.step()
        after = clock.now()
        if on_step is not None:
            on_step(after - t0)
        for out in outputs:
            rec.output(out, after)
        if outputs:
            last_progress = after
        if manual and after == now and not outputs:
            # Nothing could run (a simulated iteration always takes time): only an arrival can help.
            if i < n:
                _wait_until(clock, t0 + pending[i].arrival_s, manual, sleep)
                continue
            _abort_all(core, rec, after)
            break
        if not manual and i == n and after - last_progress > stall_timeout_s:
            _abort_all(core, rec, after)
            break
    return [rec.records[r.request_id] for r in pending]


def _submit(core: EngineCore, request: WorkloadRequest, t0: float, rec: _Recorder) -> None:
    try:
        core.add_request(
            request.request_id,
            prompt_tokens(request, core.limits.vocab_size),
            # the core refuses prompt + max_tokens past max_model_len; a trace's long outputs are cut
            # there, as the core used to cut them itself
            _sampling(min(request.output_len, core.limits.max_model_len - request.prompt_len)),
            adapter=request.adapter,
            arrival_time=t0 + request.arrival_s,
        )
    except ChameleonError:
        rec.refused(request)
        return
    rec.submitted(request)


# OS sleeps overshoot (timer slack, scheduling: ~0.1 ms, more on VMs), which would make requests
# late on a real clock. So a real-clock wait sleeps until this long before the deadline and spins
# the rest: an arrival is noticed within microseconds, as a server's event loop would.
_SPIN_S = 1e-3


def _wait_until(clock: Clock, t: float, manual: bool, sleep: Callable[[float], None]) -> None:
    gap = t - clock.now()
    if gap <= 0:
        return
    if manual:
        clock.advance(gap)  # type: ignore[attr-defined]
        return
    if gap > _SPIN_S:
        sleep(gap - _SPIN_S)
    while clock.now() < t:
        pass


def _abort_all(core: EngineCore, rec: _Recorder, now: float) -> None:
    for request_id in core.request_ids():
        out = core.abort(request_id)
        if out is not None:
            rec.output(out, now)


def warm_up(core: EngineCore, *, prompt_len: int = 16, max_tokens: int = 4, freeze_gc: bool = True) -> None:
    """Prepare a real engine for a timed run.

    Runs one throw-away request to completion (first-call costs of a real executor: lazy
    allocations, kernel selection), so they do not land on a measured request. Then, with
    `freeze_gc`, collects garbage and moves every object alive (torch, transformers, the model)
    into the garbage collector's permanent generation, as vLLM does after start-up: otherwise a
    full collection that scans them all (~0.1–0.2 s here) can fall inside the run and land on a
    few requests' TTFT. This is process-wide (`gc.unfreeze()` undoes it).
    """
    request_id = "__warm_up__"
    core.add_request(request_id, [PROMPT_TOKEN_ID] * prompt_len, _sampling(max_tokens))
    while core.has_request(request_id):
        core.step()
    if freeze_gc:
        gc.collect()
        gc.freeze()
