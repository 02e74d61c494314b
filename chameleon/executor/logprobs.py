"""Logprobs from logits, for the rows that ask (vLLM's default "raw" logprobs).

Values are `log_softmax` of the model's float32 logits *before* temperature, top-k and top-p: they
describe the model's distribution, not the sampler's (vLLM V1's `logprobs_mode="raw_logprobs"`).
A chosen token's rank is the number of vocabulary entries whose logprob is at least its own (1 for
the most likely; ties share the worse rank, as vLLM counts). The top-k come most likely first.

Prompt logprobs need the hidden states of the prompt positions, which the model otherwise drops
before the LM head: `head_rows` merges those rows with the sampling rows (ascending, so a model
that keeps every row when the count matches still returns them in order), and
`prompt_logprobs` turns their hidden states into logprobs a bounded number of rows at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from chameleon.executor.base import PromptLogprobsAsk, TokenLogprobs

PROMPT_ROWS_PER_CHUNK = 256  # prompt rows whose [rows, vocab] float32 logits exist at once


def token_logprobs(logits: torch.Tensor, chosen: Sequence[int], ks: Sequence[int]) -> list[TokenLogprobs]:
    """Per row of `logits` ([m, vocab]): the logprob and rank of `chosen[i]`, and the top `ks[i]`."""
    if not chosen:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(list(chosen), dtype=torch.long, device=lp.device)
    own = lp.gather(1, ids[:, None])
    ranks = (lp >= own).sum(-1).tolist()
    own_list = own.squeeze(1).tolist()
    k_max = min(max(ks), lp.shape[-1])
    top_vals: list[list[float]] = [[] for _ in chosen]
    top_ids: list[list[int]] = [[] for _ in chosen]
    if k_max > 0:
        top = lp.topk(k_max, dim=-1)
        top_vals, top_ids = top.values.tolist(), top.indices.tolist()
    return [
        TokenLogprobs(int(c), float(v), int(r), tuple(int(t) for t in ti[:k]), tuple(float(x) for x in tv[:k]))
        for c, v, r, ti, tv, k in zip(chosen, own_list, ranks, top_ids, top_vals, ks, strict=True)
    ]


def head_rows(
    sample_rows: list[int], asks: Sequence[tuple[int, PromptLogprobsAsk]]
) -> tuple[list[int], list[int], list[int]]:
    """The rows that reach the LM head, ascending, and where the sampling rows and the prompt rows
    sit in them. `asks` is (first row of the sequence in the batch, what it asks) per sequence."""
    prompt = [start + r for start, ask in asks for r in range(len(ask.targets))]
    rows = sorted(sample_rows + prompt)
    where = {row: i for i, row in enumerate(rows)}
    return rows, [where[r] for r in sample_rows], [where[r] for r in prompt]


def prompt_logprobs(
    hidden: torch.Tensor,  # [sum of targets, hidden], in the order of `asks`
    asks: Sequence[tuple[str, PromptLogprobsAsk]],
    logits: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, tuple[int, list[TokenLogprobs]]]:
    """Request id -> (index of the first prompt token, its logprobs per target)."""
    chosen = [t for _, ask in asks for t in ask.targets]
    ks = [ask.k for _, ask in asks for _ in ask.targets]
    flat: list[TokenLogprobs] = []
    for lo in range(0, len(chosen), PROMPT_ROWS_PER_CHUNK):
        hi = lo + PROMPT_ROWS_PER_CHUNK
        flat += token_logprobs(logits(hidden[lo:hi]), chosen[lo:hi], ks[lo:hi])
    out: dict[str, tuple[int, list[TokenLogprobs]]] = {}
    at = 0
    for request_id, ask in asks:
        out[request_id] = (ask.first, flat[at : at + len(ask.targets)])
        at += len(ask.targets)
    return out
