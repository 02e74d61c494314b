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
class Logprob:
    """One token's log probability (vLLM's `Logprob`).

    `logprob` is vLLM's default "raw" logprob: log-softmax of the model's logits before
    temperature, top-k and top-p, so it describes the model, not the sampler. `rank` is 1 for the
    most likely token; for a sampled (or prompt) token it counts the vocabulary entries whose
    logprob is at least its own (vLLM's convention, ties share the worse rank).
    `decoded_token` is the token's text alone (None without a tokenizer).
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per position: the chosen (sampled or prompt) token first, then the top-k, by token id (vLLM's
# `dict[int, Logprob]`; the chosen token appears once even when it is also in the top-k).
PositionLogprobs = dict[int, Logprob]


@attrs.frozen
class CompletionOutput:
    """One of a request's `n` completions (vLLM's `CompletionOutput`), in the request's output kind:
    `delta`, `token_ids` and `logprobs` are what is new (delta) or everything so far (cumulative,
    final); `text` is everything so far (cumulative; delta and final: only once finished)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    logprobs: tuple[PositionLogprobs, ...] | None = None  # one per token id; None unless asked
    delta: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _single_output(out: RequestOutput) -> tuple[CompletionOutput, ...]:
    return (CompletionOutput(0, out.text, out.token_ids, out.finish_reason, None, out.delta),)


@attrs.frozen
class RequestOutput:
    """One streamed update of a request: the new text and ids since the previous update.

    `outputs` holds the completions this update concerns (vLLM's convention): with n=1 exactly
    one, index 0, and `delta`, `token_ids`, `text` and `finish_reason` are its fields. With n>1,
    delta and cumulative updates carry only the completions that changed in that iteration (sorted
    by index) and the flat fields repeat `outputs[0]`'s; a final update carries all n. `finished`
    is True once every completion has finished. `prompt_logprobs` (when asked) comes once, on the
    first update: one entry per prompt token, the first None (nothing predicts it).
    """

    request_id: str
    delta: str
    token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: FinishReason | None
    metrics: RequestMetrics
    error: str | None = None  # set when the request was aborted by a failed iteration
    # `outputs=` in the constructor; None: the one completion the flat fields describe, built when
    # read (most n=1 consumers read only the flat fields, and one is made per token).
    _outputs: tuple[CompletionOutput, ...] | None = None
    prompt_logprobs: tuple[PositionLogprobs | None, ...] | None = None

    @property
    def outputs(self) -> tuple[CompletionOutput, ...]:
        return self._outputs if self._outputs is not None else _single_output(self)

    @property
    def logprobs(self) -> tuple[PositionLogprobs, ...] | None:
        """`outputs[0].logprobs`: per token id of this update, when `SamplingParams.logprobs` is set."""
        return self.outputs[0].logprobs if self.outputs else None

    @classmethod
    def of(
        cls,
        request_id: str,
        outputs: tuple[CompletionOutput, ...],
        finished: bool,
        metrics: RequestMetrics,
        *,
        error: str | None = None,
        prompt_logprobs: tuple[PositionLogprobs | None, ...] | None = None,
    ) -> RequestOutput:
        """An update built from its completions; the flat fields are `outputs[0]`'s."""
        first = outputs[0] if outputs else CompletionOutput(0, "", ())
        return cls(
            request_id,
            first.delta,
            first.token_ids,
            first.text,
            finished,
            first.finish_reason,
            metrics,
            error=error,
            outputs=outputs,
            prompt_logprobs=prompt_logprobs,
        )


def merge_completions(first: CompletionOutput, then: CompletionOutput, cumulative: bool) -> CompletionOutput:
    """Two consecutive updates of one completion as one (cumulative: the later one has it all)."""
    if cumulative:
        return then
    logprobs = then.logprobs
    if first.logprobs is not None or then.logprobs is not None:
        logprobs = (*(first.logprobs or ()), *(then.logprobs or ()))
    return attrs.evolve(
        then, delta=first.delta + then.delta, token_ids=first.token_ids + then.token_ids, logprobs=logprobs
    )


def merge_outputs(first: RequestOutput, then: RequestOutput, cumulative: bool) -> RequestOutput:
    """Two consecutive updates of one request as one (what a consumer that lags behind reads)."""
    by_index = {c.index: c for c in first.outputs}
    for c in then.outputs:
        by_index[c.index] = merge_completions(by_index[c.index], c, cumulative) if c.index in by_index else c
    outputs = tuple(by_index[i] for i in sorted(by_index))
    return RequestOutput.of(
        then.request_id,
        outputs,
        then.finished,
        then.metrics,
        error=then.error,
        prompt_logprobs=first.prompt_logprobs or then.prompt_logprobs,
    )


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
