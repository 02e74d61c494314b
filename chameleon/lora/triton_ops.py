"""Triton SGMV kernels (Punica / S-LoRA style) for segment-grouped batched LoRA.

Imported lazily by `chameleon.lora.ops` only for backend="triton". For CPU tests set
`TRITON_INTERPRET=1` before this module is first imported: the kernels are defined at import time.
The interpreter's bf16 `tl.dot` silently returns garbage, so bf16 tiles are cast to fp32 there.

Launchers take the same arguments as the `ops` functions; argument checks live in `ops`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from chameleon.lora.ops import LoRASegments

# Block sizes: tl.dot needs every tile dim >= 16; tl.arange needs powers of two.
SHRINK_BLOCK_M = 16
SHRINK_BLOCK_K = 64
EXPAND_BLOCK_M = 16
EXPAND_BLOCK_R = 16
EXPAND_BLOCK_N = 64
_MIN_DOT = 16
_MAX_SHRINK_BLOCK_R = 64


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr,
    a_ptr,
    v_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_row_ptr,
    seg_rank_ptr,
    K,
    stride_xm,
    stride_xk,
    stride_am,
    stride_ak,
    stride_vm,
    stride_vr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAST_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """v[start+m, r] = sum_k x[start+m, k] * a_pool[row+r, k] for one (segment, M tile, R tile)."""
    g = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(2)
    seg_len = tl.load(seg_len_ptr + g)
    rank = tl.load(seg_rank_ptr + g)
    # The grid is sized for the longest segment and largest rank: most tiles of short / low-rank
    # segments are empty, so leave before touching memory.
    if pid_m * BLOCK_M >= seg_len or pid_r * BLOCK_R >= rank:
        return
    seg_start = tl.load(seg_start_ptr + g)
    seg_row = tl.load(seg_row_ptr + g)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < seg_len
    r_mask = offs_r < rank
    # int64 before multiplying by strides: row * stride can pass 2^31 on big batches / pools.
    x_rows = (seg_start + offs_m).to(tl.int64)
    a_rows = (seg_row + offs_r).to(tl.int64)
    x_base = x_ptr + x_rows[:, None] * stride_xm  # [BM, 1]
    a_base = a_ptr + a_rows[None, :] * stride_am  # [1, BR]

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        xt = tl.load(x_base + ks[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_base + ks[:, None] * stride_ak, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if CAST_FP32:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc += tl.dot(xt, at, input_precision=DOT_PRECISION)

    v_rows = x_rows  # v shares x's token rows
    v_ptrs = v_ptr + v_rows[:, None] * stride_vm + offs_r[None, :] * stride_vr
    tl.store(v_ptrs, acc.to(v_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _sgmv_expand_kernel(
    v_ptr,
    b_ptr,
    y_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_row_ptr,
    seg_rank_ptr,
    N,
    stride_vm,
    stride_vr,
    stride_bm,
    stride_bn,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAST_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y[start+m, n] += sum_r v[start+m, r] * b_pool[row+r, n] for one (segment, M tile, N tile)."""
    g = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    seg_len = tl.load(seg_len_ptr + g)
    if pid_m * BLOCK_M >= seg_len:
        return
    seg_start = tl.load(seg_start_ptr + g)
    seg_row = tl.load(seg_row_ptr + g)
    rank = tl.load(seg_rank_ptr + g)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < seg_len
    n_mask = offs_n < N
    tok_rows = (seg_start + offs_m).to(tl.int64)
    v_base = v_ptr + tok_rows[:, None] * stride_vm  # [BM, 1]
    b_base = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn  # [1, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # runtime bound: a rank-8 segment does one step
        rs = r0 + offs_r
        r_mask = rs < rank
        vt = tl.load(v_base + rs[None, :] * stride_vr, mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        b_rows = (seg_row + rs).to(tl.int64)
        bt = tl.load(b_base + b_rows[:, None] * stride_bm, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if CAST_FP32:
            vt = vt.to(tl.float32)
            bt = bt.to(tl.float32)
        acc += tl.dot(vt, bt, input_precision=DOT_PRECISION)

    y_ptrs = y_ptr + tok_rows[:, None] * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn
    y_mask = m_mask[:, None] & n_mask[None, :]
    yt = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (yt.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


# Whether the kernels above were defined under TRITON_INTERPRET=1 (decided once, at definition:
# changing the variable later changes nothing for them). Interpreted kernels take CPU tensors.
INTERPRETED: bool = not isinstance(_sgmv_shrink_kernel, JITFunction)


# --- launchers --------------------------------------------------------------------------------


def _cast_fp32(dtype: torch.dtype) -> bool:
    """The interpreter's bf16 tl.dot is broken: compute bf16 tiles in fp32 there."""
    return dtype == torch.bfloat16 and INTERPRETED


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would default to tf32 on GPU (~1e-3 rel. error); LoRA is memory-bound, keep ieee.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_devices(t: torch.Tensor, segs: LoRASegments) -> None:
    if not INTERPRETED and t.device.type != "cuda":
        raise ValueError("the triton LoRA backend needs CUDA tensors (or TRITON_INTERPRET=1 at import)")
    if segs.seg_start.device != t.device:
        raise ValueError(f"segment metadata is on {segs.seg_start.device}, tensors on {t.device}")


def _shrink_block_r(max_rank: int) -> int:
    """One R tile per segment up to rank 64 so x is read once; 16..64, a power of two."""
    return min(max(_MIN_DOT, triton.next_power_of_2(max_rank)), _MAX_SHRINK_BLOCK_R)


def lora_shrink(x: torch.Tensor, a_pool: torch.Tensor, segs: LoRASegments) -> torch.Tensor:
    """Triton SGMV shrink: v[T, max_rank], zero outside segments and beyond each segment's rank."""
    v = torch.zeros(segs.num_tokens, segs.max_rank, dtype=x.dtype, device=x.device)
    if segs.num_segments == 0 or segs.max_seg_len == 0:
        return v
    _check_devices(x, segs)
    block_r = _shrink_block_r(segs.max_rank)
    grid = (
        segs.num_segments,
        triton.cdiv(segs.max_seg_len, SHRINK_BLOCK_M),
        triton.cdiv(segs.max_rank, block_r),
    )
    _sgmv_shrink_kernel[grid](
        x,
        a_pool,
        v,
        segs.seg_start,
        segs.seg_len,
        segs.seg_row,
        segs.seg_rank,
        x.shape[1],
        x.stride(0),
        x.stride(1),
        a_pool.stride(0),
        a_pool.stride(1),
        v.stride(0),
        v.stride(1),
        BLOCK_M=SHRINK_BLOCK_M,
        BLOCK_R=block_r,
        BLOCK_K=SHRINK_BLOCK_K,
        CAST_FP32=_cast_fp32(x.dtype),
        DOT_PRECISION=_dot_precision(x.dtype),
    )
    return v


def lora_expand(y: torch.Tensor, v: torch.Tensor, b_pool: torch.Tensor, segs: LoRASegments) -> None:
    """Triton SGMV expand, in place: y[t] += v[t, :rank] @ Bt_s. Any y strides (column-slice views)."""
    if segs.num_segments == 0 or segs.max_seg_len == 0 or y.shape[1] == 0:
        return
    _check_devices(y, segs)
    grid = (
        segs.num_segments,
        triton.cdiv(segs.max_seg_len, EXPAND_BLOCK_M),
        triton.cdiv(y.shape[1], EXPAND_BLOCK_N),
    )
    _sgmv_expand_kernel[grid](
        v,
        b_pool,
        y,
        segs.seg_start,
        segs.seg_len,
        segs.seg_row,
        segs.seg_rank,
        y.shape[1],
        v.stride(0),
        v.stride(1),
        b_pool.stride(0),
        b_pool.stride(1),
        y.stride(0),
        y.stride(1),
        BLOCK_M=EXPAND_BLOCK_M,
        BLOCK_R=EXPAND_BLOCK_R,
        BLOCK_N=EXPAND_BLOCK_N,
        CAST_FP32=_cast_fp32(y.dtype),
        DOT_PRECISION=_dot_precision(y.dtype),
    )


def lora_apply(
    y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor, segs: LoRASegments
) -> None:
    """Shrink then expand (two launches); the [T, max_rank] v buffer is the only allocation."""
    if segs.num_segments == 0:
        return
    lora_expand(y, lora_shrink(x, a_pool, segs), b_pool, segs)
