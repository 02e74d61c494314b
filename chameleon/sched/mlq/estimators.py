"""Sliding-window estimates of a queue's arrival rate, service time and largest request.

Rules and their reasons: `docs/scheduling.md` (Load estimates).
"""

from __future__ import annotations

from collections import deque

from chameleon.errors import ConfigError
from chameleon.sched.mlq.quotas import QueueStats


class ArrivalRateEstimator:
    """Sliding-window lambda, D and S of one queue (module docstring). Times are clock values, in s."""

    def __init__(
        self,
        *,
        start_s: float,
        window_s: float = 60.0,
        min_span_s: float = 1.0,
        default_service_s: float = 1.0,
    ) -> None:
        if not (window_s > 0 and min_span_s > 0 and default_service_s > 0):
            raise ConfigError("window_s, min_span_s and default_service_s must be > 0")
        self.window_s = window_s
        self.min_span_s = min_span_s
        self._start = start_s
        self._last = start_s
        self._arrivals: deque[float] = deque()
        self._sizes: deque[tuple[float, int]] = deque()  # monotonic: sizes strictly decrease
        self._services: deque[tuple[float, float]] = deque()
        self._service_sum = 0.0
        self._last_service = default_service_s

    def record_arrival(self, t: float, tokens: int = 0) -> None:
        """A request of `tokens` (its quota cost) joined the queue at time t."""
        self._advance(t)
        self._arrivals.append(t)
        while self._sizes and self._sizes[-1][1] <= tokens:  # an older, smaller size can never be the max
            self._sizes.pop()
        self._sizes.append((t, tokens))

    def record_service(self, t: float, service_s: float) -> None:
        """A request of this queue finished at time t after `service_s` seconds of service."""
        if not service_s >= 0:
            raise ValueError(f"service_s must be >= 0, got {service_s!r}")
        self._advance(t)
        self._services.append((t, service_s))
        self._service_sum += service_s
        self._last_service = service_s

    def arrival_rate(self, now: float) -> float:
        self._advance(now)
        span = max(self.min_span_s, min(self.window_s, now - self._start))
        return len(self._arrivals) / span

    def mean_service_s(self, now: float) -> float:
        self._advance(now)
        if not self._services:
            return self._last_service
        return max(0.0, self._service_sum / len(self._services))

    def max_request_tokens(self, now: float) -> int:
        self._advance(now)
        return self._sizes[0][1] if self._sizes else 0

    def stats(self, now: float, demand_tokens: float) -> QueueStats:
        """This queue's `QueueStats` at `now`; the scheduler supplies the current demand."""
        return QueueStats(
            max_request_tokens=self.max_request_tokens(now),
            expected_service_s=self.mean_service_s(now),
            arrival_rate=self.arrival_rate(now),
            demand_tokens=demand_tokens,
        )

    def _advance(self, now: float) -> None:
        """Move the window's end to `now` and drop events at or before now - window."""
        if now < self._last:
            raise ValueError(f"time went backwards: {now!r} < {self._last!r}")
        self._last = now
        horizon = now - self.window_s
        while self._arrivals and self._arrivals[0] <= horizon:
            self._arrivals.popleft()
        while self._sizes and self._sizes[0][0] <= horizon:
            self._sizes.popleft()
        while self._services and self._services[0][0] <= horizon:
            self._service_sum -= self._services.popleft()[1]
        if not self._services:
            self._service_sum = 0.0  # no float drift survives an empty window
