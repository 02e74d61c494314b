"""GPU and model presets (published figures) and the device memory plan: what a simulated GPU holds.

Sources of every figure: `docs/simulator.md`.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from chameleon.model.geometry import ATTENTION_MODULES, Geometry

GiB = 1 << 30
MiB = 1 << 20
FP16_BYTES = 2


@attrs.frozen
class GPUSpec:
    """Datasheet peaks of one GPU (no efficiency applied)."""

    name: str
    memory_bytes: int
    hbm_bandwidth_Bps: float  # device memory bandwidth, bytes/s
    fp16_flops: float  # dense fp16 tensor-core peak, FLOP/s (no 2:4 sparsity)
    pcie_h2d_Bps: float  # host -> device link peak, one direction, bytes/s


# NVIDIA A40 datasheet (PCIe card, GA102): 48 GB GDDR6 with ECC, 696 GB/s, FP16 tensor 149.7 TFLOPS
# dense (299.4 with sparsity), PCIe Gen4 x16 = 64 GB/s bidirectional, i.e. 32 GB/s host->device.
# (Also listed by third-party spec sheets, e.g. hmc-tech.com "NVIDIA A100 vs NVIDIA A40": 149.67
# TFLOPS FP16 tensor, 695.8 GB/s.) Memory taken as 48 GiB: GDDR6 parts are binary-sized; the ECC
# and CUDA-context losses are inside the 10% reserve of `memory_plan`.
A40_48GB = GPUSpec(
    name="A40-48GB",
    memory_bytes=48 * GiB,
    hbm_bandwidth_Bps=696e9,
    fp16_flops=149.7e12,
    pcie_h2d_Bps=32e9,
)

# NVIDIA A100 80GB SXM4 datasheet: 80 GB HBM2e, 2,039 GB/s, FP16 tensor 312 TFLOPS dense (624
# sparse), host link PCIe Gen4 x16 (32 GB/s per direction; glennklockwood.com/garden/processors/A100
# summarises the datasheet: "32+32 GB/s PCIe Gen4 (H2D)").
A100_80GB = GPUSpec(
    name="A100-80GB",
    memory_bytes=80 * GiB,
    hbm_bandwidth_Bps=2039e9,
    fp16_flops=312e12,
    pcie_h2d_Bps=32e9,
)

GPUS: dict[str, GPUSpec] = {"A40": A40_48GB, "A100": A100_80GB}

# Llama projections and their (in, out) shapes are functions of the config; these names match PEFT's.
# SPEC §1: the paper's adapters target q, k, v, o (a rank-32 adapter of Llama-7B is 64 MiB).
DEFAULT_LORA_TARGETS: tuple[str, ...] = ATTENTION_MODULES


@attrs.frozen
class ModelCost:
    """The shape of a decoder-only model, as far as cost and memory go."""

    name: str
    params: int  # all parameters, embeddings and LM head included
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    weight_bytes: int
    kv_bytes_per_token: int  # K and V, all layers
    vocab_size: int = 32000
    max_model_len: int = 2048
    dtype_bytes: int = FP16_BYTES

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.num_layers, self.hidden, self.intermediate, self.num_heads, self.num_kv_heads, self.head_dim)

    @property
    def layer_matmul_params(self) -> int:
        """Parameters that multiply every token: the decoder layers' projections (no embeddings,
        no LM head, no norms)."""
        return self.geometry.layer_matmul_params()

    def module_dims(self, module: str) -> tuple[int, int]:
        """(in, out) features of a projection, as PEFT's lora_A / lora_B see them."""
        return self.geometry.module_shape(module)

    def lora_features(self, targets: Sequence[str]) -> int:
        """Σ over target modules of (in + out): one rank row of every target, in one layer."""
        return sum(sum(self.module_dims(m)) for m in targets)

    def adapter_row_bytes(self, targets: Sequence[str] = DEFAULT_LORA_TARGETS) -> int:
        """Device bytes of one rank row of an adapter: A row (in) + B row (out), every target, every layer."""
        return self.geometry.lora_row_bytes(targets, self.dtype_bytes)


def llama_model_cost(
    name: str,
    *,
    hidden: int,
    intermediate: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    vocab_size: int = 32000,
    max_model_len: int = 2048,
    dtype_bytes: int = FP16_BYTES,
) -> ModelCost:
    """A Llama-architecture model's cost from its config (untied embeddings, RMSNorm without bias)."""
    kv_heads = num_kv_heads or num_heads
    head_dim = hidden // num_heads
    geometry = Geometry(num_layers, hidden, intermediate, num_heads, kv_heads, head_dim)
    norms = num_layers * 2 * hidden + hidden
    params = 2 * vocab_size * hidden + geometry.layer_matmul_params() + norms
    return ModelCost(
        name=name,
        params=params,
        num_layers=num_layers,
        hidden=hidden,
        intermediate=intermediate,
        num_heads=num_heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        weight_bytes=params * dtype_bytes,
        kv_bytes_per_token=geometry.kv_bytes_per_token(dtype_bytes),
        vocab_size=vocab_size,
        max_model_len=max_model_len,
        dtype_bytes=dtype_bytes,
    )


# LLaMA-1 configs (Touvron et al. 2023, Table 2; the HF `config.json` of the converted checkpoints):
# vocab 32000, context 2048, fp16. Derived: 7B has 6.74 B parameters = 13.5 GB, 512 KiB KV/token
# (2 · 32 · 4096 · 2 B); 13B 13.0 B = 26.0 GB, 800 KiB/token; 30B ("33B") 32.5 B = 65.1 GB,
# 1.52 MiB/token.
LLAMA_7B = llama_model_cost("llama-7b", hidden=4096, intermediate=11008, num_layers=32, num_heads=32)
LLAMA_13B = llama_model_cost("llama-13b", hidden=5120, intermediate=13824, num_layers=40, num_heads=40)
LLAMA_30B = llama_model_cost("llama-30b", hidden=6656, intermediate=17920, num_layers=60, num_heads=52)

MODELS: dict[str, ModelCost] = {m.name: m for m in (LLAMA_7B, LLAMA_13B, LLAMA_30B)}


def get_gpu(name: str | GPUSpec) -> GPUSpec:
    if isinstance(name, GPUSpec):
        return name
    key = {k.lower(): k for k in GPUS}.get(name.lower()) or {g.name.lower(): k for k, g in GPUS.items()}.get(
        name.lower()
    )
    if key is None:
        raise ValueError(f"unknown GPU preset {name!r}; known: {sorted(GPUS)}")
    return GPUS[key]


def get_model(name: str | ModelCost) -> ModelCost:
    if isinstance(name, ModelCost):
        return name
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(MODELS)}") from None


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------

# vLLM's default gpu_memory_utilization = 0.9: 10% of the device is kept for activations, the CUDA
# context and allocator slack. We keep the same share.
DEFAULT_RESERVE_FRACTION = 0.10


@attrs.frozen
class MemoryPlan:
    gpu_bytes: int
    weight_bytes: int
    reserve_bytes: int

    @property
    def free_bytes(self) -> int:
        """What KV blocks and idle adapters share (KV first)."""
        return self.gpu_bytes - self.weight_bytes - self.reserve_bytes


def memory_plan(gpu: GPUSpec, model: ModelCost, *, reserve_fraction: float = DEFAULT_RESERVE_FRACTION) -> MemoryPlan:
    if not 0.0 <= reserve_fraction < 1.0:
        raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    plan = MemoryPlan(gpu.memory_bytes, model.weight_bytes, int(gpu.memory_bytes * reserve_fraction))
    if plan.free_bytes <= 0:
        from chameleon.errors import ConfigError

        raise ConfigError(
            f"{model.name} ({model.weight_bytes / 1e9:.1f} GB of weights) does not fit on one "
            f"{gpu.name} ({gpu.memory_bytes / GiB:.0f} GiB, {reserve_fraction:.0%} reserved)"
        )
    return plan
