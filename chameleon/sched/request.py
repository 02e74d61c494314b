"""The state of one request as it moves through the engine core."""

from __future__ import annotations

import enum

import attrs

from chameleon.outputs import FinishReason, PositionLogprobs, RequestMetrics
from chameleon.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@attrs.define(eq=False)
class Request:
    """Mutable bookkeeping; only the engine core and its scheduler change it.

    The model computes `all_token_ids[num_computed_tokens:]` a chunk at a time; after a preemption
    `num_computed_tokens` drops to 0 and prompt plus output are recomputed, which gives the same
    tokens because sampling state lives in the executor's generator for `seed`, not in the KV cache.
    No torch and no detokenizer here: the scheduler and the simulator import this.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    adapter: str | None = None  # None: the base model
    output_token_ids: list[int] = attrs.field(factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_table: list[int] = attrs.field(factory=list)  # owned by KVBlockManager
    finish_reason: FinishReason | None = None
    seed: int = 0  # sampling seed; the executor keeps the generator (same tokens after a preemption)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    swapped: bool = False  # its KV (num_computed_tokens of it) waits in host memory
    # Prefix caching (memory/kv_blocks.py): what besides the tokens decides its KV (adapter content
    # hash, KV dtype); False once it was swapped (its blocks are never shared after that).
    prefix_salt: str = ""
    prefix_sharing: bool = True
    block_keys: list[bytes] = attrs.field(factory=list)  # keys of its full blocks, memoized
    num_registered_blocks: int = 0  # leading blocks indexed in the prefix cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at its last admission
    # Outputs: which of its parent's n completions it is, and logprobs when its sampling asks.
    index: int = 0
    logprobs: list[PositionLogprobs] = attrs.field(factory=list)  # one per output token
    prompt_logprobs: dict[int, PositionLogprobs] = attrs.field(factory=dict)  # prompt index -> entry
    prompt_logprobs_sent: bool = False
    # Bounded-window KV (EngineConfig.kv_window): blocks dropped after the sink blocks. The block
    # table then holds the sink blocks and the blocks from logical index sink + evicted on.
    num_evicted_blocks: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def metrics(self) -> RequestMetrics:
        return RequestMetrics(
            arrival_time=self.arrival_time,
            first_scheduled_time=self.first_scheduled_time,
            first_token_time=self.first_token_time,
            finish_time=self.finish_time,
            num_prompt_tokens=len(self.prompt_token_ids),
            num_generated_tokens=len(self.output_token_ids),
        )
