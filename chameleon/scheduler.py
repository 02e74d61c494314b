"""Iteration-level scheduling: which requests run this step and how many tokens each computes.

The mechanism lives here (token budget, KV blocks, preemption by recompute); the order in which
waiting requests are tried is the admission policy's business (`chameleon.policies`).
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
    adapter_loads: tuple[Acquired, ...] = ()  # to copy into the device pool before this batch runs
    adapter_evictions: tuple[str, ...] = ()  # left the device pool since the previous batch

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
    ) -> None:
        self.policy = policy
        self.blocks = blocks
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.running: list[Request] = []  # in admission order; the newest is preempted first
        self._loads: list[Acquired] = []
        self._evictions: list[str] = []

    @property
    def num_waiting(self) -> int:
        return len(self.policy)

    def add(self, request: Request, now: float) -> None:
        self.policy.add(request, now)

    def schedule(self, now: float) -> SchedulerOutput:
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
                if request.adapter is not None and not self.adapters.can_acquire(request.adapter):
                    break  # its adapter cannot fit next to the running ones yet
                if not self.blocks.allocate(request, request.num_computed_tokens + num_new):
                    break
                self._admit(request, now)
                scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
        loads, evictions = tuple(self._loads), tuple(self._evictions)
        self._loads.clear()
        self._evictions.clear()
        return SchedulerOutput(tuple(scheduled), tuple(preempted), loads, evictions)

    def _reserve(self, request: Request, num_new: int, preempted: list[Request], now: float) -> bool:
        """Find KV blocks for a running request, preempting the newest others if we must."""
        target = request.num_computed_tokens + num_new
        while not self.blocks.allocate(request, target):
            victim = self.running[-1]
            self._preempt(victim, now)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _admit(self, request: Request, now: float) -> None:
        if request.adapter is not None:
            acquired = self.adapters.acquire(request.adapter, now)
            assert acquired is not None, "can_acquire promised room"
            self._evictions.extend(acquired.evicted)
            if acquired.load:
                self._loads.append(acquired)
        self.policy.admitted(request, now)
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = now
        self.running.append(request)

    def _preempt(self, request: Request, now: float) -> None:
        # Recompute-style preemption: drop the KV, keep the tokens, go back to the front of the line.
        self._leave_running(request, now)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.policy.requeue(request, now)

    def finish(self, request: Request, now: float) -> None:
        """Release everything a request holds, wherever it is (running or waiting)."""
        if request in self.running:
            self._leave_running(request, now)
        else:
            if request.status is RequestStatus.WAITING:
                self.policy.remove(request)
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
