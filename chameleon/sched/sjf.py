"""Shortest job first by predicted size (prompt + predicted output tokens).

Good for mean latency, and the classic way to starve long requests: under a sustained stream of
short ones a long request may wait forever. Kept as a baseline for exactly that comparison.
"""

from __future__ import annotations

import bisect
import itertools

from chameleon.sched.policy import IndexWalk, PolicyBase, Walk
from chameleon.sched.prediction import observe, predict
from chameleon.sched.predictors import OutputLengthPredictor
from chameleon.sched.request import Request


class SjfPolicy(PolicyBase):
    def __init__(self, predictor: OutputLengthPredictor) -> None:
        super().__init__()
        self.predictor = predictor
        self._order: list[tuple[int, int]] = []  # (size, arrival sequence), kept sorted
        self._by_key: dict[tuple[int, int], Request] = {}
        self._key: dict[str, tuple[int, int]] = {}
        self._predicted: dict[str, int] = {}  # request id -> predicted output tokens
        self._left: set[str] = set()  # left running this iteration; not (yet) requeued or completed
        self._seq = itertools.count()

    def add(self, request: Request, now: float) -> None:
        self._predicted[request.request_id] = predict(self.predictor, request)
        self._push(request)

    def requeue(self, request: Request, now: float) -> None:
        self._left.discard(request.request_id)
        self._push(request)

    def left_running(self, request: Request, now: float) -> None:
        self._left.add(request.request_id)  # requeued, completed, or (aborted) forgotten next iteration

    def preemptions(self, now: float) -> list[Request]:
        for rid in self._left:
            self._predicted.pop(rid, None)
        self._left.clear()
        return []

    def _push(self, request: Request) -> None:
        key = (len(request.prompt_token_ids) + self._predicted[request.request_id], next(self._seq))
        bisect.insort(self._order, key)
        self._by_key[key] = request
        self._key[request.request_id] = key

    def _drop(self, request: Request) -> None:
        key = self._key.pop(request.request_id)
        del self._order[bisect.bisect_left(self._order, key)]
        del self._by_key[key]

    def remove(self, request: Request) -> None:
        self._drop(request)
        self._predicted.pop(request.request_id, None)

    def walk(self, now: float) -> Walk:
        return IndexWalk(self, self._order, self._by_key.__getitem__)

    def admitted(self, request: Request, now: float) -> None:
        self._drop(request)
        self.counters.admitted(now - request.arrival_time)

    def completed(self, request: Request, now: float) -> None:
        observe(self.predictor, request)
        self._left.discard(request.request_id)
        self._predicted.pop(request.request_id, None)

    def __len__(self) -> int:
        return len(self._order)
