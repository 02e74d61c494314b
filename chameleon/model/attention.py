"""Attention over a paged KV cache, batched across sequences without Python loops per sequence.

A step mixes prefill chunks (many query tokens) and decodes (one query token). We split the batch
into those two groups so a long prompt does not pad every decode row to its length, and run one
attention call per group:

* decodes: keys gathered through the block tables (`index_select` on the flat slot cache, one copy
  per layer), the query rows of a decode-only batch used in place;
* prefills without a cached prefix (`fresh`: the whole context is this step's tokens, the common
  case) attend to this step's own K/V, never gathered back from the cache; a single fresh prefill
  is plain causal attention with no mask at all;
* prefill chunks that continue a sequence (chunked prefill, recompute after preemption) gather
  their keys through the block tables like decodes.

All metadata is built once per step with tensor ops (no loop per token) and shared by the layers,
masks included: additive (0 / -inf) in the model's dtype, the form SDPA would otherwise convert a
bool mask to in every layer. fp32 uses torch's fused SDPA kernel (the parity tests pin its tokens
to transformers); for decodes the query heads sharing a KV head are passed as that head's query
rows, so the kernel sees B·KVH problems instead of B·H (1.5-1.8x faster on CPU at SmolLM2's
shapes; the same math, last-bit differences like any change of matmul shape), in every dtype:
folded, the fused kernel is also 2x faster than eager bf16 at decode shapes. Other bf16/fp16 cases
(prefill, decode without GQA) use the eager formulation transformers also has (matmul, fp32
softmax, matmul), which on CPU is faster than the fused kernel there.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
import torch.nn.functional as F

from chameleon.model import cpu_kernels
from chameleon.model.kv_quant import KVCache, read_kv, write_kv


@attrs.frozen
class SeqGroup:
    """Some sequences of the batch, padded to [B, Q] queries and [B, K] keys."""

    b: int
    q: int  # padded queries per sequence
    k: int  # padded keys per sequence
    rows: torch.Tensor | slice  # [B*Q] flat-batch rows of the padded queries (padding -> row 0), or a slice
    kv_slots: torch.Tensor | None  # [B*K] cache slots of the keys; None: `fresh`, keys are this step's rows
    mask: torch.Tensor | None  # [B, 1, Q, K] additive: 0 where a query may attend, -inf elsewhere; None: none
    causal: bool  # plain causal attention (one fresh sequence, no padding): mask is None
    out_rows: torch.Tensor | slice  # rows of the flat batch this group produces
    out_index: torch.Tensor | None  # [N] positions of those rows in the padded [B*Q] layout; None: all
    # Decodes only, for the CPU kernel that reads K/V in place (model/cpu_kernels.py): per sequence
    # its query row, block table and context length (int64, on the CPU). None: not a decode group.
    paged: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None  # (rows, tables, ctx, block)


@attrs.frozen
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    groups: tuple[SeqGroup, ...]
    num_tokens: int


def _table_tensor(block_tables: Sequence[Sequence[int]]) -> torch.Tensor:
    nblk = max(len(t) for t in block_tables)
    return torch.tensor([[*t, *([0] * (nblk - len(t)))] for t in block_tables], dtype=torch.long)


def _additive(allowed: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The float mask SDPA would make from a bool one (0 / -inf), made once per step, not per layer."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf")).to(device)


def _contiguous_rows(rows: list[int]) -> slice | None:
    if rows and rows[-1] - rows[0] == len(rows) - 1:
        return slice(rows[0], rows[-1] + 1)
    return None


def _decode_group(
    idx: list[int],
    starts: list[int],
    ctx: torch.Tensor,
    tables: torch.Tensor,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> SeqGroup:
    b = len(idx)
    rows_list = [starts[i] for i in idx]
    sel = torch.tensor(idx, dtype=torch.long)
    c, seq_tables = ctx[sel], tables[sel]
    k_max = int(c.max())
    j = torch.arange(k_max)
    kv_slots = seq_tables[:, j // block_size] * block_size + j % block_size  # [B, K]
    mask = None
    if int(c.min()) != k_max:
        valid = j[None, :] < c[:, None]
        kv_slots = torch.where(valid, kv_slots, 0)  # padding reads slot 0 (masked out)
        mask = _additive(valid[:, None, None, :], dtype, device)
    rows: torch.Tensor | slice = _contiguous_rows(rows_list) or torch.tensor(rows_list, dtype=torch.long, device=device)
    paged = None
    if device.type == "cpu":
        nblk = -(-k_max // block_size)
        paged = (torch.tensor(rows_list, dtype=torch.long), seq_tables[:, :nblk].contiguous(), c, block_size)
    return SeqGroup(b=b, q=1, k=k_max, rows=rows, kv_slots=kv_slots.view(-1).to(device), mask=mask,
                    causal=False, out_rows=rows, out_index=None, paged=paged)


Window = tuple[int, int, int, int]  # (sink tokens, recent tokens, evicted tokens, block size): executor.base.WindowView
_NO_WINDOW = (0, 1 << 40, 0, 1)


def _window_mask(
    windows: Sequence[Window | None], q_start: torch.Tensor, q_max: int, k_max: int
) -> torch.Tensor | None:
    """[B, Q, K] True where bounded-window KV lets query i see cached key j (compact indices: the
    evicted tokens are not in the cache), or None when the windows hide nothing here.

    Query i sits at position p = q_start + i; key j at position j, or j + evicted past the sinks.
    The query sees the sinks and the keys from ((p - recent) // block) * block on: the blocks that
    `KVBlockManager` keeps for a query at p, so a prefill chunk sees exactly what a decode would."""
    if all(w is None for w in windows):
        return None
    sink, recent, evicted, block = (torch.tensor(col, dtype=torch.long)[:, None] for col in
                                    zip(*(w or _NO_WINDOW for w in windows), strict=True))
    p = (q_start[:, None] + evicted) + torch.arange(q_max)[None, :]  # [B, Q] positions
    lo = torch.div(p - recent, block, rounding_mode="floor") * block  # [B, Q] first recent position
    j = torch.arange(k_max)[None, :]
    key_pos = j + evicted * (j >= sink)  # [B, K]
    seen = (key_pos < sink)[:, None, :] | (key_pos[:, None, :] >= lo[:, :, None])
    return None if bool(seen.all()) else seen


def _prefill_group(
    idx: list[int],
    starts: list[int],
    q_lens: torch.Tensor,
    ctx: torch.Tensor,
    tables: torch.Tensor,
    block_size: int,
    device: torch.device,
    windows: Sequence[Window | None],
    dtype: torch.dtype,
) -> SeqGroup:
    b = len(idx)
    sel = torch.tensor(idx, dtype=torch.long)
    ql, c = q_lens[sel], ctx[sel]
    q_max = int(ql.max())
    fresh = bool((ql == c).all())
    if fresh:
        k_max, kv_slots = q_max, None  # keys are the (padded) queries' own rows
    else:
        k_max = int(c.max())
        j = torch.arange(k_max)
        kv_slots = (tables[sel][:, j // block_size] * block_size + j % block_size).view(-1).to(device)
    windowed = _window_mask([windows[i] for i in idx], c - ql, q_max, k_max)
    if b == 1:
        rows = slice(starts[idx[0]], starts[idx[0]] + q_max)
        if fresh and windowed is None:  # plain causal attention over this step's tokens
            return SeqGroup(b=1, q=q_max, k=q_max, rows=rows, kv_slots=None, mask=None, causal=True,
                            out_rows=rows, out_index=None)
    qi = torch.arange(q_max)
    q_valid = qi[None, :] < ql[:, None]  # [B, Q]
    q_pos = (c - ql)[:, None] + qi[None, :]  # query i of a sequence sits at position ctx - q_len + i
    j = torch.arange(k_max)
    mask = j[None, None, :] <= q_pos[:, :, None]  # causal; keys past a context are never <= q_pos
    if windowed is not None:
        mask &= windowed
    mask |= ~q_valid[:, :, None] & (j[None, None, :] == 0)  # padding rows see one key: no NaNs
    mask = _additive(mask[:, None], dtype, device)
    if b == 1:
        return SeqGroup(b=1, q=q_max, k=k_max, rows=rows, kv_slots=kv_slots, mask=mask, causal=False,
                        out_rows=rows, out_index=None)
    first_row = torch.tensor([starts[i] for i in idx], dtype=torch.long)
    token_index = torch.where(q_valid, first_row[:, None] + qi[None, :], 0)
    flat = torch.arange(b * q_max).view(b, q_max)
    return SeqGroup(
        b=b,
        q=q_max,
        k=k_max,
        rows=token_index.view(-1).to(device),
        kv_slots=kv_slots,
        mask=mask,
        causal=False,
        out_rows=token_index[q_valid].to(device),
        out_index=flat[q_valid].to(device),
    )


def build_attention_metadata(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device,
    windows: Sequence[Window | None] | None = None,
    dtype: torch.dtype = torch.float32,
) -> AttentionMetadata:
    """Sequences are laid out back to back in the flat batch, in the order given.

    `context_lens[i]` counts every token of sequence i whose K/V is in the cache after this step's
    writes (under a bounded window, `windows[i]`, the evicted tokens are not counted). A decode
    attends to all of them (the block manager keeps exactly its window); a prefill chunk's later
    queries are masked to their own windows. `dtype` is the model's: masks are made in it (another
    dtype works, at one conversion per layer).
    """
    n = len(query_lens)
    q_lens = torch.tensor(query_lens, dtype=torch.long)
    ctx = torch.tensor(context_lens, dtype=torch.long)
    tables = _table_tensor(block_tables)
    starts, pos = [], 0
    for q in query_lens:
        starts.append(pos)
        pos += q
    num_tokens = pos
    # Slot of every new token: positions ctx - q_len ... ctx - 1 of its sequence.
    if num_tokens == n:  # one token per sequence (decodes)
        seq, tok_pos = torch.arange(n), ctx - 1
    else:
        seq = torch.repeat_interleave(torch.arange(n), q_lens)
        offset = torch.arange(num_tokens) - torch.tensor(starts, dtype=torch.long)[seq]
        tok_pos = (ctx - q_lens)[seq] + offset
    slot_mapping = tables[seq, tok_pos // block_size] * block_size + tok_pos % block_size
    groups = []
    decode_idx = [i for i, q in enumerate(query_lens) if q == 1]
    prefill_idx = [i for i, q in enumerate(query_lens) if q != 1]
    if decode_idx:
        groups.append(_decode_group(decode_idx, starts, ctx, tables, block_size, device, dtype))
    if prefill_idx:
        groups.append(_prefill_group(prefill_idx, starts, q_lens, ctx, tables, block_size, device,
                                     windows or [None] * n, dtype))
    return AttentionMetadata(slot_mapping.to(device), tuple(groups), num_tokens)


def _rows(x: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _attend(
    q: torch.Tensor,  # [B, H, Q, D]
    k: torch.Tensor,  # [B, KVH, K, D]
    v: torch.Tensor,
    mask: torch.Tensor | None,  # [B, 1, Q, K] additive (0 / -inf)
    causal: bool,
    scale: float,
) -> torch.Tensor:  # [B, H, Q, D]
    if mask is not None and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)  # 0 and -inf are exact in every float dtype
    b, h, qn, d = q.shape
    kvh = k.shape[1]
    if qn == 1 and h != kvh:
        # Decode with GQA (any dtype): the query heads that share a KV head become that head's query
        # rows, so the kernel runs B·KVH (not B·H) tiny problems; the per-key mask broadcasts over
        # the rows. In bf16 this is 2x faster than the eager path below and keeps fp32 accumulation.
        qg = q.reshape(b, kvh, h // kvh, d)
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale).view(b, h, 1, d)
    if q.dtype == torch.float32 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    # Eager GQA (transformers' eager_attention_forward): half-precision matmuls, fp32 softmax.
    kn = k.shape[2]
    qg = q.reshape(b, kvh, (h // kvh) * qn, d)  # heads of one KV head share its keys
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(b, kvh, h // kvh, qn, kn).float() * scale
    if causal:
        allowed = torch.ones(qn, kn, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif mask is not None:  # x + 0 = x and x + -inf = -inf: the same scores as a masked_fill
        scores = scores + mask.view(mask.shape[0], 1, 1, *mask.shape[-2:])
    p = scores.softmax(-1).to(q.dtype).view(b, kvh, (h // kvh) * qn, kn)
    return torch.matmul(p, v).view(b, h, qn, d)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D] this step's keys
    v: torch.Tensor,  # [T, KVH, D]
    k_cache: KVCache,  # [num_slots, KVH, D] (or int8/fp8 codes with scales: model/kv_quant.py)
    v_cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
    *,
    out_rows: int | None = None,  # rows of the result: T, or more (zero rows appended)
) -> torch.Tensor:  # [out_rows, H*D]
    write_kv(k_cache, meta.slot_mapping, k)
    write_kv(v_cache, meta.slot_mapping, v)
    t, h, d = q.shape
    kvh = k.shape[1]
    rows = t if out_rows is None else out_rows
    only = meta.groups[0]
    if len(meta.groups) == 1 and isinstance(only.out_rows, slice) and only.out_rows == slice(0, t) and rows == t:
        # Every row of the batch, in order: no gather, no scatter.
        return _group(q, k, v, k_cache, v_cache, only, scale, h, kvh, d).reshape(t, h * d)
    out = q.new_empty(rows, h * d)
    if rows > t:
        out[t:].zero_()
    for g in meta.groups:
        o = _group(q, k, v, k_cache, v_cache, g, scale, h, kvh, d).reshape(g.b * g.q, h * d)
        if g.out_index is not None:
            o = o.index_select(0, g.out_index)
        if isinstance(g.out_rows, slice):
            out[g.out_rows] = o
        else:
            out.index_copy_(0, g.out_rows, o)
    return out


def _kernel_reads(k_cache: KVCache, v_cache: KVCache, q: torch.Tensor) -> bool:
    """Whether the CPU kernel can read these caches in place: plain (unquantized) tensors of q's dtype."""
    return (
        isinstance(k_cache, torch.Tensor)
        and isinstance(v_cache, torch.Tensor)
        and k_cache.dtype == q.dtype
        and q.device.type == "cpu"
        and cpu_kernels.available(q.dtype)
    )


def _group(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: KVCache,
    v_cache: KVCache,
    g: SeqGroup,
    scale: float,
    h: int,
    kvh: int,
    d: int,
) -> torch.Tensor:  # [B, Q, H, D]
    if g.paged is not None and _kernel_reads(k_cache, v_cache, q):
        rows, tables, ctx, block = g.paged
        out = cpu_kernels.paged_decode(q, rows, k_cache, v_cache, tables, ctx, block, scale)  # type: ignore[arg-type]
        return out.view(g.b, 1, h, d)
    qg = _rows(q, g.rows).view(g.b, g.q, h, d).transpose(1, 2)
    if g.kv_slots is None:
        kg, vg = _rows(k, g.rows), _rows(v, g.rows)
    else:
        kg, vg = read_kv(k_cache, g.kv_slots, q.dtype), read_kv(v_cache, g.kv_slots, q.dtype)
    kg = kg.view(g.b, g.k, kvh, d).transpose(1, 2)
    vg = vg.view(g.b, g.k, kvh, d).transpose(1, 2)
    return _attend(qg, kg, vg, g.mask, g.causal, scale).transpose(1, 2)
