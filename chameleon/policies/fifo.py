"""First come, first served: S-LoRA's admission, head-of-line blocking included (the baseline)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from chameleon.request import Request


class FifoPolicy:
    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request, now: float) -> None:
        self._queue.append(request)

    def requeue(self, request: Request, now: float) -> None:
        self._queue.appendleft(request)

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def candidates(self, now: float) -> Iterator[Request]:
        # A snapshot, because the scheduler admits (and we remove) while it walks.
        return iter(list(self._queue))

    def admitted(self, request: Request, now: float) -> None:
        self._queue.remove(request)

    def finished(self, request: Request, now: float) -> None:
        pass

    def __len__(self) -> int:
        return len(self._queue)
