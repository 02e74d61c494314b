"""The executor's view of one scheduled request, built every step for every sequence."""

from __future__ import annotations

from chameleon.executor.base import PromptLogprobsAsk, SequenceInput, WindowView
from chameleon.sched.request import Request
from chameleon.sched.scheduler import ScheduledRequest


def sequence_input(item: ScheduledRequest, window: tuple[int, int, int] | None = None) -> SequenceInput:
    """The executor's view of one scheduled request (no mutable scheduler state). `window`:
    `KVBlockManager.window_edges` (sink tokens, recent tokens, block size) under a bounded window."""
    r, n = item.request, item.num_new_tokens
    start = r.num_computed_tokens
    view = None if window is None else WindowView(window[0], window[1], r.num_evicted_blocks * window[2], window[2])
    return SequenceInput(
        request_id=r.request_id,
        token_ids=_token_range(r.prompt_token_ids, r.output_token_ids, start, start + n),
        start_pos=start,
        num_prompt_tokens=len(r.prompt_token_ids),
        block_table=r.block_table,
        adapter=r.adapter,
        sampling=r.sampling if start + n == r.num_tokens else None,
        seed=r.seed,
        prompt_logprobs=_prompt_ask(r, start, n) if r.sampling.prompt_logprobs is not None else None,
        window=view,
    )


def _prompt_ask(r: Request, start: int, n: int) -> PromptLogprobsAsk | None:
    """The prompt tokens this chunk predicts (position p predicts token p + 1), while the prompt
    logprobs are still being collected; a chunk recomputed after a preemption asks again."""
    if r.sampling.prompt_logprobs is None or len(r.prompt_logprobs) >= len(r.prompt_token_ids) - 1:
        return None  # not asked, or all collected
    stop = min(start + n, len(r.prompt_token_ids) - 1)
    if stop <= start:
        return None
    return PromptLogprobsAsk(r.sampling.prompt_logprobs, start + 1, r.prompt_token_ids[start + 1 : stop + 1])


def _token_range(prompt: list[int], output: list[int], start: int, stop: int) -> list[int]:
    """`(prompt + output)[start:stop]` without concatenating the whole sequence every step."""
    n = len(prompt)
    if start >= n:
        return output[start - n : stop - n]
    if stop <= n:
        return prompt[start:stop]
    return prompt[start:] + output[: stop - n]
