"""Attention over a paged KV cache, batched across sequences without Python loops per sequence.

A step mixes prefill chunks (many query tokens) and decodes (one query token). We split the batch
into those two groups so a long prompt does not pad every decode row to its length, and run one
`scaled_dot_product_attention` call per group over keys gathered through the block tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
import torch.nn.functional as F


@attrs.frozen
class SeqGroup:
    """Padded view of some sequences of the batch: queries [B, Q] and keys [B, K]."""

    token_index: torch.Tensor  # [B, Q] rows of the flat token batch (padding points at row 0)
    kv_slots: torch.Tensor  # [B, K] flat KV slots (padding points at slot 0)
    mask: torch.Tensor  # [B, 1, Q, K] True where a query may attend to a key
    out_rows: torch.Tensor  # [N] rows of the flat batch this group produces
    out_flat: torch.Tensor  # [N] the same rows' positions in the padded [B*Q] layout


@attrs.frozen
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    groups: tuple[SeqGroup, ...]


def _seq_group(
    query_starts: Sequence[int],
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device,
) -> SeqGroup:
    b = len(query_lens)
    q_max, k_max = max(query_lens), max(context_lens)
    nblk = max(len(t) for t in block_tables)
    tables = torch.zeros(b, nblk, dtype=torch.long)
    for i, t in enumerate(block_tables):
        tables[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    j = torch.arange(k_max)
    kv_slots = tables[:, j // block_size] * block_size + j % block_size  # [B, K]

    qi = torch.arange(q_max)
    q_len = torch.tensor(query_lens)
    ctx = torch.tensor(context_lens)
    q_valid = qi[None, :] < q_len[:, None]  # [B, Q]
    token_index = torch.where(q_valid, torch.tensor(query_starts)[:, None] + qi[None, :], 0)
    # Query i of a sequence sits at position ctx - q_len + i and sees keys at positions <= its own.
    q_pos = (ctx - q_len)[:, None] + qi[None, :]
    mask = j[None, None, :] <= q_pos[:, :, None]
    mask |= ~q_valid[:, :, None] & (j[None, None, :] == 0)  # padding rows see one key: no NaNs
    flat = torch.arange(b * q_max).view(b, q_max)
    return SeqGroup(
        token_index=token_index.to(device),
        kv_slots=kv_slots.to(device),
        mask=mask[:, None].to(device),
        out_rows=token_index[q_valid].to(device),
        out_flat=flat[q_valid].to(device),
    )


def build_attention_metadata(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """Sequences are laid out back to back in the flat batch, in the order given.

    `context_lens[i]` counts every token of sequence i whose K/V exists after this step's writes.
    """
    starts, slots, pos = [], [], 0
    for q_len, ctx, table in zip(query_lens, context_lens, block_tables, strict=True):
        starts.append(pos)
        for p in range(ctx - q_len, ctx):
            slots.append(table[p // block_size] * block_size + p % block_size)
        pos += q_len
    groups = []
    for want_decode in (True, False):
        idx = [i for i, q in enumerate(query_lens) if (q == 1) == want_decode]
        if idx:
            groups.append(
                _seq_group(
                    [starts[i] for i in idx],
                    [query_lens[i] for i in idx],
                    [context_lens[i] for i in idx],
                    [block_tables[i] for i in idx],
                    block_size,
                    device,
                )
            )
    return AttentionMetadata(torch.tensor(slots, dtype=torch.long, device=device), tuple(groups))


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D] this step's keys
    v: torch.Tensor,  # [T, KVH, D]
    k_cache: torch.Tensor,  # [num_slots, KVH, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H*D]
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    t, h, d = q.shape
    out = q.new_empty(t, h * d)
    for g in meta.groups:
        b, qn = g.token_index.shape
        qg = q[g.token_index].transpose(1, 2)  # [B, H, Q, D]
        kg = k_cache[g.kv_slots].transpose(1, 2)  # [B, KVH, K, D]
        vg = v_cache[g.kv_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=scale, enable_gqa=True)
        out[g.out_rows] = o.transpose(1, 2).reshape(b * qn, h * d)[g.out_flat]
    return out
