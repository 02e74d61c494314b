"""The interface between the scheduler's mechanism and a scheduling policy.

The mechanism (`chameleon.sched.scheduler.Scheduler`) owns KV blocks, adapter residency, the token
budget and how a preemption happens (recompute, or swap the KV to host memory). A policy owns the
waiting requests and decides order: who is admitted first (an explicit `Walk`), who is preempted,
who is the victim when KV runs short. A policy never touches tensors, the model or the executor;
it sees the engine only through `SchedulingView`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any, Protocol

import attrs

from chameleon.sched.request import Request


class SchedulingView(Protocol):
    """What a policy may ask of the mechanism. Read-only."""

    @property
    def running(self) -> Sequence[Request]:
        """Running requests, oldest admission first."""
        ...

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the whole KV cache holds (the quota currency)."""
        ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def max_num_seqs(self) -> int:
        """Most requests that may run at once."""
        ...

    @property
    def max_num_batched_tokens(self) -> int:
        """The token budget of one iteration."""
        ...

    def adapter_rank(self, name: str) -> int:
        """Rows the adapter occupies on the device (its largest rank)."""
        ...

    def max_adapter_rank(self) -> int:
        """Largest rank among registered adapters (0 if none)."""
        ...

    def adapter_available(self, name: str, now: float) -> bool:
        """Resident, or loadable now by evicting idle adapters."""
        ...

    def adapter_token_cost(self, name: str | None) -> int:
        """An adapter's device memory expressed in KV tokens (0 for the base model)."""
        ...


class Walk(Protocol):
    """One admission pass: the mechanism asks for requests one at a time and says what happened.

    `next()` offers the next request to try (None: nothing more this iteration). Every offer is
    answered with `accept(now)` (it was admitted: the policy's `admitted` runs) or `reject()` (it was
    not). `close()` ends the walk, early or not, and undoes any tentative state of the last offer.
    Only one walk is open at a time.
    """

    def next(self) -> Request | None: ...

    def accept(self, now: float) -> None: ...

    def reject(self) -> None: ...

    def close(self) -> None: ...


class AdmissionPolicy(Protocol):
    #: True if a request this policy preempts keeps its KV in host memory (swapped out and back
    #: in later) instead of dropping it and recomputing.
    swap_preempted: bool
    #: True if a newly admitted request must prefill its whole prompt in its first iteration
    #: (S-LoRA); the new prompts then share one `max_num_batched_tokens` of their own.
    whole_prompts: bool

    def lookahead(self, now: float, limit: int) -> list[Request]:
        """The next `limit` waiting requests in admission order, admitting nothing (prefetch)."""
        ...

    def bind(self, view: SchedulingView) -> None:
        """Called once by the scheduler before anything else."""
        ...

    def add(self, request: Request, now: float) -> None:
        """A new request arrived."""
        ...

    def requeue(self, request: Request, now: float) -> None:
        """A running request was preempted or squashed; it waits again."""
        ...

    def remove(self, request: Request) -> None:
        """A waiting request was aborted."""
        ...

    def walk(self, now: float) -> Walk:
        """Open this iteration's admission walk over the waiting requests (see `Walk`)."""
        ...

    def skip_blocked(self, request: Request) -> bool:
        """`request` could not be admitted (KV or adapter memory). True: try later candidates
        anyway; False: stop admitting this iteration (FIFO's head-of-line blocking)."""
        ...

    def admitted(self, request: Request, now: float) -> None:
        """`request` left the waiting set to run (called through `Walk.accept`)."""
        ...

    def left_running(self, request: Request, now: float) -> None:
        """A request stopped running: it finished, was aborted, preempted or squashed."""
        ...

    def completed(self, request: Request, now: float) -> None:
        """A request finished normally (stop or length): a real output length to learn from."""
        ...

    def preemptions(self, now: float) -> list[Request]:
        """Running requests to take out before this iteration (quantum used up, squash, ...)."""
        ...

    def victim(self, running: Sequence[Request]) -> Request:
        """Whom to preempt when KV runs short (the request that will be needed latest).

        `running` holds only the running requests that may still be preempted this iteration
        (never empty: the request that needs the memory is always among them)."""
        ...

    def on_iteration(self, scheduled: Sequence[Request], duration_s: float, now: float) -> None:
        """The previous iteration ran `scheduled` for `duration_s` seconds (service accounting)."""
        ...

    def metrics(self) -> dict[str, Any]:
        """Every decision made visible: per-queue arrivals, admissions, queueing time, squashes..."""
        ...

    def __len__(self) -> int: ...


@attrs.define
class AdmissionCounters:
    """What every policy counts: admissions and the time they waited."""

    admissions: int = 0
    queue_time_s: float = 0.0

    def admitted(self, waited_s: float) -> None:
        self.admissions += 1
        self.queue_time_s += max(0.0, waited_s)


class PolicyBase:
    """Defaults for the parts of the protocol most policies do not care about, and shared counters."""

    swap_preempted = False
    whole_prompts = False

    def __init__(self) -> None:
        self.counters = AdmissionCounters()

    def bind(self, view: SchedulingView) -> None:
        self.view = view

    def peek(self, now: float, limit: int | None = None) -> list[Request]:
        """The walk's order, admitting nothing (tests, prefetch look-ahead, introspection)."""
        walk = self.walk(now)  # type: ignore[attr-defined]
        out: list[Request] = []
        try:
            while limit is None or len(out) < limit:
                request = walk.next()
                if request is None:
                    break
                out.append(request)
                walk.reject()
        finally:
            walk.close()
        return out

    def lookahead(self, now: float, limit: int) -> list[Request]:
        return self.peek(now, limit)

    def skip_blocked(self, request: Request) -> bool:
        return False

    def left_running(self, request: Request, now: float) -> None:
        pass

    def completed(self, request: Request, now: float) -> None:
        pass

    def preemptions(self, now: float) -> list[Request]:
        return []

    def victim(self, running: Sequence[Request]) -> Request:
        return running[-1]  # the newest admission has the least sunk work

    def on_iteration(self, scheduled: Sequence[Request], duration_s: float, now: float) -> None:
        pass

    def metrics(self) -> dict[str, Any]:
        return {"admissions": self.counters.admissions, "queue_time_s": self.counters.queue_time_s, "waiting": len(self)}

    def __len__(self) -> int:
        raise NotImplementedError


class _OfferWalk:
    """What every walk shares: the current offer, and `accept` telling the policy it was admitted."""

    def __init__(self, policy: AdmissionPolicy) -> None:
        self._policy = policy
        self._offered: Request | None = None

    def accept(self, now: float) -> None:
        assert self._offered is not None, "accept() without an offer"
        self._policy.admitted(self._offered, now)
        self._offered = None

    def reject(self) -> None:
        self._offered = None

    def close(self) -> None:
        self._offered = None


class IndexWalk(_OfferWalk):
    """A walk over a live, ordered list of waiting requests (FIFO, SJF).

    `items` is the policy's own list (not a copy), `resolve` maps an item to its request. An
    accepted request leaves the list (the policy's `admitted` removes it), so the index stays; a
    rejected one is stepped over.
    """

    def __init__(
        self,
        policy: AdmissionPolicy,
        items: Sequence[Any],
        resolve: Callable[[Any], Request] = lambda item: item,
    ) -> None:
        super().__init__(policy)
        self._items, self._resolve = items, resolve
        self._i = 0

    def next(self) -> Request | None:
        items = self._items
        self._offered = self._resolve(items[self._i]) if self._i < len(items) else None
        return self._offered

    def reject(self) -> None:
        super().reject()
        self._i += 1


class GeneratorWalk(_OfferWalk):
    """A walk driven by a policy's generator of offers (MLQ's two phases, MLFQ's levels).

    The generator learns the outcome of an offer from the policy's own state (`admitted` ran or
    not) when it is resumed; closing the generator runs its clean-up (`finally`)."""

    def __init__(self, policy: AdmissionPolicy, offers: Generator[Request, None, None]) -> None:
        super().__init__(policy)
        self._offers = offers

    def next(self) -> Request | None:
        self._offered = next(self._offers, None)
        return self._offered

    def close(self) -> None:
        super().close()
        self._offers.close()
