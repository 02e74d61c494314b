"""Token selection from the last-position logits of the rows that sample this step.

Failures are per row, never per batch. A row fails when its logits hold a NaN or +inf, are all -inf,
or its final probabilities are not a usable distribution (non-finite, or zero mass); for a greedy row
whose logits are never materialised (`sample_rows_from_hidden`), when its hidden state is not finite
(the argmax of NaN logits is garbage, so it counts as a failure too). A failed row consumes nothing
from any other row's generator, so the other rows' tokens are the same as in a batch without it.

Two forms of each entry point:
- `sample_rows` / `sample_rows_from_hidden` return `list[int | None]`: None marks a failed row. This is
  what an executor should call: emit the tokens, fail only the requests whose row is None.
- `sample` / `sample_from_hidden` return `list[int]` when every row succeeds and otherwise raise
  `SamplingError` carrying `rows` (the failed indices) and `tokens` (the per-row result, None where
  failed), so a caller written for the old all-or-nothing API can catch it and still fail only those.

Logprobs: pass a dict as `logprobs_out` and every successfully sampled row whose params set
`logprobs` gets its `TokenLogprobs` there, by row index, computed from the same logits the row
sampled from (`executor/logprobs.py`: raw log-softmax, before temperature). A greedy row asking for
logprobs therefore materialises its logits (`SamplingParams.needs_logits`); the other greedy rows
still never do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from chameleon.errors import SamplingError
from chameleon.executor.base import TokenLogprobs
from chameleon.executor.logprobs import token_logprobs
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
        drop_sorted[0] = False  # the most likely token always stays, whatever rounding did
        drop = torch.zeros_like(drop_sorted).scatter_(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _unusable_rows(logits: torch.Tensor) -> list[bool]:
    """Per row: NaN or +inf anywhere, or nothing but -inf."""
    bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)
    return bad.tolist()


def _draw(row_logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int | None:
    probs = _filter_top_k_top_p(row_logits / p.temperature, p.top_k, p.top_p).softmax(-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
        return None
    try:
        return int(torch.multinomial(probs, 1, generator=gen).item())
    except RuntimeError:  # torch's own check on the distribution; this row only
        return None


def sample_rows(
    logits: torch.Tensor,  # [S, vocab] float32
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    logprobs_out: dict[int, TokenLogprobs] | None = None,
) -> list[int | None]:
    """One token per row, or None for a row that cannot be sampled. Each row draws from its own
    generator, so a seeded request gives the same tokens whatever else shares its batch."""
    bad = _unusable_rows(logits)
    greedy_ids = logits.argmax(-1).tolist()
    out: list[int | None] = []
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if bad[row]:
            out.append(None)
        elif p.greedy:
            out.append(int(greedy_ids[row]))
        else:
            out.append(_draw(logits[row], p, gen))
    if logprobs_out is not None:
        _add_logprobs(logits, params, out, logprobs_out)
    return out


def _add_logprobs(
    logits: torch.Tensor, params: Sequence[SamplingParams], tokens: list[int | None], into: dict[int, TokenLogprobs]
) -> None:
    rows = [i for i, (p, t) in enumerate(zip(params, tokens, strict=True)) if p.logprobs is not None and t is not None]
    if not rows:
        return
    chosen = [tokens[i] or 0 for i in rows]
    ks = [params[i].logprobs or 0 for i in rows]
    for row, lp in zip(rows, token_logprobs(_rows(logits, rows), chosen, ks), strict=True):
        into[row] = lp


def sample_rows_from_hidden(
    hidden: torch.Tensor,  # [S, hidden] final hidden states of the rows that sample
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    *,
    logits: Callable[[torch.Tensor], torch.Tensor],  # hidden -> [n, vocab] float32
    greedy: Callable[[torch.Tensor], torch.Tensor],  # hidden -> [n] argmax ids, logits never materialised
    logprobs_out: dict[int, TokenLogprobs] | None = None,
) -> list[int | None]:
    """Like `sample_rows`, but greedy rows never materialise their logits (the head reduces them chunk
    by chunk) and only the rows that need them (`SamplingParams.needs_logits`) pay for a full
    [n, vocab] float32 tensor."""
    finite = torch.isfinite(hidden).all(-1).tolist()
    out: list[int | None] = [None] * len(params)
    greedy_rows = [i for i, p in enumerate(params) if not p.needs_logits and finite[i]]
    if greedy_rows:
        ids = greedy(_rows(hidden, greedy_rows)).tolist()
        for row, token in zip(greedy_rows, ids, strict=True):
            out[row] = int(token)
    rest = [i for i, p in enumerate(params) if p.needs_logits and finite[i]]
    if rest:
        local: dict[int, TokenLogprobs] | None = None if logprobs_out is None else {}
        sampled = sample_rows(
            logits(_rows(hidden, rest)), [params[i] for i in rest], [generators[i] for i in rest], local
        )
        for row, token in zip(rest, sampled, strict=True):
            out[row] = token
        for j, lp in (local or {}).items():
            assert logprobs_out is not None
            logprobs_out[rest[j]] = lp
    return out


def _rows(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
    if len(rows) == hidden.shape[0]:
        return hidden
    return hidden.index_select(0, torch.tensor(rows, device=hidden.device))


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    logprobs_out: dict[int, TokenLogprobs] | None = None,
) -> list[int]:
    """`sample_rows`, all rows or `SamplingError` (module docstring)."""
    return _all_or_raise(sample_rows(logits, params, generators, logprobs_out))


def sample_from_hidden(
    hidden: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    *,
    logits: Callable[[torch.Tensor], torch.Tensor],
    greedy: Callable[[torch.Tensor], torch.Tensor],
    logprobs_out: dict[int, TokenLogprobs] | None = None,
) -> list[int]:
    """`sample_rows_from_hidden`, all rows or `SamplingError` (module docstring)."""
    return _all_or_raise(
        sample_rows_from_hidden(hidden, params, generators, logits=logits, greedy=greedy, logprobs_out=logprobs_out)
    )


def _all_or_raise(tokens: list[int | None]) -> list[int]:
    failed = tuple(i for i, t in enumerate(tokens) if t is None)
    if failed:
        raise SamplingError(
            f"rows {list(failed)} of {len(tokens)} have non-finite logits or probabilities; the other rows sampled",
            rows=failed,
            tokens=tuple(tokens),
        )
    return [t for t in tokens if t is not None]
