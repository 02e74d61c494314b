"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) in plain torch, read top to bottom.

q/k/v and gate/up are fused into one matmul each (fewer, larger GEMMs); LoRA deltas are added to
the matching column slices of the fused outputs by the `LoRAHook` the executor passes in.

On CPU the executor calls `pack_weights()`: every linear's weight is reordered once into oneDNN's
blocked layout and multiplied with `mkldnn._linear_pointwise` (2-4x faster than the MKL sgemm behind
`F.linear` for these shapes, and what vLLM's CPU backend does too). The dense copies are then
released, except the embedding table. Without packing (CUDA, tests that build a model by hand) every
linear is a plain `F.linear`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from chameleon.model.attention import AttentionMetadata, paged_attention
from chameleon.model.kv_quant import KVCache
from chameleon.model.spec import ModelSpec


class LoRAHook(Protocol):
    """Adds adapter deltas in place: `y += lora(x)` for the batch's rows that carry an adapter."""

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None: ...

    def apply_group(self, layer: int, modules: tuple[str, ...], x: torch.Tensor, ys: Sequence[torch.Tensor]) -> None:
        """`apply` for several modules that read the same x (may share one shrink)."""
        ...


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
HEAD_CHUNK_ROWS = 8192  # vocabulary rows per LM-head chunk: [S, 8192] logits stay in cache


def onednn_packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `pack_weights` can use oneDNN here: CPU, fp32 or bf16 (with hardware support)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def padded_rows(m: int) -> int:
    """Row count a packed matmul runs at: m rounded up to one of ~8 buckets per power of two
    (<= 12.5% padding). oneDNN builds a primitive per input shape (~0.5 ms, cached LRU, 1024
    entries); a bounded set of shapes keeps a serving engine, whose batch size changes every
    step, from paying that again and again."""
    if m <= 8:
        return m
    step = max(8, 1 << (m.bit_length() - 4))
    return -(-m // step) * step


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] == rows else F.pad(x, (0, 0, 0, rows - x.shape[0]))


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 64)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 and cast back before the weight, as transformers does (bitwise parity).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, index: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.spec, self.index = spec, index
        hidden, inter = spec.hidden_size, spec.intermediate_size
        qkv_out = spec.q_size + 2 * spec.kv_size
        self.input_norm = _param(hidden, dtype=dtype)
        self.qkv_proj = _param(qkv_out, hidden, dtype=dtype)
        self.qkv_bias = _param(qkv_out, dtype=dtype) if spec.qkv_bias else None
        self.o_proj = _param(hidden, spec.q_size, dtype=dtype)
        self.o_bias = _param(hidden, dtype=dtype) if spec.o_bias else None
        self.post_attn_norm = _param(hidden, dtype=dtype)
        self.gate_up_proj = _param(2 * inter, hidden, dtype=dtype)
        self.down_proj = _param(hidden, inter, dtype=dtype)
        self.packed: dict[str, torch.Tensor] = {}  # weight name -> oneDNN-packed copy (pack_weights)

    def pack_weights(self) -> None:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            param = getattr(self, name)
            self.packed[name] = _pack(param)
            param.data = param.data.new_empty(0)  # the packed copy replaces it

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[KVCache, KVCache],
        meta: AttentionMetadata,
        lora: LoRAHook | None,
    ) -> torch.Tensor:
        s, i = self.spec, self.index
        n = meta.num_tokens  # h may carry padding rows past n (see LlamaModel.forward)
        real = (lambda t: t) if h.shape[0] == n else (lambda t: t[:n])
        x = rms_norm(h, self.input_norm, s.rms_norm_eps)
        p = self.packed
        qkv = linear(x, self.qkv_proj, self.qkv_bias, p.get("qkv_proj"))
        q_end, k_end = s.q_size, s.q_size + s.kv_size
        if lora is not None:
            lora.apply_group(i, QKV, real(x), (real(qkv[:, :q_end]), real(qkv[:, q_end:k_end]), real(qkv[:, k_end:])))
        q = apply_rope(qkv[:, :q_end].view(-1, s.num_heads, s.head_dim), cos, sin)
        k = apply_rope(qkv[:, q_end:k_end].view(-1, s.num_kv_heads, s.head_dim), cos, sin)
        v = qkv[:, k_end:].view(-1, s.num_kv_heads, s.head_dim)
        attn = paged_attention(real(q), real(k), real(v), kv_cache[0], kv_cache[1], meta, s.head_dim**-0.5,
                               out_rows=h.shape[0])
        o = linear(attn, self.o_proj, self.o_bias, p.get("o_proj"))
        if lora is not None:
            lora.apply(i, "o_proj", real(attn), real(o))
        h = h + o

        x = rms_norm(h, self.post_attn_norm, s.rms_norm_eps)
        gate_up = linear(x, self.gate_up_proj, None, p.get("gate_up_proj"))
        inter = s.intermediate_size
        if lora is not None:
            lora.apply_group(i, GATE_UP, real(x), (real(gate_up[:, :inter]), real(gate_up[:, inter:])))
        m = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        d = linear(m, self.down_proj, None, p.get("down_proj"))
        if lora is not None:
            lora.apply(i, "down_proj", real(m), real(d))
        return h + d


class LlamaModel(nn.Module):
    rope_cos: torch.Tensor  # buffers, registered in __init__
    rope_sin: torch.Tensor

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = _param(spec.vocab_size, spec.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, dtype) for i in range(spec.num_layers))
        self.norm = _param(spec.hidden_size, dtype=dtype)
        self.lm_head = None if spec.tie_word_embeddings else _param(spec.vocab_size, spec.hidden_size, dtype=dtype)
        # RoPE tables for every position, computed in float32 as transformers does, then cast.
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * spec.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", (emb.cos() * spec.rope_attention_scaling).to(dtype), persistent=False)
        self.register_buffer("rope_sin", (emb.sin() * spec.rope_attention_scaling).to(dtype), persistent=False)

        # The LM head in vocabulary chunks (start row, oneDNN-packed rows) after pack_weights().
        self.head_chunks: list[tuple[int, torch.Tensor]] = []

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def pack_weights(self, head_chunk_rows: int = HEAD_CHUNK_ROWS) -> None:
        """Reorder every linear weight for oneDNN (see the module docstring). Idempotent."""
        if self.head_chunks:
            return
        for layer in self.layers:
            layer.pack_weights()  # type: ignore[operator]
        head = self.head_weight
        self.head_chunks = [(i, _pack(head[i : i + head_chunk_rows])) for i in range(0, head.shape[0], head_chunk_rows)]
        if self.lm_head is not None:  # a tied head is the embedding table: that one stays dense
            self.lm_head.data = self.lm_head.data.new_empty(0)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_caches: list[tuple[KVCache, KVCache]],
        sample_rows: torch.Tensor,  # [S] rows whose next token is needed
        lora: LoRAHook | None = None,
    ) -> torch.Tensor:  # [S, hidden]: final-normed hidden states, for `logits` / `greedy_tokens`
        if self.head_chunks:  # packed: run the layers at a bucketed row count (see padded_rows)
            rows = padded_rows(input_ids.shape[0])
            input_ids = F.pad(input_ids, (0, rows - input_ids.shape[0]))
            positions = F.pad(positions, (0, rows - positions.shape[0]))
        h = F.embedding(input_ids, self.embed_tokens)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            h = layer(h, cos, sin, kv, meta, lora)
        if sample_rows.numel() != h.shape[0]:  # only the rows that sample reach the head
            h = h.index_select(0, sample_rows)
        return rms_norm(h, self.norm, self.spec.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:  # [S, vocab] float32
        if not self.head_chunks:
            return F.linear(h, self.head_weight).float()
        hp = _pad_rows(h, padded_rows(h.shape[0]))
        return torch.cat([_head_chunk(hp, w) for _, w in self.head_chunks], dim=1)[: h.shape[0]].float()

    @torch.inference_mode()
    def greedy_tokens(self, h: torch.Tensor) -> torch.Tensor:  # [S] int64
        """`logits(h).argmax(-1)` (ties: the lowest id), without materialising the logits: with a
        packed head each vocabulary chunk is reduced while it is still in cache."""
        if not self.head_chunks or h.shape[0] == 0:
            return self.logits(h).argmax(-1)
        n = h.shape[0]
        h = _pad_rows(h, padded_rows(n))
        best_val: torch.Tensor | None = None
        best_idx = torch.zeros(h.shape[0], dtype=torch.long)
        for start, w in self.head_chunks:
            val, idx = _first_max(_head_chunk(h, w))
            if best_val is None:
                best_val, best_idx = val, idx
                continue
            better = val > best_val  # strictly: an equal value in a later chunk has a higher id
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + start, best_idx)
        return best_idx[:n]


def _head_chunk(h: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(h, packed, None, "none", [], "")


def _first_max(y: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """`y.max(-1)` (value and *first* index of the maximum) for [S, V] logits.

    torch's max-with-index over the last dim is not vectorised on CPU; for many fp32 rows it is
    faster to take the vectorised `amax` of groups of `group` columns, pick the first group that
    holds the maximum, and search only that group: the same value and the same (first) index.
    Half-precision logits are widened to fp32 first (exactly): the value comes back as fp32."""
    s, v = y.shape
    if s < 16 or v % group:
        return y.max(-1)
    if y.dtype != torch.float32:
        y = y.float()  # exact; and fp32 amax is vectorised where bf16's is not
    grouped = y.view(s, v // group, group)
    best, g = grouped.amax(-1).max(-1)  # first group whose maximum is the row's maximum
    within = grouped.gather(1, g.view(s, 1, 1).expand(s, 1, group)).view(s, group).argmax(-1)
    return best, g * group + within
