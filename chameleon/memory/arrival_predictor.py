"""Histogram-based adapter arrival predictor (paper §4.2, optional; off by default).

For each adapter we keep arrival counts in fixed time bins over a sliding history. The estimated
rate is count / history; the chance of at least one arrival in the next `horizon_s` under a
Poisson assumption is 1 - exp(-rate * horizon_s). Adapters above `threshold` are worth loading
into *free* memory before their requests arrive (the scheduler never evicts for them).
"""

from __future__ import annotations

import math
from collections import deque

import attrs


@attrs.define
class ArrivalPredictor:
    history_s: float = 60.0
    bin_s: float = 1.0
    horizon_s: float = 2.0
    threshold: float = 0.5
    max_candidates: int = 4
    _bins: dict[str, deque[list[float]]] = attrs.field(factory=dict)  # adapter -> [(bin start, count)]

    def observe(self, adapter: str, now: float) -> None:
        bins = self._bins.setdefault(adapter, deque())
        start = math.floor(now / self.bin_s) * self.bin_s
        if bins and bins[-1][0] == start:
            bins[-1][1] += 1
        else:
            bins.append([start, 1.0])
        self._expire(bins, now)

    def probability(self, adapter: str, now: float) -> float:
        bins = self._bins.get(adapter)
        if not bins:
            return 0.0
        self._expire(bins, now)
        rate = sum(count for _, count in bins) / self.history_s
        return 1.0 - math.exp(-rate * self.horizon_s)

    def likely(self, now: float) -> tuple[str, ...]:
        """Adapters most likely to see a request within the horizon, most likely first."""
        scored = [(self.probability(a, now), a) for a in list(self._bins)]
        picked = sorted((p, a) for p, a in scored if p >= self.threshold)[::-1]
        return tuple(a for _, a in picked[: self.max_candidates])

    def _expire(self, bins: deque[list[float]], now: float) -> None:
        while bins and bins[0][0] < now - self.history_s:
            bins.popleft()
