"""First come, first served: S-LoRA's admission, head-of-line blocking included (the baseline)."""

from __future__ import annotations

from collections import deque
from itertools import islice

from chameleon.sched.policy import IndexWalk, PolicyBase, Walk
from chameleon.sched.request import Request


class FifoPolicy(PolicyBase):
    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[Request] = deque()

    def add(self, request: Request, now: float) -> None:
        self._queue.append(request)

    def requeue(self, request: Request, now: float) -> None:
        self._queue.appendleft(request)

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def walk(self, now: float) -> Walk:
        return IndexWalk(self, self._queue)

    def lookahead(self, now: float, limit: int) -> list[Request]:
        return list(islice(self._queue, limit))

    def admitted(self, request: Request, now: float) -> None:
        self._queue.remove(request)
        self.counters.admitted(now - request.arrival_time)

    def __len__(self) -> int:
        return len(self._queue)
