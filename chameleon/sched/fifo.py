"""First come, first served: S-LoRA's admission, head-of-line blocking included (the baseline)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from chameleon.sched.policy import PolicyBase
from chameleon.sched.request import Request


class FifoPolicy(PolicyBase):
    def __init__(self) -> None:
        self._queue: deque[Request] = deque()
        self._admitted = 0
        self._queue_time = 0.0

    def add(self, request: Request, now: float) -> None:
        self._queue.append(request)

    def requeue(self, request: Request, now: float) -> None:
        self._queue.appendleft(request)

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def candidates(self, now: float) -> Iterator[Request]:
        # Walk by index, not over a copy: the scheduler admits (and we remove) as it goes.
        i = 0
        while i < len(self._queue):
            request = self._queue[i]
            yield request
            if i < len(self._queue) and self._queue[i] is request:  # not admitted: look further
                i += 1

    def admitted(self, request: Request, now: float) -> None:
        self._queue.remove(request)
        self._admitted += 1
        self._queue_time += now - request.arrival_time

    def metrics(self) -> dict[str, Any]:
        return {"admissions": self._admitted, "queue_time_s": self._queue_time, "waiting": len(self._queue)}

    def __len__(self) -> int:
        return len(self._queue)
