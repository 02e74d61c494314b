"""What MLQ keeps about each request (`Entry`), and the small values of one admission walk."""

from __future__ import annotations

import enum

import attrs

from chameleon.sched.mlq.sizing import request_tokens
from chameleon.sched.request import Request

__all__ = ["Entry", "Offer", "Outcome", "QueueCounters", "remaining_predicted"]


def remaining_predicted(entry: Entry | None) -> int:
    """Predicted decode tokens still to come (0 when unknown or already exceeded)."""
    return 0 if entry is None else max(0, entry.predicted - len(entry.request.output_token_ids))


@attrs.define(eq=False)
class Entry:
    """What the policy keeps about one request, from `add` until it finishes or is aborted."""

    request: Request
    predicted: int  # output tokens, predicted once at arrival
    wrs: float
    adapter_tokens: int  # the adapter's memory in KV tokens, at arrival
    key: tuple[float, int]  # FIFO order inside a queue: (arrival time, add order)
    queue: int
    enqueued_at: float  # arrival or the latest requeue (queueing time)
    waiting: bool = True
    bypassed: Entry | None = None  # the blocked head this request went ahead of
    missed: bool = False  # waited past the TTFT SLO without a first token (triage)

    @property
    def rid(self) -> str:
        return self.request.request_id

    def cost(self) -> int:
        r = self.request
        output = max(self.predicted, len(r.output_token_ids))
        return request_tokens(len(r.prompt_token_ids), output, self.adapter_tokens, kv_bytes_per_token=1)


@attrs.define
class QueueCounters:
    arrivals: int = 0
    admissions: int = 0
    leftover_admissions: int = 0  # phase-2 admissions (borrowed leftover quota)
    queue_time_s: float = 0.0


@attrs.frozen
class Offer:
    entry: Entry
    leftover: bool
    bypassed: Entry | None


class Outcome(enum.Enum):
    NO_QUOTA = "no-quota"
    ADMITTED = "admitted"
    REFUSED = "refused"
