"""FastServe's skip-join multi-level feedback queue (MLFQ) behind the `AdmissionPolicy` interface.

A job enters the highest level whose quantum covers its predicted prefill time, is demoted when it
uses up its level's quantum (each level 2x the one above), promoted to the top after waiting
alpha, and preempted (its KV swapped to host memory) for a waiting job of a higher level. Strict
priority: a blocked job stops the walk. Every rule and estimate: `docs/scheduling.md` (MLFQ).
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Generator, Sequence
from typing import Any

import attrs

from chameleon.sched.options import SchedulerOptions
from chameleon.sched.policy import GeneratorWalk, PolicyBase, Walk
from chameleon.sched.request import Request

__all__ = ["DEFAULT_PREFILL_S_PER_TOKEN", "EMA_WEIGHT", "MLFQPolicy"]

DEFAULT_PREFILL_S_PER_TOKEN = 1e-4
EMA_WEIGHT = 0.1


@attrs.define(eq=False)
class _Job:
    request: Request
    level: int
    seq: int  # enqueue order (add or requeue)
    since: float  # last ran, arrived or was requeued: the promotion clock
    enqueued_at: float  # for queueing time
    level_time_s: float = 0.0  # attained service at the current level
    waiting: bool = True


@attrs.define
class _LevelCounters:
    joins: int = 0
    admissions: int = 0
    demotions: int = 0  # out of this level
    promotions: int = 0  # out of this level, to level 0
    preemptions: int = 0  # running jobs of this level taken out by `preemptions`
    queue_time_s: float = 0.0


class MLFQPolicy(PolicyBase):
    """FastServe's skip-join MLFQ (module docstring)."""

    swap_preempted = True

    def __init__(self, options: SchedulerOptions | None = None) -> None:
        super().__init__()
        self.options = options or SchedulerOptions()
        self.num_levels = self.options.mlfq_levels
        self.prefill_s_per_token = DEFAULT_PREFILL_S_PER_TOKEN
        self._levels: list[list[_Job]] = [[] for _ in range(self.num_levels)]
        self._jobs: dict[str, _Job] = {}
        self._left: dict[str, _Job] = {}  # left running, not (yet) requeued or completed
        self._promotion_line: deque[tuple[float, _Job]] = deque()  # (since, job), in enqueue order
        self._counters = [_LevelCounters() for _ in range(self.num_levels)]
        self._seq = itertools.count()
        self._next_seq = 0
        self._walk_seq = 0  # jobs enqueued before the latest candidates walk have seq < this
        self._now = float("-inf")

    def quantum(self, level: int) -> float:
        return self.options.mlfq_base_quantum_s * 2**level

    def entry_level(self, prompt_len: int) -> int:
        """Skip-join: the highest-priority level whose quantum covers the predicted prefill time."""
        prefill_s = prompt_len * self.prefill_s_per_token
        for level in range(self.num_levels):
            if self.quantum(level) >= prefill_s:
                return level
        return self.num_levels - 1

    # --- arrivals and departures -------------------------------------------------------------

    def add(self, request: Request, now: float) -> None:
        now = self._tick(now)
        level = self.entry_level(len(request.prompt_token_ids))
        job = _Job(request, level, seq=0, since=now, enqueued_at=now)
        self._jobs[request.request_id] = job
        self._enqueue(job, now)
        self._counters[level].joins += 1

    def requeue(self, request: Request, now: float) -> None:
        now = self._tick(now)
        job = self._left.pop(request.request_id, None) or self._jobs[request.request_id]
        job.since = now
        job.enqueued_at = now
        self._enqueue(job, now)

    def remove(self, request: Request) -> None:
        job = self._jobs.pop(request.request_id, None)
        if job is not None and job.waiting:
            self._unlink(job)

    def admitted(self, request: Request, now: float) -> None:
        job = self._jobs[request.request_id]
        self._unlink(job)
        job.since = now
        counters = self._counters[job.level]
        counters.admissions += 1
        counters.queue_time_s += max(0.0, now - job.enqueued_at)

    def left_running(self, request: Request, now: float) -> None:
        job = self._jobs.get(request.request_id)
        if job is not None:
            self._left[request.request_id] = job

    def completed(self, request: Request, now: float) -> None:
        self._left.pop(request.request_id, None)
        self._jobs.pop(request.request_id, None)

    # --- each iteration ----------------------------------------------------------------------

    def on_iteration(self, scheduled: Sequence[Request], duration_s: float, now: float) -> None:
        self._tick(now)
        self._learn_prefill_cost(scheduled, duration_s)
        for request in scheduled:
            job = self._jobs.get(request.request_id)
            if job is None:
                continue
            job.since = now
            job.level_time_s += duration_s
            if job.level_time_s > self.quantum(job.level) and job.level < self.num_levels - 1:
                self._counters[job.level].demotions += 1
                job.level += 1
                job.level_time_s = 0.0

    def preemptions(self, now: float) -> list[Request]:
        self._tick(now)
        for rid in list(self._left):  # still here: aborted while running
            self._jobs.pop(rid, None)
            del self._left[rid]
        running = sorted(self._running_jobs(), key=self._victim_key, reverse=True)  # worst first
        out = []
        for contender, job in zip(self._contenders(len(running)), running):
            if contender.level >= job.level:
                break
            out.append(job.request)
            self._counters[job.level].preemptions += 1
        return out

    def walk(self, now: float) -> Walk:
        self._tick(now)
        self._walk_seq = self._next_seq  # a walk starts now, whether or not anything is pulled
        return GeneratorWalk(self, self._offers())

    def _offers(self) -> Generator[Request, None, None]:
        for level in self._levels:
            for job in list(level):
                if job.waiting:
                    yield job.request

    def victim(self, running: Sequence[Request]) -> Request:
        def key(item: tuple[int, Request]) -> tuple[int, float, int, int]:
            position, request = item
            job = self._jobs.get(request.request_id)
            return (*self._victim_key(job), position) if job is not None else (-1, float("-inf"), -1, position)

        return max(enumerate(running), key=key)[1]

    def metrics(self) -> dict[str, Any]:
        levels = [
            {
                "quantum_s": self.quantum(i),
                "joins": c.joins,
                "admissions": c.admissions,
                "demotions": c.demotions,
                "promotions": c.promotions,
                "preemptions": c.preemptions,
                "queue_time_s": c.queue_time_s,
                "waiting": len(self._levels[i]),
            }
            for i, c in enumerate(self._counters)
        ]
        return {"levels": levels, "prefill_s_per_token": self.prefill_s_per_token, "waiting": len(self)}

    def __len__(self) -> int:
        return sum(len(level) for level in self._levels)

    # --- internals ---------------------------------------------------------------------------

    @staticmethod
    def _victim_key(job: _Job) -> tuple[int, float, int]:
        """Larger = scheduled again later: lower priority level, then later arrival."""
        return (job.level, job.request.arrival_time, job.seq)

    def _running_jobs(self) -> list[_Job]:
        jobs = (self._jobs.get(r.request_id) for r in self.view.running)
        return [j for j in jobs if j is not None and not j.waiting]

    def _contenders(self, limit: int) -> list[_Job]:
        """Up to `limit` waiting jobs that already had a walk to get in, best first."""
        out: list[_Job] = []
        for level in self._levels:
            for job in level:
                if len(out) >= limit:
                    return out
                if job.seq < self._walk_seq:
                    out.append(job)
        return out

    def _learn_prefill_cost(self, scheduled: Sequence[Request], duration_s: float) -> None:
        prefilling = any(r.num_computed_tokens < len(r.prompt_token_ids) for r in scheduled)
        tokens = sum(r.num_tokens_to_compute for r in scheduled)
        if prefilling and tokens > 0 and duration_s > 0:
            sample = duration_s / tokens
            self.prefill_s_per_token += EMA_WEIGHT * (sample - self.prefill_s_per_token)

    def _tick(self, now: float) -> float:
        """Monotonic clock; promotes every job that waited alpha. Returns the clock."""
        self._now = max(self._now, now)
        alpha = self.options.mlfq_promote_after_s
        line = self._promotion_line
        while line and self._now - line[0][0] >= alpha:
            since, job = line.popleft()
            if job.waiting and job.since == since and job.level > 0 and job.request.request_id in self._jobs:
                self._promote(job)
        return self._now

    def _promote(self, job: _Job) -> None:
        self._counters[job.level].promotions += 1
        self._unlink(job)
        job.level = 0
        job.level_time_s = 0.0
        self._link(job)

    def _enqueue(self, job: _Job, now: float) -> None:
        job.seq = next(self._seq)
        self._next_seq = job.seq + 1
        self._link(job)
        self._promotion_line.append((now, job))

    def _link(self, job: _Job) -> None:
        bisect.insort(self._levels[job.level], job, key=lambda j: j.seq)
        job.waiting = True

    def _unlink(self, job: _Job) -> None:
        level = self._levels[job.level]
        i = bisect.bisect_left(level, job.seq, key=lambda j: j.seq)
        if i < len(level) and level[i] is job:
            del level[i]
        else:
            level.remove(job)
        job.waiting = False
