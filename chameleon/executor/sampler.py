"""Token selection from the last-position logits of the rows that sample this step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from chameleon.sampling_params import SamplingParams


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass strictly before it already reaches top_p (keeps at least one).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,  # [S, vocab] float32
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> list[int]:
    """One token per row. Each row draws from its own generator, so a seeded request gives the
    same tokens whatever else shares its batch."""
    out = logits.argmax(-1).tolist()  # greedy rows are done; the rest are overwritten below
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        scaled = _filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = scaled.softmax(-1)
        out[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    return out


def sample_from_hidden(
    hidden: torch.Tensor,  # [S, hidden] final hidden states of the rows that sample
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    *,
    logits: Callable[[torch.Tensor], torch.Tensor],  # hidden -> [n, vocab] float32
    greedy: Callable[[torch.Tensor], torch.Tensor],  # hidden -> [n] argmax ids, logits never materialised
) -> list[int]:
    """Like `sample`, but greedy rows never materialise their logits (the head reduces them chunk by
    chunk) and only the other rows pay for a full [n, vocab] float32 tensor."""
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if len(greedy_rows) == len(params):
        return greedy(hidden).tolist()
    out = [0] * len(params)
    if greedy_rows:
        ids = greedy(hidden.index_select(0, torch.tensor(greedy_rows, device=hidden.device))).tolist()
        for row, token in zip(greedy_rows, ids, strict=True):
            out[row] = token
    rest = [i for i, p in enumerate(params) if not p.greedy]
    sampled = sample(
        logits(hidden.index_select(0, torch.tensor(rest, device=hidden.device))),
        [params[i] for i in rest],
        [generators[i] for i in rest],
    )
    for row, token in zip(rest, sampled, strict=True):
        out[row] = token
    return out
