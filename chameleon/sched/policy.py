"""The interface between the scheduler's mechanism and a scheduling policy.

The mechanism (`chameleon.sched.scheduler.Scheduler`) owns KV blocks, adapter residency, the token budget
and how a preemption happens (recompute, or swap the KV to host memory). A policy owns the waiting
requests and decides order: who is admitted first, who is preempted, who is the victim when KV
runs short. A policy never touches tensors, the model or the executor; it sees the engine only
through `SchedulingView`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

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


class AdmissionPolicy(Protocol):
    #: True if a request this policy preempts keeps its KV in host memory (swapped out and back
    #: in later) instead of dropping it and recomputing.
    swap_preempted: bool

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

    def candidates(self, now: float) -> Iterator[Request]:
        """Waiting requests in the order they should be tried this iteration.

        The scheduler may stop iterating at any point (it closes the generator), and it calls
        `admitted` for each request it takes before asking for the next one.
        """
        ...

    def skip_blocked(self, request: Request) -> bool:
        """`request` could not be admitted (KV or adapter memory). True: try later candidates
        anyway; False: stop admitting this iteration (FIFO's head-of-line blocking)."""
        ...

    def admitted(self, request: Request, now: float) -> None: ...

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


class PolicyBase:
    """Defaults for the parts of the protocol most policies do not care about."""

    swap_preempted = False

    def bind(self, view: SchedulingView) -> None:
        self.view = view

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
        return {}
