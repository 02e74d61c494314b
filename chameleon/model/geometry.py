"""The one source of a Llama-family decoder's shapes: projections, target modules, KV bytes.

The LoRA loader validates adapters against `module_shapes`, the pool sizes its rows with
`lora_row_bytes`, the executor and the factory size KV with `kv_bytes_per_token`, and the
simulator's cost model reads the same numbers for its presets. No torch: dtypes enter as byte
sizes, so the simulator and the policies can import it.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping

import attrs

# The projections LoRA may target, in PEFT's names, and the block each lives in.
TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
PARENT: Mapping[str, str] = types.MappingProxyType(
    {**{m: "self_attn" for m in ATTENTION_MODULES}, **{m: "mlp" for m in MLP_MODULES}}
)


@attrs.frozen
class Geometry:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of every projection, as PEFT's lora_A / lora_B see them."""
        h, q, kv, inter = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, inter),
            "up_proj": (h, inter),
            "down_proj": (inter, h),
        }

    def module_shape(self, module: str) -> tuple[int, int]:
        shapes = self.module_shapes()
        if module not in shapes:
            raise ValueError(f"unknown target module {module!r}; known: {sorted(shapes)}")
        return shapes[module]

    def layer_matmul_params(self) -> int:
        """Parameters that multiply every token: all layers' projections (no embeddings, head, norms)."""
        return self.num_layers * sum(i * o for i, o in self.module_shapes().values())

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token, all layers."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def kv_cache_bytes_per_token(self, dtype_bytes: int, kv_cache_dtype: str = "auto") -> int:
        """K and V of one token, all layers, as the KV cache stores them: `auto` in the model dtype;
        `int8` / `fp8_e4m3` one byte per value plus an fp16 scale per (token, KV head)
        (model/kv_quant.py): at head_dim 64, 1.94x fewer bytes than fp16 and 3.88x fewer than fp32."""
        if kv_cache_dtype == "auto":
            return self.kv_bytes_per_token(dtype_bytes)
        if kv_cache_dtype not in ("int8", "fp8_e4m3"):
            raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}")
        return 2 * self.num_layers * self.num_kv_heads * (self.head_dim + 2)

    def lora_row_bytes(self, targets: Iterable[str], dtype_bytes: int) -> int:
        """One rank row of an adapter: an A row (in) and a B row (out) of every target, every layer."""
        return dtype_bytes * self.num_layers * sum(sum(self.module_shape(m)) for m in targets)
