"""The LM head on the CPU path: oneDNN-packed vocabulary chunks, and greedy decoding that never
materialises a greedy row's logits.

`greedy(h)` is `logits(h).argmax(-1)`, the same ids including ties (the lowest id wins, as with
`torch.argmax`), computed chunk by chunk while each chunk's `[S, chunk]` logits are still in cache:

1. per chunk: the logits `y` (one packed matmul), the maximum of every group of `GROUP` columns
   (a vectorised `amax`), the first group holding the chunk's maximum, and that group's `GROUP`
   logits, kept;
2. after the last chunk: the first chunk holding the row's maximum, and the first index of that
   maximum inside the group kept for it.

Each level takes the *first* maximum, so the result is the first index of the row's maximum over
the whole vocabulary. Only `[S, chunks, GROUP]` values outlive a chunk. Half-precision logits are
widened to fp32 for the reductions (exactly; fp32 `amax` is vectorised where bf16's is not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GROUP = 128  # columns per group of the first-level maximum
CHUNK_ROWS = 8192  # vocabulary rows per packed chunk (see docs/benchmarks.md, issue 17)


def pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 64)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T (+ bias)` with the weight as `pack` left it."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLMHead:
    """`weight` [vocab, hidden] split into packed chunks of `chunk_rows` vocabulary rows."""

    def __init__(self, weight: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> None:
        if chunk_rows <= 0 or chunk_rows % GROUP:
            raise ValueError(f"chunk_rows must be a positive multiple of {GROUP}, got {chunk_rows}")
        self.vocab = weight.shape[0]
        self.chunk_rows = chunk_rows
        self.chunks = [pack(weight[i : i + chunk_rows]) for i in range(0, self.vocab, chunk_rows)]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[S, vocab] float32 logits (for the rows that need them: sampling, logprobs)."""
        return torch.cat([packed_linear(h, w) for w in self.chunks], dim=1).float()

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """[S] int64: `logits(h).argmax(-1)`, ties to the lowest id (module docstring)."""
        s, n = h.shape[0], len(self.chunks)
        best = torch.empty(s, n, dtype=torch.float32)  # per chunk: its maximum
        group = torch.empty(s, n, dtype=torch.long)  # per chunk: the first group holding it
        kept = torch.empty(s, n, GROUP, dtype=torch.float32)  # per chunk: that group's logits
        for c, w in enumerate(self.chunks):
            y = packed_linear(h, w)
            if y.dtype != torch.float32:
                y = y.float()
            if y.shape[1] % GROUP:  # a ragged last chunk: -inf columns never hold a first maximum
                y = F.pad(y, (0, GROUP - y.shape[1] % GROUP), value=float("-inf"))
            grouped = y.view(s, -1, GROUP)
            torch.max(grouped.amax(-1), -1, out=(best[:, c], group[:, c]))
            kept[:, c] = grouped.gather(1, group[:, c].view(s, 1, 1).expand(s, 1, GROUP)).view(s, GROUP)
        chunk = best.argmax(-1)  # the first chunk holding the row's maximum
        rows = torch.arange(s)
        within = kept[rows, chunk].argmax(-1)
        return chunk * self.chunk_rows + group[rows, chunk] * GROUP + within
