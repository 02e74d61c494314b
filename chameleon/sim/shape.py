"""The shape of one iteration's batch, as a cost model sees it, and the `CostModel` protocol.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs


@attrs.frozen
class BatchShape:
    """What an iteration's cost depends on, aggregated over its sequences (no request objects)."""

    num_seqs: int
    num_tokens: int  # new tokens computed this iteration, all sequences
    prefill_seqs: int
    prefill_tokens: int
    prefill_attention_pairs: int  # Σ over prefill chunks of (query, key) pairs
    decode_seqs: int
    decode_context_tokens: int  # Σ context (keys attended) of the decoding sequences
    context_tokens: int  # Σ over all sequences of computed + new tokens: KV read
    attention_pairs: int  # Σ over all sequences of (query, key) pairs
    sampled: int  # rows that sample a token (LM head + sampler)
    lora_token_ranks: int  # Σ new_tokens · rank over sequences with an adapter
    lora_adapter_ranks: int  # Σ rank over the distinct adapters of the batch
    lora_adapters: int = 0  # distinct adapters in the batch (LoRA segments)

    @classmethod
    def single_prefill(cls, tokens: int, rank: int = 0) -> BatchShape:
        """One request's whole prompt in one iteration (an unloaded TTFT)."""
        b = BatchShapeBuilder()
        b.add(tokens, 0, rank, "a" if rank else None, samples=True, decode=False)
        return b.build()

    @classmethod
    def decode(cls, seqs: int, context: int, rank: int = 0) -> BatchShape:
        """`seqs` sequences decoding one token each, every one with `context` tokens of context."""
        b = BatchShapeBuilder()
        for i in range(seqs):
            b.add(1, context - 1, rank, f"a{i}" if rank else None, samples=True, decode=True)
        return b.build()


class BatchShapeBuilder:
    """Accumulates a `BatchShape` one sequence at a time (plain ints: it runs every iteration)."""

    __slots__ = ("_adapters", "_v")

    def __init__(self) -> None:
        # num_seqs, num_tokens, prefill_seqs, prefill_tokens, prefill_pairs, decode_seqs,
        # decode_ctx, context, pairs, sampled, lora_token_ranks
        self._v = [0] * 11
        self._adapters: dict[Any, int] = {}

    def add(self, new_tokens: int, computed: int, rank: int, adapter: Any, *, samples: bool, decode: bool) -> None:
        v = self._v
        context = computed + new_tokens
        pairs = new_tokens * computed + new_tokens * (new_tokens + 1) // 2
        v[0] += 1
        v[1] += new_tokens
        if decode:
            v[5] += 1
            v[6] += context
        else:
            v[2] += 1
            v[3] += new_tokens
            v[4] += pairs
        v[7] += context
        v[8] += pairs
        v[9] += samples
        if rank and adapter is not None:
            v[10] += new_tokens * rank
            self._adapters[adapter] = rank

    def build(self) -> BatchShape:
        v = self._v
        return BatchShape(
            num_seqs=v[0],
            num_tokens=v[1],
            prefill_seqs=v[2],
            prefill_tokens=v[3],
            prefill_attention_pairs=v[4],
            decode_seqs=v[5],
            decode_context_tokens=v[6],
            context_tokens=v[7],
            attention_pairs=v[8],
            sampled=v[9],
            lora_token_ranks=v[10],
            lora_adapter_ranks=sum(self._adapters.values()),
            lora_adapters=len(self._adapters),
        )


class CostModel(Protocol):
    def iteration_s(self, shape: BatchShape) -> float:
        """Seconds one iteration of this shape takes."""
        ...

    def load_s(self, nbytes: int) -> float:
        """Seconds to copy `nbytes` of adapter weights host -> device."""
        ...

    def time_factor(self, u: float) -> float:
        """Multiplicative variability of one iteration's time, for `u` uniform in [0, 1)."""
        ...
