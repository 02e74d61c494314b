"""Segment-grouped batched LoRA: shrink `v = x·Aᵀ`, expand `y += v·(Bᵀ·scale)` (SPEC §4).

Adapters of mixed ranks live in a row pool per (layer, target module), S-LoRA style:
`a_pool[R_total, in]` holds lora_A rows, `b_pool[R_total, out]` holds lora_Bᵀ·scale rows; adapter
slot s owns rows `row[s] : row[s] + rank[s]` of both. Token rows of a batch are grouped into
segments of consecutive rows sharing one adapter (`LoRASegments`); rows outside every segment get
no LoRA delta.

Two backends: "torch" (per-segment matmuls driven by python-side metadata, never syncs the
device; the CPU serving path) and "triton" (SGMV kernels in `triton_ops`, imported lazily).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
import torch

Backend = Literal["torch", "triton"]
_BACKENDS: tuple[str, ...] = ("torch", "triton")


@attrs.frozen
class LoRASegments:
    """Adapter segments of one batch: device tensors for kernels, python tuples for the torch path."""

    seg_start: torch.Tensor  # int32 [G]: first token row of each segment
    seg_len: torch.Tensor  # int32 [G]: number of token rows
    seg_row: torch.Tensor  # int32 [G]: pool row offset of the segment's adapter
    seg_rank: torch.Tensor  # int32 [G]: adapter rank (>= 1)
    max_rank: int  # max of seg_rank, 0 if G == 0
    num_tokens: int  # T
    starts: tuple[int, ...]
    lens: tuple[int, ...]
    rows: tuple[int, ...]
    ranks: tuple[int, ...]

    @classmethod
    def build(
        cls,
        starts: Sequence[int],
        lens: Sequence[int],
        rows: Sequence[int],
        ranks: Sequence[int],
        num_tokens: int,
        device: torch.device | str | None = None,
    ) -> LoRASegments:
        """Validate the metadata and copy it to `device` (one small H2D copy per field)."""
        st, ln, rw, rk = (tuple(int(v) for v in seq) for seq in (starts, lens, rows, ranks))
        _validate(st, ln, rw, rk, int(num_tokens))
        dev = torch.device(device) if device is not None else torch.device("cpu")

        def _t(vals: tuple[int, ...]) -> torch.Tensor:
            return torch.tensor(vals, dtype=torch.int32, device=dev)

        return cls(
            seg_start=_t(st),
            seg_len=_t(ln),
            seg_row=_t(rw),
            seg_rank=_t(rk),
            max_rank=max(rk, default=0),
            num_tokens=int(num_tokens),
            starts=st,
            lens=ln,
            rows=rw,
            ranks=rk,
        )

    @property
    def num_segments(self) -> int:
        return len(self.starts)

    @property
    def max_seg_len(self) -> int:
        return max(self.lens, default=0)

    @property
    def pool_rows_needed(self) -> int:
        """Smallest pool height that holds every referenced adapter row."""
        return max((r + k for r, k in zip(self.rows, self.ranks)), default=0)

    def is_single_full(self) -> bool:
        """True when one segment covers every token row: the one-matmul-pair fast path."""
        return len(self.starts) == 1 and self.starts[0] == 0 and self.lens[0] == self.num_tokens


def _validate(
    starts: tuple[int, ...],
    lens: tuple[int, ...],
    rows: tuple[int, ...],
    ranks: tuple[int, ...],
    num_tokens: int,
) -> None:
    if not len(starts) == len(lens) == len(rows) == len(ranks):
        raise ValueError(
            f"segment metadata lengths differ: {len(starts)}, {len(lens)}, {len(rows)}, {len(ranks)}"
        )
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    for s, n, r, k in zip(starts, lens, rows, ranks):
        if n < 0 or s < 0 or s + n > num_tokens:
            raise ValueError(f"segment [{s}, {s}+{n}) is outside token rows [0, {num_tokens})")
        if k < 1 or r < 0:
            raise ValueError(f"segment at row {r} has invalid rank {k}")
    spans = sorted(zip(starts, lens))
    for (s0, n0), (s1, _) in zip(spans, spans[1:]):
        if s0 + n0 > s1:
            raise ValueError(f"segments starting at {s0} and {s1} overlap")


# --- argument checks (python attributes only: no device work) ---------------------------------


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown LoRA backend {backend!r}; expected one of {_BACKENDS}")


def _check_pool(name: str, pool: torch.Tensor, width: int, segs: LoRASegments) -> None:
    if pool.dim() != 2 or pool.shape[1] != width:
        raise ValueError(f"{name} must be [R_total, {width}], got {tuple(pool.shape)}")
    if pool.shape[0] < segs.pool_rows_needed:
        raise ValueError(f"{name} has {pool.shape[0]} rows, segments need {segs.pool_rows_needed}")


def _check_shrink(x: torch.Tensor, a_pool: torch.Tensor, segs: LoRASegments) -> None:
    if x.dim() != 2 or x.shape[0] != segs.num_tokens:
        raise ValueError(f"x must be [{segs.num_tokens}, in], got {tuple(x.shape)}")
    _check_pool("a_pool", a_pool, x.shape[1], segs)
    if a_pool.dtype != x.dtype or a_pool.device != x.device:
        raise ValueError(f"a_pool ({a_pool.dtype}, {a_pool.device}) must match x ({x.dtype}, {x.device})")


def _check_y(y: torch.Tensor, x: torch.Tensor, b_pool: torch.Tensor, segs: LoRASegments) -> None:
    """`y` is [T, out] and shares dtype/device with `x` (or v) and `b_pool`."""
    if y.dim() != 2 or y.shape[0] != segs.num_tokens:
        raise ValueError(f"y must be [{segs.num_tokens}, out], got {tuple(y.shape)}")
    _check_pool("b_pool", b_pool, y.shape[1], segs)
    if not (y.dtype == x.dtype == b_pool.dtype) or not (y.device == x.device == b_pool.device):
        raise ValueError(f"y ({y.dtype}), x ({x.dtype}) and b_pool ({b_pool.dtype}) must match")


def _check_expand(y: torch.Tensor, v: torch.Tensor, b_pool: torch.Tensor, segs: LoRASegments) -> None:
    _check_y(y, v, b_pool, segs)
    if v.dim() != 2 or v.shape[0] != segs.num_tokens or v.shape[1] < segs.max_rank:
        raise ValueError(f"v must be [{segs.num_tokens}, >= {segs.max_rank}], got {tuple(v.shape)}")


# --- public API -------------------------------------------------------------------------------


def lora_shrink(
    x: torch.Tensor, a_pool: torch.Tensor, segs: LoRASegments, *, backend: Backend = "torch"
) -> torch.Tensor:
    """v[T, max_rank] with v[t, :rank] = x[t] @ A_sᵀ for rows in a segment; every other entry 0."""
    _check_backend(backend)
    _check_shrink(x, a_pool, segs)
    if backend == "triton":
        from chameleon.lora import triton_ops  # lazy: triton must not load on the CPU path

        return triton_ops.lora_shrink(x, a_pool, segs)
    return _torch_shrink(x, a_pool, segs)


def lora_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    b_pool: torch.Tensor,
    segs: LoRASegments,
    *,
    backend: Backend = "torch",
) -> None:
    """In place: y[t] += v[t, :rank] @ Bt_s for rows in a segment. `y` may be a column-slice view."""
    _check_backend(backend)
    _check_expand(y, v, b_pool, segs)
    if segs.num_segments == 0:
        return
    if backend == "triton":
        from chameleon.lora import triton_ops

        triton_ops.lora_expand(y, v, b_pool, segs)
        return
    _torch_expand(y, v, b_pool, segs)


def lora_apply(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    segs: LoRASegments,
    *,
    backend: Backend = "torch",
) -> None:
    """In place: y += LoRA delta of x (shrink then expand). No-op when the batch has no segments."""
    _check_backend(backend)
    if segs.num_segments == 0:
        return
    _check_shrink(x, a_pool, segs)
    _check_y(y, x, b_pool, segs)
    if backend == "triton":
        from chameleon.lora import triton_ops

        triton_ops.lora_apply(y, x, a_pool, b_pool, segs)
        return
    _torch_apply(y, x, a_pool, b_pool, segs)


def reference_lora(
    x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor, segs: LoRASegments
) -> torch.Tensor:
    """Float64 LoRA delta [T, out] by a plain loop over segments; the tests' ground truth."""
    x64, a64, b64 = x.double().cpu(), a_pool.double().cpu(), b_pool.double().cpu()
    out = torch.zeros(x.shape[0], b_pool.shape[1], dtype=torch.float64)
    for s, n, r, k in zip(segs.starts, segs.lens, segs.rows, segs.ranks):
        out[s : s + n] = x64[s : s + n] @ a64[r : r + k].T @ b64[r : r + k]
    return out


# --- torch path -------------------------------------------------------------------------------
# Per-segment matmuls over views; python tuples drive the loop so the device is never synced.


def _torch_shrink(x: torch.Tensor, a_pool: torch.Tensor, segs: LoRASegments) -> torch.Tensor:
    if segs.is_single_full():
        r, k = segs.rows[0], segs.ranks[0]
        return x @ a_pool[r : r + k].T  # max_rank == k: the product is the whole of v
    v = x.new_zeros(segs.num_tokens, segs.max_rank)
    for s, n, r, k in zip(segs.starts, segs.lens, segs.rows, segs.ranks):
        if n:
            v[s : s + n, :k].addmm_(x[s : s + n], a_pool[r : r + k].T)  # v is zero: += is =
    return v


def _torch_expand(y: torch.Tensor, v: torch.Tensor, b_pool: torch.Tensor, segs: LoRASegments) -> None:
    for s, n, r, k in zip(segs.starts, segs.lens, segs.rows, segs.ranks):
        if n:
            y[s : s + n].addmm_(v[s : s + n, :k], b_pool[r : r + k])


def _torch_apply(
    y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor, segs: LoRASegments
) -> None:
    if segs.is_single_full():
        r, k = segs.rows[0], segs.ranks[0]
        y.addmm_(x @ a_pool[r : r + k].T, b_pool[r : r + k])
        return
    # Fused per segment: only a [n, rank] temporary, no [T, max_rank] v buffer.
    for s, n, r, k in zip(segs.starts, segs.lens, segs.rows, segs.ranks):
        if n:
            y[s : s + n].addmm_(x[s : s + n] @ a_pool[r : r + k].T, b_pool[r : r + k])
