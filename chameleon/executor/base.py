"""The contract between the engine core and whatever runs a batch (the model, or a cost model).

The executor never sees the scheduler's mutable `Request`: each step it gets one `SequenceInput`
per scheduled sequence (the tokens to compute, their positions' start, the block table, the
adapter, and sampling parameters when the step samples), as vLLM's `NewRequestData` does, and
returns the sampled tokens keyed by request id (a `StepOutput`, a dict that may also carry
per-row `errors`). Failures are reported at the smallest scope that has them: a row whose
sampling failed (non-finite logits) is left out of the tokens and named in `errors`; an adapter
whose weights cannot be loaded raises `AdapterFault(name, message)` (before any KV is written, so
the core can re-run the batch without that adapter's rows); anything else raised by `execute` is a
whole-batch fault. Per-request state an executor keeps (a seeded
generator) is dropped when the request's id appears in `StepInput.finished`. The step values are
NamedTuples: they are built for every sequence every iteration, where attrs' frozen init costs.

Logprobs (only for the rows that ask, so the others pay nothing): a sampling row whose
`sampling.logprobs` is set gets a `TokenLogprobs` in `StepOutput.logprobs`; a sequence whose
`prompt_logprobs` is set gets one `TokenLogprobs` per target in `StepOutput.prompt_logprobs`.
Both are log-softmax of the raw logits (before temperature, top-k, top-p). An executor that
cannot compute them (the simulator) leaves them out; the outputs then carry none.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, TypeVar

from chameleon.outputs import AdapterInfo
from chameleon.sampling_params import SamplingParams

AdapterT = TypeVar("AdapterT")


class PromptLogprobsAsk(NamedTuple):
    """Logprobs wanted for prompt tokens this step: row r of the sequence's chunk predicts prompt
    token `first + r`, which is `targets[r]`; with the `k` most likely tokens each."""

    k: int
    first: int
    targets: list[int]


class TokenLogprobs(NamedTuple):
    """One position's logprobs: the chosen (sampled or prompt) token's, its rank (the number of
    vocabulary entries with a logprob at least its own), and the top-k, most likely first."""

    token_id: int
    logprob: float
    rank: int
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


class WindowView(NamedTuple):
    """A sequence under bounded-window KV (`EngineConfig.kv_window`, docs/kv_cache.md).

    The cache holds its first `sink_tokens` tokens, then nothing for `evicted_tokens` tokens, then
    the rest: the block table lists only the blocks held. A query at position p attends to the
    sinks and to the tokens from `((p - recent_tokens) // block_size) * block_size` to p."""

    sink_tokens: int  # block-aligned
    recent_tokens: int
    evicted_tokens: int  # whole blocks, right after the sinks
    block_size: int


class SequenceInput(NamedTuple):
    """What one sequence computes this step."""

    request_id: str
    token_ids: list[int]  # the tokens computed this step (a prefill chunk, or the last token)
    start_pos: int  # position of token_ids[0]; also the tokens computed before (see cached_tokens)
    num_prompt_tokens: int
    block_table: list[int]  # the request's KV blocks (read only)
    adapter: str | None
    sampling: SamplingParams | None  # set when this step ends at the sequence's last token
    seed: int  # the request's sampling seed (stable across preemptions)
    prompt_logprobs: PromptLogprobsAsk | None = None  # prompt tokens whose logprobs this step computes
    window: WindowView | None = None  # bounded-window KV; None: the cache holds every token

    @property
    def cached_tokens(self) -> int:
        """Tokens whose K/V this step reads from the cache (`start_pos` less the evicted ones)."""
        return self.start_pos - self.window.evicted_tokens if self.window is not None else self.start_pos

    @property
    def samples(self) -> bool:
        return self.sampling is not None

    @property
    def decoding(self) -> bool:
        """One new token after the whole prompt: a decode step (else a prefill or re-prefill)."""
        return len(self.token_ids) == 1 and self.start_pos >= self.num_prompt_tokens


class StepInput(NamedTuple):
    sequences: tuple[SequenceInput, ...]
    finished: tuple[str, ...] = ()  # requests gone since the previous step: drop their state

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)


class StepOutput(dict[str, int]):
    """What `execute` returns: request id -> sampled token, plus `errors` (request id -> reason)
    for sampling rows that failed. A plain dict is accepted too; a sampling request missing
    from it is failed with a generic reason."""

    def __init__(self, tokens: dict[str, int] | None = None, errors: dict[str, str] | None = None) -> None:
        super().__init__(tokens or {})
        self.errors: dict[str, str] = errors or {}
        self.logprobs: dict[str, TokenLogprobs] = {}  # sampled tokens' logprobs, for rows that ask
        # request id -> (index of the first prompt token, one entry per PromptLogprobsAsk target)
        self.prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = {}


class AdapterFault(Exception):
    """Raised by `load_adapter`, `prefetch_adapter` or `execute` when one adapter's weights cannot
    be made usable (its files vanished or changed and the reload failed). `execute` raises it
    before computing anything, so only that adapter's requests need to fail."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"adapter {name!r}: {message}")
        self.name = name
        self.message = message


class Executor(Protocol[AdapterT]):
    """Runs iterations and moves memory; generic in the adapter value its `read_adapter` returns."""

    @property
    def num_kv_blocks(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    @property
    def adapter_pool_rows(self) -> int:
        """Rank rows of device memory for adapters (the adapter cache's capacity)."""
        ...

    @property
    def kv_block_bytes(self) -> int:
        """Device bytes of one KV block (all layers, K and V): the budget's unit for KV."""
        ...

    @property
    def adapter_row_bytes(self) -> int:
        """Device bytes of one rank row of an adapter across all layers and target modules."""
        ...

    def read_adapter(self, name: str, path: str) -> AdapterT:
        """Validate an adapter against the model and read it into host memory.

        Touches no shared state, so the async front end runs it in a worker thread.
        """
        ...

    def register_adapter(self, adapter: AdapterT) -> AdapterInfo: ...

    def unregister_adapter(self, name: str) -> None: ...

    def load_adapter(self, name: str, row: int) -> None:
        """Make a registered adapter usable at pool rows `row...`; returns once it is.

        If `prefetch_adapter` already started this copy, this only waits for it to finish.
        """
        ...

    def prefetch_adapter(self, name: str, row: int) -> None:
        """Start copying an adapter into pool rows `row...` without waiting (overlaps compute)."""
        ...

    def evict_adapter(self, name: str) -> None: ...

    def swap_out(self, request_id: str, block_ids: tuple[int, ...]) -> None:
        """Copy these KV blocks (all layers) to host memory, kept under `request_id`."""
        ...

    def swap_in(self, request_id: str, block_ids: tuple[int, ...]) -> None:
        """Copy `request_id`'s swapped KV back into these (new) blocks and forget the host copy."""
        ...

    def drop_swapped(self, request_id: str) -> None:
        """Forget a host copy that will never be swapped in (the request was aborted)."""
        ...

    def execute(self, step: StepInput) -> dict[str, int]:
        """Run one iteration; return the token sampled for each sequence that samples, by request id.

        Return a `StepOutput` to report per-row failures (see the module docstring); raise
        `AdapterFault` for an adapter that cannot be loaded; any other exception fails the batch.
        """
        ...
