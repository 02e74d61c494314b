"""Clocks. The core never reads time directly, so the simulator and tests can drive it."""

from __future__ import annotations

import time
from typing import Protocol

import attrs


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since an arbitrary origin, monotonic."""
        ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()


@attrs.define
class ManualClock:
    """A clock that only moves when told to (tests, the simulator)."""

    t: float = 0.0

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self.t += seconds
