"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) in plain torch, read top to bottom.

q/k/v and gate/up are fused into one matmul each (fewer, larger GEMMs); LoRA deltas are added to
the matching column slices of the fused outputs by the `LoRAHook` the executor passes in.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from chameleon.model.attention import AttentionMetadata, paged_attention
from chameleon.model.spec import ModelSpec


class LoRAHook(Protocol):
    """Adds adapter deltas in place: `y += lora(x)` for the batch's rows that carry an adapter."""

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None: ...


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


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

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        lora: LoRAHook | None,
    ) -> torch.Tensor:
        s, i = self.spec, self.index
        x = rms_norm(h, self.input_norm, s.rms_norm_eps)
        qkv = F.linear(x, self.qkv_proj, self.qkv_bias)
        q_end, k_end = s.q_size, s.q_size + s.kv_size
        if lora is not None:
            lora.apply(i, "q_proj", x, qkv[:, :q_end])
            lora.apply(i, "k_proj", x, qkv[:, q_end:k_end])
            lora.apply(i, "v_proj", x, qkv[:, k_end:])
        q = apply_rope(qkv[:, :q_end].view(-1, s.num_heads, s.head_dim), cos, sin)
        k = apply_rope(qkv[:, q_end:k_end].view(-1, s.num_kv_heads, s.head_dim), cos, sin)
        v = qkv[:, k_end:].view(-1, s.num_kv_heads, s.head_dim)
        attn = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, s.head_dim**-0.5)
        o = F.linear(attn, self.o_proj, self.o_bias)
        if lora is not None:
            lora.apply(i, "o_proj", attn, o)
        h = h + o

        x = rms_norm(h, self.post_attn_norm, s.rms_norm_eps)
        gate_up = F.linear(x, self.gate_up_proj)
        inter = s.intermediate_size
        if lora is not None:
            lora.apply(i, "gate_proj", x, gate_up[:, :inter])
            lora.apply(i, "up_proj", x, gate_up[:, inter:])
        m = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        d = F.linear(m, self.down_proj)
        if lora is not None:
            lora.apply(i, "down_proj", m, d)
        return h + d


class LlamaModel(nn.Module):
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

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        sample_rows: torch.Tensor,  # [S] rows whose next-token logits are needed
        lora: LoRAHook | None = None,
    ) -> torch.Tensor:  # [S, vocab] float32
        h = F.embedding(input_ids, self.embed_tokens)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            h = layer(h, cos, sin, kv, meta, lora)
        h = rms_norm(h[sample_rows], self.norm, self.spec.rms_norm_eps)
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return F.linear(h, head).float()
