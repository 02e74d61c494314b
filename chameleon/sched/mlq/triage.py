"""SLO triage (ours): requests that already missed the TTFT SLO wait behind those that still can
meet it, as long as such misses stay within a budget of the recent arrivals.

Why: under one TTFT SLO, a request that has waited past it has missed it whatever happens next,
while serving it first can make younger requests miss too. Putting it last maximises the number of
requests that meet the SLO. That helps the tail only while the misses are few: a P99 target allows
1% of requests to miss. Beyond the budget (sustained overload) the rule would only starve the
missed requests, so it switches off and the oldest go first again (FIFO). `docs/scheduling.md`.
"""

from __future__ import annotations

from collections import deque

from chameleon.sched.mlq.entry import Entry

__all__ = ["SloTriage"]


class SloTriage:
    """Marks `Entry.missed` and says whether triage is on (`active`). Clock-driven, no tensors."""

    def __init__(self, slo_s: float, budget: float, window_s: float, *, enabled: bool) -> None:
        self.slo_s = slo_s
        self.budget = budget
        self.window_s = window_s
        self.enabled = enabled
        self.active = False
        self.misses = 0  # requests that missed the SLO before their first token, in all
        self._unchecked: deque[Entry] = deque()  # arrivals not yet past their deadline, oldest first
        self._arrival_times: deque[float] = deque()
        self._miss_times: deque[float] = deque()

    def arrived(self, entry: Entry, now: float) -> None:
        if self.enabled:
            self._unchecked.append(entry)
            self._arrival_times.append(now)

    def update(self, now: float, alive: dict[str, Entry]) -> None:
        """Once per admission walk: mark the waiting requests whose deadline passed; recount."""
        if not self.enabled:
            return
        cut = now - self.slo_s
        while self._unchecked and self._unchecked[0].key[0] <= cut:
            entry = self._unchecked.popleft()
            if entry.waiting and entry.request.first_token_time is None and alive.get(entry.rid) is entry:
                entry.missed = True
                self._miss_times.append(now)
                self.misses += 1
        horizon = now - self.window_s
        for times in (self._miss_times, self._arrival_times):
            while times and times[0] <= horizon:
                times.popleft()
        self.active = len(self._miss_times) <= self.budget * len(self._arrival_times)

    def last(self, entry: Entry) -> bool:
        """True: triage puts this request behind every one that can still meet the SLO."""
        return self.active and entry.missed
