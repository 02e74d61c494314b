"""The interface between the scheduler's mechanism and an admission policy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from chameleon.request import Request


class AdmissionPolicy(Protocol):
    """Owns the waiting requests and decides the order in which the scheduler tries to admit them.

    The scheduler walks `candidates()` and admits while memory and the token budget last; it calls
    `admitted` for each request it takes and `finished` when a running request leaves. A policy
    never touches KV blocks, tensors or the executor.
    """

    def add(self, request: Request, now: float) -> None:
        """A new request arrived."""
        ...

    def requeue(self, request: Request, now: float) -> None:
        """A running request was preempted; it should go first among its peers."""
        ...

    def remove(self, request: Request) -> None:
        """An aborted request leaves the waiting set."""
        ...

    def candidates(self, now: float) -> Iterator[Request]:
        """Waiting requests in the order the policy wants them admitted this iteration.

        The scheduler stops iterating as soon as it cannot admit the one it was given (FIFO's
        head-of-line blocking comes from exactly that), so policies that want to let others pass
        must order them accordingly.
        """
        ...

    def admitted(self, request: Request, now: float) -> None: ...

    def finished(self, request: Request, now: float) -> None: ...

    def __len__(self) -> int: ...
