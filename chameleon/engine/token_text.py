"""One token's text and bytes, for logprobs: what vLLM calls `decoded_token`, and OpenAI's `bytes`.

`token_text` is the token decoded alone (`tokenizer.decode([id])`, as vLLM does), so a token that
holds part of a multi-byte character reads as U+FFFD. `token_bytes` gives the token's exact bytes
where the tokenizer is byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen2: the vocabulary spells bytes
with printable stand-ins), so a client can join the bytes of consecutive tokens into the real
characters; elsewhere it is the UTF-8 of `token_text`. Both are cached per id (bounded by the
vocabulary).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from chameleon.executor.base import TokenLogprobs
from chameleon.outputs import Logprob, PositionLogprobs


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-printable-character table, inverted (the stand-in character -> its byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


class TokenText:
    """Cached text and bytes of single tokens (no tokenizer: `None` text, empty bytes)."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer: Any = tokenizer
        self._byte_level = tokenizer is not None and _byte_level(tokenizer)
        self._special: set[int] = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self._text: dict[int, str | None] = {}
        self._bytes: dict[int, bytes] = {}

    def text_of(self, token_id: int) -> str | None:
        if token_id not in self._text:
            self._text[token_id] = None if self.tokenizer is None else self._decode(token_id)
        return self._text[token_id]

    def bytes_of(self, token_id: int) -> bytes:
        if token_id not in self._bytes:
            self._bytes[token_id] = self._exact_bytes(token_id)
        return self._bytes[token_id]

    def position(self, lp: TokenLogprobs) -> PositionLogprobs:
        """The executor's numbers as vLLM's `{token id: Logprob}`: the chosen token first."""
        out = {lp.token_id: Logprob(lp.logprob, lp.rank, self.text_of(lp.token_id))}
        for rank, (tid, value) in enumerate(zip(lp.top_ids, lp.top_logprobs, strict=True), start=1):
            if tid not in out:
                out[tid] = Logprob(value, rank, self.text_of(tid))
        return out

    def _decode(self, token_id: int) -> str:
        try:
            return str(self.tokenizer.decode([token_id]))
        except (ValueError, TypeError, IndexError, KeyError, OverflowError):  # an id it has no entry for
            return f"<token {token_id}>"

    def _exact_bytes(self, token_id: int) -> bytes:
        if self._byte_level and token_id not in self._special:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            table = _byte_decoder()
            if isinstance(piece, str) and piece and all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return (self.text_of(token_id) or "").encode("utf-8")
