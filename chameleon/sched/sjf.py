"""Shortest job first by predicted size (prompt + predicted output tokens).

Good for mean latency, and the classic way to starve long requests: under a sustained stream of
short ones a long request may wait forever. Kept as a baseline for exactly that comparison.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from typing import Any

from chameleon.sched.policy import PolicyBase
from chameleon.sched.prediction import observe, predict
from chameleon.sched.predictors import OutputLengthPredictor
from chameleon.sched.request import Request


class SjfPolicy(PolicyBase):
    def __init__(self, predictor: OutputLengthPredictor) -> None:
        self.predictor = predictor
        self._order: list[tuple[int, int]] = []  # (size, arrival sequence), kept sorted
        self._by_key: dict[tuple[int, int], Request] = {}
        self._key: dict[str, tuple[int, int]] = {}
        self._seq = itertools.count()
        self._admitted = 0
        self._queue_time = 0.0

    def add(self, request: Request, now: float) -> None:
        predict(self.predictor, request)
        self._push(request)

    def requeue(self, request: Request, now: float) -> None:
        self._push(request)

    def _push(self, request: Request) -> None:
        key = (len(request.prompt_token_ids) + (request.predicted_output_len or 0), next(self._seq))
        bisect.insort(self._order, key)
        self._by_key[key] = request
        self._key[request.request_id] = key

    def _drop(self, request: Request) -> None:
        key = self._key.pop(request.request_id)
        del self._order[bisect.bisect_left(self._order, key)]
        del self._by_key[key]

    def remove(self, request: Request) -> None:
        self._drop(request)

    def candidates(self, now: float) -> Iterator[Request]:
        i = 0
        while i < len(self._order):
            key = self._order[i]
            yield self._by_key[key]
            if i < len(self._order) and self._order[i] == key:  # not admitted: look further
                i += 1

    def admitted(self, request: Request, now: float) -> None:
        self._drop(request)
        self._admitted += 1
        self._queue_time += now - request.arrival_time

    def completed(self, request: Request, now: float) -> None:
        observe(self.predictor, request)

    def metrics(self) -> dict[str, Any]:
        return {"admissions": self._admitted, "queue_time_s": self._queue_time, "waiting": len(self._order)}

    def __len__(self) -> int:
        return len(self._order)
