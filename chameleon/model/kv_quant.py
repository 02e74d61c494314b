"""Quantized KV cache storage: int8 (or fp8 e4m3) values with one fp16 scale per (token, head).

Quantize on write (`write_kv`), dequantize on read (`read_kv`) to the model's dtype, so the
attention math is unchanged (docs/kv_cache.md). A scale per token and KV head costs 2 bytes next
to `head_dim` value bytes: 66 bytes per head-token at head_dim 64, 1.94x fewer than fp16 and
3.88x fewer than fp32. Scales are rounded to fp16 *before* quantizing, so dequantization uses
exactly the scale the values were made with. CPU and CUDA share this torch path (gather, then
dequantize); a fused CUDA kernel that dequantizes inside attention is not written yet.
"""

from __future__ import annotations

from typing import Literal

import torch

QuantDType = Literal["int8", "fp8_e4m3"]
SCALE_BYTES = 2  # fp16 scale per (token, KV head)
_QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}


def fp8_supported(device: torch.device) -> bool:
    """float8_e4m3fn exists in this torch and converts on `device`."""
    if not hasattr(torch, "float8_e4m3fn"):
        return False
    try:
        torch.ones(2, device=device).to(torch.float8_e4m3fn).to(torch.float32)
    except (RuntimeError, TypeError):
        return False
    return True


def quant_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """K and V of one token, all layers, values plus scales."""
    return 2 * num_layers * num_kv_heads * (head_dim + SCALE_BYTES)


class QuantizedKVCache:
    """One layer's K (or V) over all slots: `data` [slots, heads, dim] 1-byte codes, `scale`
    [slots, heads] fp16."""

    def __init__(self, slots: int, heads: int, dim: int, mode: QuantDType, device: torch.device) -> None:
        self.mode = mode
        self.data = torch.zeros((slots, heads, dim), dtype=torch.int8 if mode == "int8" else torch.uint8, device=device)
        self.scale = torch.zeros((slots, heads), dtype=torch.float16, device=device)

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Quantize `x` [T, heads, dim] into `slots`."""
        xf = x.float()
        scale = (xf.abs().amax(-1) / _QMAX[self.mode]).clamp_min(1e-7).to(torch.float16)
        scaled = xf / scale.float()[..., None]
        if self.mode == "int8":
            codes = scaled.round_().clamp_(-127, 127).to(torch.int8)
        else:
            codes = scaled.clamp_(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        self.data.index_copy_(0, slots, codes)
        self.scale.index_copy_(0, slots, scale)

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized values of `slots`: [len(slots), heads, dim] in `dtype`."""
        codes = self.data.index_select(0, slots)
        values = codes.to(dtype) if self.mode == "int8" else codes.view(torch.float8_e4m3fn).to(dtype)
        return values * self.scale.index_select(0, slots).to(dtype)[..., None]

    def take(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw codes and scales (for swapping to host memory)."""
        return self.data.index_select(0, slots), self.scale.index_select(0, slots)

    def put(self, slots: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.data.index_copy_(0, slots, state[0].to(self.data.device, non_blocking=True))
        self.scale.index_copy_(0, slots, state[1].to(self.scale.device, non_blocking=True))


KVCache = torch.Tensor | QuantizedKVCache


def write_kv(cache: KVCache, slots: torch.Tensor, x: torch.Tensor) -> None:
    if isinstance(cache, QuantizedKVCache):
        cache.write(slots, x)
    else:
        cache.index_copy_(0, slots, x)


def read_kv(cache: KVCache, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(cache, QuantizedKVCache):
        return cache.read(slots, dtype)
    return cache.index_select(0, slots)
