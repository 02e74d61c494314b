"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) in plain torch, read top to bottom.

q/k/v and gate/up are fused into one matmul each (fewer, larger GEMMs); LoRA deltas are added to
the matching column slices of the fused outputs by the `LoRAHook` the executor passes in.

On CPU the executor calls `pack_weights()`: every linear's weight is reordered once into oneDNN's
blocked layout and multiplied with `mkldnn._linear_pointwise` (2-4x faster than the MKL sgemm behind
`F.linear` for these shapes, and what vLLM's CPU backend does too). The dense copies are then
released, except the embedding table. Without packing (CUDA, tests that build a model by hand) every
linear is a plain `F.linear`. In fp32 the residual adds after o_proj and down_proj ride on the
matmul as oneDNN's sum post-op (bitwise the same sum) unless a LoRA delta must land first. The LM
head is `PackedLMHead` (model/lm_head.py): greedy rows never materialise their logits.

Elementwise steps keep transformers' order of operations (bitwise fp32 parity) but not its
temporaries: RMSNorm updates its statistics in place, q and k are rotated in one call without
building rotate_half, SiLU·up multiplies in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from chameleon.model.attention import AttentionMetadata, paged_attention
from chameleon.model.kv_quant import KVCache
from chameleon.model.lm_head import CHUNK_ROWS, PackedLMHead, pack, packed_linear
from chameleon.model.spec import ModelSpec


class LoRAHook(Protocol):
    """Adds adapter deltas in place: `y += lora(x)` for the batch's rows that carry an adapter."""

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None: ...

    def apply_group(self, layer: int, modules: tuple[str, ...], x: torch.Tensor, ys: Sequence[torch.Tensor]) -> None:
        """`apply` for several modules that read the same x (may share one shrink)."""
        ...

    def targets(self, module: str) -> bool:
        """Whether any row of the batch gets a delta on `module` (else `apply` is a no-op for it)."""
        ...


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def onednn_packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `pack_weights` can use oneDNN here: CPU, fp32 or bf16 (with hardware support)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if not hasattr(torch.ops.mkldnn._linear_pointwise, "binary"):  # the fused residual add
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    if packed is None:
        return F.linear(x, weight, bias)
    return packed_linear(x, packed, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' formula, op for op (bitwise parity): normalise in float32, cast back, then the
    # weight. The temporaries are updated in place, so one [T, hidden] tensor is allocated (fp32).
    xf = x.float()
    inv = xf.pow(2).mean(-1, keepdim=True)
    y = xf * inv.add_(eps).rsqrt_()
    return (y if y.dtype == x.dtype else y.to(x.dtype)).mul_(weight)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, D]. `x·cos + rotate_half(x)·sin`, bitwise, without building
    rotate_half(x): its first half is -x₂ and (-x₂)·s = -(x₂·s) exactly, so that half is a subtraction.
    The model rotates q and k (adjacent columns of the fused qkv) in one call."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]
    out = x * c
    out[..., :half] -= x[..., half:] * s[..., :half]
    out[..., half:] += x[..., :half] * s[..., half:]
    return out


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
            self.packed[name] = pack(param)
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
        # q and k side by side in qkv: one rotation for both heads' sets.
        qk = apply_rope(qkv[:, :k_end].view(-1, s.num_heads + s.num_kv_heads, s.head_dim), cos, sin)
        q, k = qk[:, : s.num_heads], qk[:, s.num_heads :]
        v = qkv[:, k_end:].view(-1, s.num_kv_heads, s.head_dim)
        attn = paged_attention(real(q), real(k), real(v), kv_cache[0], kv_cache[1], meta, s.head_dim**-0.5,
                               out_rows=h.shape[0])
        h = self._residual(h, attn, "o_proj", lora, n)

        x = rms_norm(h, self.post_attn_norm, s.rms_norm_eps)
        gate_up = linear(x, self.gate_up_proj, None, p.get("gate_up_proj"))
        inter = s.intermediate_size
        if lora is not None:
            lora.apply_group(i, GATE_UP, real(x), (real(gate_up[:, :inter]), real(gate_up[:, inter:])))
        m = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])
        return self._residual(h, m, "down_proj", lora, n)

    def _residual(self, h: torch.Tensor, x: torch.Tensor, name: str, lora: LoRAHook | None, n: int) -> torch.Tensor:
        """`h + name(x)` (the module's LoRA delta included). In fp32 with a packed weight and no delta
        on this module the add is oneDNN's sum post-op, fused into the matmul: the same fp32 sum, bitwise."""
        weight, bias = getattr(self, name), (self.o_bias if name == "o_proj" else None)
        packed = self.packed.get(name)
        if lora is None or not lora.targets(name):
            if packed is not None and h.dtype == torch.float32:
                return torch.ops.mkldnn._linear_pointwise.binary(x, h, packed, bias, "add")
            return h + linear(x, weight, bias, packed)
        y = linear(x, weight, bias, packed)
        lora.apply(self.index, name, x[:n], y[:n])
        return h + y


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

        self.head: PackedLMHead | None = None  # the packed LM head, after pack_weights()

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def pack_weights(self, head_chunk_rows: int = CHUNK_ROWS) -> None:
        """Reorder every linear weight for oneDNN (see the module docstring). Idempotent."""
        if self.head is not None:
            return
        for layer in self.layers:
            layer.pack_weights()  # type: ignore[operator]
        self.head = PackedLMHead(self.head_weight, head_chunk_rows)
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
        if self.head is not None:  # packed: run the layers at a bucketed row count (see padded_rows)
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
        if self.head is None:
            return F.linear(h, self.head_weight).float()
        return self.head.logits(_pad_rows(h, padded_rows(h.shape[0])))[: h.shape[0]]

    @torch.inference_mode()
    def greedy_tokens(self, h: torch.Tensor) -> torch.Tensor:  # [S] int64
        """`logits(h).argmax(-1)` (ties: the lowest id); with a packed head the logits are never
        materialised (model/lm_head.py)."""
        if self.head is None or h.shape[0] == 0:
            return self.logits(h).argmax(-1)
        return self.head.greedy(_pad_rows(h, padded_rows(h.shape[0])))[: h.shape[0]]
