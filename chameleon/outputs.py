"""What the engine hands back to callers."""

from __future__ import annotations

from typing import Literal

import attrs

FinishReason = Literal["stop", "length", "abort"]


@attrs.frozen
class RequestMetrics:
    """Times come from the engine's clock (seconds). `None` until the event has happened."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@attrs.frozen
class RequestOutput:
    """One streamed update of a request: the new text and ids since the previous update."""

    request_id: str
    delta: str
    token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: FinishReason | None
    metrics: RequestMetrics
    error: str | None = None  # set when the request was aborted by a failed iteration

@attrs.frozen
class AdapterInfo:
    name: str
    path: str
    rank: int  # the adapter config's r
    max_rank: int  # largest rank over its modules (rank_pattern); rows it occupies on the device
    target_modules: tuple[str, ...]
    host_bytes: int  # its weights in host memory
    device_bytes: int  # what it occupies in the device pool when resident
    content_hash: str
    pinned: bool = False
    broken: bool = False  # a load failed: quarantined, requests refused until removed and re-added
    error: str | None = None  # why it is broken
