"""Iteration-level scheduling: which requests run this step and how many tokens each computes.

The mechanism lives here (token budget, KV blocks, adapter residency, preemption by recompute);
the order in which waiting requests are tried is the admission policy's (`chameleon.policies`).
Memory is one budget (`chameleon.memory`): when KV needs room, idle adapters are evicted before
any request is preempted, because KV always wins.
"""

from __future__ import annotations

import attrs

from chameleon.adapter_cache import Acquired, AdapterCache
from chameleon.block_manager import KVBlockManager
from chameleon.policies import AdmissionPolicy
from chameleon.request import Request, RequestStatus


@attrs.frozen
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step: a prefill chunk, or 1 when decoding

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@attrs.frozen
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[Request, ...] = ()
    adapter_evictions: tuple[str, ...] = ()  # left the device since the previous batch
    adapter_loads: tuple[Acquired, ...] = ()  # must be usable before this batch runs
    adapter_prefetches: tuple[Acquired, ...] = ()  # start copying now; needed by a later batch

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(
        self,
        policy: AdmissionPolicy,
        blocks: KVBlockManager,
        adapters: AdapterCache,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefetch_depth: int = 8,
    ) -> None:
        self.policy = policy
        self.blocks = blocks
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefetch_depth = prefetch_depth  # waiting requests whose adapters we load ahead
        self.running: list[Request] = []  # in admission order; the newest is preempted first
        self._loads: list[Acquired] = []
        self._evictions: list[str] = []

    @property
    def num_waiting(self) -> int:
        return len(self.policy)

    def add(self, request: Request, now: float) -> None:
        self._queued(request, +1)
        self.policy.add(request, now)

    def schedule(self, now: float, speculative: tuple[str, ...] = ()) -> SchedulerOutput:
        """`speculative`: adapters an arrival predictor expects soon; loaded into free memory only."""
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        # 1. Running requests keep going (decode, or the next chunk of a long prefill).
        for request in list(self.running):
            if request not in self.running:  # preempted a moment ago to make room
                continue
            num_new = min(request.num_tokens_to_compute, budget)
            if num_new == 0:
                continue
            if not self._reserve(request, num_new, preempted, now):
                continue
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

        # 2. Admit waiting requests, unless memory was so short that we just preempted.
        if not preempted:
            for request in self.policy.candidates(now):
                if budget == 0 or len(self.running) >= self.max_num_seqs:
                    break
                num_new = min(request.num_tokens_to_compute, budget)
                if not self._try_admit(request, num_new, now):
                    break
                scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new

        prefetches = self._prefetch(now, speculative)
        out = SchedulerOutput(
            tuple(scheduled), tuple(preempted), tuple(self._evictions), tuple(self._loads), prefetches
        )
        self._loads.clear()
        self._evictions.clear()
        return out

    # --- memory ----------------------------------------------------------------------------------

    def _allocate_kv(self, request: Request, num_tokens: int, now: float) -> bool:
        """KV blocks for `request`, evicting idle adapters from the budget if that is what it takes."""
        if self.blocks.allocate(request, num_tokens):
            return True
        needed = self.blocks.blocks_needed(request, num_tokens)
        if needed > self.blocks.num_free:
            return False  # the KV tensor itself is full: only preemption helps
        evicted = self.adapters.reclaim(needed * self.blocks.budget.kv_block_bytes, now) if self.blocks.budget else None
        if evicted is None:
            return False
        self._evictions.extend(evicted)
        return self.blocks.allocate(request, num_tokens)

    def _reserve(self, request: Request, num_new: int, preempted: list[Request], now: float) -> bool:
        """Find KV for a running request, preempting the newest others if we must."""
        target = request.num_computed_tokens + num_new
        while not self._allocate_kv(request, target, now):
            victim = self.running[-1]
            self._preempt(victim, now)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _try_admit(self, request: Request, num_new: int, now: float) -> bool:
        acquired = None
        if request.adapter is not None:
            # Take the adapter first: holding a reference keeps KV's reclaim from evicting it.
            acquired = self.adapters.acquire(request.adapter, now)
            if acquired is None:
                return False  # its adapter cannot fit next to the running ones yet
        if not self._allocate_kv(request, request.num_computed_tokens + num_new, now):
            if acquired is not None:
                self._evictions.extend(acquired.evicted)
                self._evictions.extend(self.adapters.undo(acquired, now))
            return False
        if acquired is not None:
            self._evictions.extend(acquired.evicted)
            if acquired.load or acquired.prefetched:
                self._loads.append(acquired)
        self._queued(request, -1)
        self.policy.admitted(request, now)
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = now
        self.running.append(request)
        return True

    def _prefetch(self, now: float, speculative: tuple[str, ...]) -> tuple[Acquired, ...]:
        """Load the adapters of the next waiting requests (and predicted arrivals) ahead of time."""
        wanted: list[tuple[str, bool]] = []  # (adapter, may evict idle adapters nobody queues for)
        for i, request in enumerate(self.policy.candidates(now)):
            if i >= self.prefetch_depth:
                break
            if request.adapter is not None:
                wanted.append((request.adapter, True))
        wanted.extend((name, False) for name in speculative)
        out = []
        for name, may_evict in dict(wanted).items():
            acquired = self.adapters.prefetch(name, now, evict=may_evict)
            if acquired is not None:
                self._evictions.extend(acquired.evicted)
                out.append(acquired)
        return tuple(out)

    def _queued(self, request: Request, delta: int) -> None:
        if request.adapter is not None:
            self.adapters.queue(request.adapter, delta)

    # --- leaving ---------------------------------------------------------------------------------

    def _preempt(self, request: Request, now: float) -> None:
        # Recompute-style preemption: drop the KV, keep the tokens, go back to the front of the line.
        self._leave_running(request, now)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self._queued(request, +1)
        self.policy.requeue(request, now)

    def finish(self, request: Request, now: float) -> None:
        """Release everything a request holds, wherever it is (running or waiting)."""
        if request in self.running:
            self._leave_running(request, now)
        else:
            if request.status is RequestStatus.WAITING:
                self.policy.remove(request)
                self._queued(request, -1)
            self.blocks.free(request)
        request.status = RequestStatus.FINISHED

    def _leave_running(self, request: Request, now: float) -> None:
        self.running.remove(request)
        self.blocks.free(request)
        self.policy.finished(request, now)
        if request.adapter is not None:
            evicted = self.adapters.release(request.adapter, now)
            if evicted is not None:
                self._evictions.append(evicted)
