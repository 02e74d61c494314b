"""The interface between the engine core and whatever runs a batch."""

from __future__ import annotations

from typing import Protocol

from chameleon.scheduler import SchedulerOutput


class Executor(Protocol):
    @property
    def num_kv_blocks(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    def execute(self, batch: SchedulerOutput) -> list[int]:
        """Run one iteration; return one sampled token per scheduled request that samples, in order."""
        ...
