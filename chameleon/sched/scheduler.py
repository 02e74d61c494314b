"""Iteration-level scheduling: which requests run this step and how many tokens each computes.

The mechanism lives here: the token budget, KV blocks, adapter residency, and how a preemption
happens (drop the KV and recompute later, or swap it to host memory and back). The *order* of
things is the policy's (`chameleon.sched`): who is admitted first, who is preempted, who is
the victim when KV runs short. Memory is one budget (`chameleon.memory.budget`): when KV needs room,
idle adapters are evicted before any request is preempted, because KV always wins.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from chameleon.memory.adapter_cache import Acquired, AdapterCache
from chameleon.memory.kv_blocks import KVBlockManager
from chameleon.sched.policy import AdmissionPolicy, Walk
from chameleon.sched.request import Request, RequestStatus


@attrs.frozen
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step: a prefill chunk, or 1 when decoding

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@attrs.frozen
class KVSwap:
    """Copy `request_id`'s first blocks between the device blocks `block_ids` and host memory."""

    request_id: str
    block_ids: tuple[int, ...]


@attrs.frozen
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[Request, ...] = ()
    swap_out: tuple[KVSwap, ...] = ()  # before anything else: their blocks may be reused below
    swap_in: tuple[KVSwap, ...] = ()
    swap_drop: tuple[str, ...] = ()  # host copies nobody will need (aborted while swapped)
    adapter_evictions: tuple[str, ...] = ()  # left the device since the previous batch
    adapter_loads: tuple[Acquired, ...] = ()  # must be usable before this batch runs
    adapter_prefetches: tuple[Acquired, ...] = ()  # start copying now; needed by a later batch

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


@attrs.define
class MechanismStats:
    preemptions: int = 0
    policy_preemptions: int = 0  # asked for by the policy (quantum, squash), not forced by memory
    swapped_out_bytes: int = 0
    swapped_in_bytes: int = 0


class Scheduler:
    def __init__(
        self,
        policy: AdmissionPolicy,
        blocks: KVBlockManager,
        adapters: AdapterCache,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        prefetch_depth: int = 8,
    ) -> None:
        self.policy = policy
        self.blocks = blocks
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self._max_num_batched_tokens = max_num_batched_tokens
        self._max_model_len = max_model_len
        self.prefetch_depth = prefetch_depth  # waiting requests whose adapters we load ahead
        self._running: list[Request] = []  # in admission order
        self.stats = MechanismStats()
        self._pending = _Pending()
        policy.bind(self)

    # --- SchedulingView (what policies may see) -----------------------------------------------

    @property
    def running(self) -> Sequence[Request]:
        return self._running

    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def max_num_batched_tokens(self) -> int:
        return self._max_num_batched_tokens

    def adapter_rank(self, name: str) -> int:
        return self.adapters.entry(name).rows

    def max_adapter_rank(self) -> int:
        return max((e.rows for e in self.adapters.entries.values()), default=0)

    def adapter_available(self, name: str, now: float) -> bool:
        return self.adapters.can_acquire(name, now)

    def adapter_token_cost(self, name: str | None) -> int:
        if name is None or self.blocks.budget is None:
            return 0
        per_token = self.blocks.budget.kv_block_bytes / self.blocks.block_size
        return int(self.adapter_rank(name) * self.blocks.budget.adapter_row_bytes / per_token)

    @property
    def num_waiting(self) -> int:
        return len(self.policy)

    # --- the iteration ------------------------------------------------------------------------

    def add(self, request: Request, now: float) -> None:
        self._queued(request, +1)
        self.policy.add(request, now)

    def iteration_done(self, scheduled: Sequence[ScheduledRequest], duration_s: float, now: float) -> None:
        self.policy.on_iteration([s.request for s in scheduled], duration_s, now)

    def schedule(self, now: float, speculative: tuple[str, ...] = ()) -> SchedulerOutput:
        """`speculative`: adapters an arrival predictor expects soon; loaded into free memory only."""
        budget = self._max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        # 0. The policy's own preemptions (a used-up quantum, a squashed bypasser).
        for request in self.policy.preemptions(now):
            if request.status is RequestStatus.RUNNING:
                self._preempt(request, now)
                preempted.append(request)
                self.stats.policy_preemptions += 1
        forced = False

        # 1. Running requests keep going (decode, or the next chunk of a long prefill).
        for request in list(self._running):
            if request.status is not RequestStatus.RUNNING:  # preempted a moment ago to make room
                continue
            num_new = min(request.num_tokens_to_compute, budget)
            if num_new == 0:
                continue
            ok, victims = self._reserve(request, num_new, now, scheduled)
            preempted += victims
            forced |= bool(victims)
            if ok:
                scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new

        # 2. Admit waiting requests, unless memory was so short that we just had to preempt.
        # Whole-prompt policies (S-LoRA) give the new prompts a token budget of their own.
        if not forced:
            whole = self.policy.whole_prompts
            own = getattr(self.policy, "prefill_token_budget", self._max_num_batched_tokens)
            spent = self._admit(now, own if whole else budget, scheduled, preempted)
            budget = budget if whole else spent

        prefetches = self._prefetch(now, speculative)
        return self._pending.flush(scheduled, preempted, prefetches)

    def _admit(self, now: float, budget: int, scheduled: list[ScheduledRequest], preempted: list[Request]) -> int:
        """Step 2: walk the policy's waiting requests, admitting while budget, seats and memory last."""
        walk = self.policy.walk(now)
        try:
            while budget > 0 and len(self._running) < self.max_num_seqs:
                request = walk.next()
                if request is None:
                    break
                if request in preempted:  # not straight back in: that would undo the preemption
                    walk.reject()
                    continue
                hit = self.blocks.attach_prefix(request)  # cached leading blocks are not computed
                num_new = min(request.num_tokens_to_compute, budget)
                if num_new < request.num_tokens_to_compute and self.policy.whole_prompts:
                    walk.reject()  # its whole prompt does not fit this iteration's budget
                    if not self.policy.skip_blocked(request):
                        break
                    continue
                if self._try_admit(request, num_new, now, walk):
                    self.blocks.admitted(request, hit)
                    scheduled.append(ScheduledRequest(request, num_new))
                    budget -= num_new
                    continue
                self.blocks.detach_prefix(request, hit)
                walk.reject()
                if not self.policy.skip_blocked(request):
                    break
        finally:
            walk.close()
        return budget

    # --- memory ----------------------------------------------------------------------------------

    def _allocate_kv(self, request: Request, num_tokens: int, now: float) -> bool:
        """KV blocks for `request`, evicting idle adapters from the budget if that is what it takes."""
        if self.blocks.allocate(request, num_tokens):
            return True
        needed = self.blocks.blocks_needed(request, num_tokens)
        if needed > self.blocks.num_free or self.blocks.budget is None:
            return False  # the KV tensor itself is full: only preemption helps
        evicted = self.adapters.reclaim(needed * self.blocks.budget.kv_block_bytes, now)
        if evicted is None:
            return False
        self._pending.evictions.extend(evicted)
        return self.blocks.allocate(request, num_tokens)

    def _reserve(
        self, request: Request, num_new: int, now: float, scheduled: list[ScheduledRequest]
    ) -> tuple[bool, list[Request]]:
        """Find KV for a running request, preempting the policy's victims if we must.

        Requests already placed in this iteration's batch are not candidates: their KV is in use."""
        target = request.num_computed_tokens + num_new
        victims: list[Request] = []
        if self._allocate_kv(request, target, now):  # the common case: no set of the batch needed
            return True, victims
        taken = {id(s.request) for s in scheduled}
        while not self._allocate_kv(request, target, now):
            victim = self.policy.victim([r for r in self._running if id(r) not in taken])
            self._preempt(victim, now)
            victims.append(victim)
            if victim is request:
                return False, victims
        return True, victims

    def _try_admit(self, request: Request, num_new: int, now: float, walk: Walk) -> bool:
        acquired = None
        if request.adapter is not None:
            # Take the adapter first: holding a reference keeps KV's reclaim from evicting it.
            acquired = self.adapters.acquire(request.adapter, now)
            if acquired is None:
                return False  # its adapter cannot fit next to the running ones yet
        if not self._allocate_kv(request, request.num_computed_tokens + num_new, now):
            if acquired is not None:
                self._pending.evictions.extend(acquired.evicted)
                self._pending.evictions.extend(self.adapters.undo(acquired, now))
            return False
        if acquired is not None:
            self._pending.evictions.extend(acquired.evicted)
            if acquired.load or acquired.prefetched:
                self._pending.loads.append(acquired)
        if request.swapped:  # its KV comes back from host memory into the blocks just allocated
            n = self.blocks.table_blocks(request, request.num_computed_tokens)
            self._pending.swap_in.append(KVSwap(request.request_id, tuple(request.block_table[:n])))
            self.stats.swapped_in_bytes += n * self._block_bytes()
            request.swapped = False
        self._queued(request, -1)
        walk.accept(now)
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = now
        self._running.append(request)
        return True

    def _prefetch(self, now: float, speculative: tuple[str, ...]) -> tuple[Acquired, ...]:
        """Load the adapters of the next waiting requests (and predicted arrivals) ahead of time."""
        wanted: dict[str, bool] = {}  # adapter -> may evict idle adapters nobody queues for
        if self.prefetch_depth:
            for request in self.policy.lookahead(now, self.prefetch_depth):  # admits nothing
                if request.adapter is not None:
                    wanted.setdefault(request.adapter, True)
        for name in speculative:
            wanted.setdefault(name, False)
        out = []
        for name, may_evict in wanted.items():
            acquired = self.adapters.prefetch(name, now, evict=may_evict)
            if acquired is not None:
                self._pending.evictions.extend(acquired.evicted)
                out.append(acquired)
        return tuple(out)

    def _queued(self, request: Request, delta: int) -> None:
        if request.adapter is not None:
            evicted = self.adapters.queue(request.adapter, delta)
            if evicted is not None:
                self._pending.evictions.append(evicted)

    def _block_bytes(self) -> int:
        return self.blocks.budget.kv_block_bytes if self.blocks.budget is not None else 0

    # --- leaving ---------------------------------------------------------------------------------

    def _preempt(self, request: Request, now: float) -> None:
        """Take a running request out. Swap policies keep its KV in host memory; the others drop
        it and recompute later (same tokens either way: sampling state is not in the KV)."""
        swap = self.policy.swap_preempted and request.num_computed_tokens > 0
        if swap:
            n = self.blocks.table_blocks(request, request.num_computed_tokens)
            self._pending.swap_out.append(KVSwap(request.request_id, tuple(request.block_table[:n])))
            self.stats.swapped_out_bytes += n * self._block_bytes()
            request.swapped = True
            request.prefix_sharing = False  # swapped KV is private: never indexed nor shared
        self._leave_running(request, now)
        if not swap:
            request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.stats.preemptions += 1
        request.status = RequestStatus.WAITING
        self._queued(request, +1)
        self.policy.requeue(request, now)

    def finish(self, request: Request, now: float, *, completed: bool = False) -> None:
        """Release everything a request holds, wherever it is (running or waiting)."""
        if request.status is RequestStatus.RUNNING:
            self._leave_running(request, now)
        else:
            if request.status is RequestStatus.WAITING:
                self.policy.remove(request)
                self._queued(request, -1)
            self.blocks.free(request)
        if request.swapped:
            self._pending.swap_drop.append(request.request_id)
            request.swapped = False
        request.status = RequestStatus.FINISHED
        if completed:
            self.policy.completed(request, now)

    def _leave_running(self, request: Request, now: float) -> None:
        self._running.remove(request)
        self.blocks.free(request)
        self.policy.left_running(request, now)
        if request.adapter is not None:
            evicted = self.adapters.release(request.adapter, now)
            if evicted is not None:
                self._pending.evictions.append(evicted)


@attrs.define
class _Pending:
    """Work for the executor accumulated since the previous `schedule()` call."""

    swap_out: list[KVSwap] = attrs.field(factory=list)
    swap_in: list[KVSwap] = attrs.field(factory=list)
    swap_drop: list[str] = attrs.field(factory=list)
    evictions: list[str] = attrs.field(factory=list)
    loads: list[Acquired] = attrs.field(factory=list)

    def flush(
        self, scheduled: list[ScheduledRequest], preempted: list[Request], prefetches: tuple[Acquired, ...]
    ) -> SchedulerOutput:
        out = SchedulerOutput(
            scheduled=tuple(scheduled),
            preempted=tuple(preempted),
            swap_out=tuple(self.swap_out),
            swap_in=tuple(self.swap_in),
            swap_drop=tuple(self.swap_drop),
            adapter_evictions=tuple(self.evictions),
            adapter_loads=tuple(self.loads),
            adapter_prefetches=prefetches,
        )
        for pending in (self.swap_out, self.swap_in, self.swap_drop, self.evictions, self.loads):
            pending.clear()
        return out
