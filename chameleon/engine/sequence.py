"""The executor's view of one scheduled request, built every step for every sequence."""

from __future__ import annotations

from chameleon.executor.base import SequenceInput
from chameleon.sched.scheduler import ScheduledRequest


def sequence_input(item: ScheduledRequest) -> SequenceInput:
    """The executor's view of one scheduled request (no mutable scheduler state)."""
    r, n = item.request, item.num_new_tokens
    start = r.num_computed_tokens
    return SequenceInput(
        request_id=r.request_id,
        token_ids=_token_range(r.prompt_token_ids, r.output_token_ids, start, start + n),
        start_pos=start,
        num_prompt_tokens=len(r.prompt_token_ids),
        block_table=r.block_table,
        adapter=r.adapter,
        sampling=r.sampling if start + n == r.num_tokens else None,
        seed=r.seed,
    )


def _token_range(prompt: list[int], output: list[int], start: int, stop: int) -> list[int]:
    """`(prompt + output)[start:stop]` without concatenating the whole sequence every step."""
    n = len(prompt)
    if start >= n:
        return output[start - n : stop - n]
    if stop <= n:
        return prompt[start:stop]
    return prompt[start:] + output[: stop - n]
