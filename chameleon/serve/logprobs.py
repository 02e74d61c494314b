"""Logprobs in OpenAI's two response shapes, from the library's `{token id: Logprob}` entries.

Each entry holds the sampled token first (its logprob and rank), then the top-k tokens
(`chameleon/outputs.py`); the values are raw logprobs (before temperature), as vLLM reports them.
`-inf` is clamped to -9999.0 (JSON has no infinity; vLLM does the same).

- /v1/completions (legacy): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, where
  `top_logprobs[i]` maps token text to logprob for the sampled token and the top-k (up to k + 1
  entries, as OpenAI documents), and `text_offset[i]` is where token i's text starts in the
  completion (counted from the completion's start; continued across streamed chunks).
- /v1/chat/completions: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`, where
  `top_logprobs` holds the k most likely tokens, most likely first, and `bytes` are the token's
  exact bytes for byte-level BPE vocabularies (`engine/token_text.py`), so clients can rebuild
  characters split across tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chameleon.engine.token_text import TokenText
from chameleon.outputs import Logprob, PositionLogprobs

FLOOR = -9999.0


def _value(lp: Logprob) -> float:
    return max(lp.logprob, FLOOR)


def _text(lp: Logprob) -> str:
    return lp.decoded_token or ""


def _chosen(entry: PositionLogprobs) -> tuple[int, Logprob] | None:
    return next(iter(entry.items()), None)


def _top(entry: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
    """The k most likely entries, most likely first (the sampled one only if it is among them)."""
    ranked = sorted(entry.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
    return ranked[:k]


def completion_logprobs(entries: Sequence[PositionLogprobs], offset: int) -> dict[str, Any]:
    """The legacy shape for these tokens; `next_offset` is where the next chunk's tokens start."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for entry in entries:
        chosen = _chosen(entry)
        if chosen is None:  # the executor computed none (never with the torch executor)
            tokens.append("")
            values.append(None)
            tops.append(None)
            offsets.append(offset)
            continue
        text = _text(chosen[1])
        tokens.append(text)
        values.append(_value(chosen[1]))
        tops.append({_text(lp): _value(lp) for lp in entry.values()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets,
            "next_offset": offset}  # fmt: skip


def chat_logprobs(entries: Sequence[PositionLogprobs], k: int, text: TokenText) -> dict[str, Any]:
    """The chat shape for these tokens, with the `k` most likely alternatives each."""
    content = []
    for entry in entries:
        chosen = _chosen(entry)
        if chosen is None:
            continue
        token_id, lp = chosen
        content.append(
            {
                "token": _text(lp),
                "logprob": _value(lp),
                "bytes": list(text.bytes_of(token_id)),
                "top_logprobs": [
                    {"token": _text(t), "logprob": _value(t), "bytes": list(text.bytes_of(tid))}
                    for tid, t in _top(entry, k)
                ],
            }
        )
    return {"content": content}
