"""A GPU cost model for the simulated executor: how long an iteration and an adapter load take.

Two interchangeable models implement the `CostModel` protocol:

* `AnalyticCostModel` — a roofline over published hardware figures (`GPUSpec`) and the model's
  shape (`ModelCost`), with a handful of efficiency factors (`Calibration`) calibrated **once**, to
  the Chameleon paper's unloaded TTFT-by-rank figures, and never per policy.
* `CostProfile` — linear models fitted to measurements of the *real* executor on the machine at
  hand (`chameleon calibrate`), for checking the simulator against reality.

Modelling choices (analytic model)
----------------------------------
One iteration runs one batch: some sequences prefill a chunk of tokens, others decode one token.

* Base compute (FLOPs) = 2 · (matmul parameters of the decoder layers) · (new tokens)
  + 2 · vocab · hidden · (sampled rows) (the LM head only runs on rows that sample)
  + attention 4 · layers · (heads·head_dim) · (query, key) pairs
  (QKᵀ and PV, 2 FLOPs per multiply-add; a new token at position p attends to p + 1 keys).
* Base memory traffic (bytes) = all weights once + the KV of every sequence's context (read) and
  of its new tokens (written).
* Base time = max(FLOPs / (peak · compute_efficiency), bytes / (bandwidth · memory_efficiency))
  — the roofline: prefill is compute-bound, decode memory-bound.
* LoRA (shrink then expand, S-LoRA/Punica style, separate kernels after the base GEMMs, hence an
  *additive* term): per token and per rank, 2 · Σ_targets (in + out) FLOPs in every layer; every
  distinct adapter's weights are read once per iteration (rank · adapter_row_bytes). LoRA time =
  max(FLOPs / (peak · lora_efficiency), bytes / (bandwidth · memory_efficiency)).
* Fixed per-iteration overhead = host_overhead_s + per_layer_overhead_s · layers (the engine's
  host work plus kernel launches, ~10 launches per layer at ~10 µs each).
* Adapter load time = bytes / (PCIe host→device peak · h2d_efficiency).
* Memory: GPU memory − reserve_fraction · GPU memory (activations, CUDA context, fragmentation)
  − weights = what KV blocks and idle adapters share. KV has priority (SPEC §2), so the executor
  offers all of it as KV blocks *and* all of it as adapter rows; the engine's memory budget
  decides who gets what.

Calibration (`derive_paper_calibration`, reproduced by `A40_LLAMA7B_CALIBRATION`)
---------------------------------------------------------------------------------
The paper (SPEC §1) gives, for Llama-7B on an A40 without load, TTFT = 74/78/88/107/144 ms at rank
8/16/32/64/128, and says loading is 17.5% of the TTFT at rank 128. The five points lie on a line,
TTFT ≈ 69.1 ms + 0.586 ms · rank (residuals < 0.7%). Then:

1. h2d_efficiency: the rank-128 adapter (q,k,v,o: 128 · 2 MiB = 256 MiB) loads in 17.5% · 144 ms
   = 25.2 ms, i.e. 10.65 GB/s effective (SPEC: "≈10 GB/s") = 0.333 of PCIe Gen4 x16's 32 GB/s.
2. compute_efficiency: the intercept (rank → 0) minus the fixed overhead is a base prefill of the
   calibration prompt. The paper does not state that prompt's length; we ASSUME 512 tokens (the
   top of S-LoRA's benchmark length range U[8, 512)). This gives 0.69 of the fp16 tensor peak —
   typical of prefill GEMMs at this size. (The prompt-length assumption moves compute_efficiency
   and lora_efficiency together; the TTFT-by-rank reproduction holds for any choice.)
3. lora_efficiency: the slope minus the load time per rank (2 MiB / 10.65 GB/s = 0.197 ms) is the
   LoRA compute per rank for 512 tokens: 0.389 ms, i.e. ~1.8% of the tensor peak — S-LoRA's
   gather-based multi-adapter kernels are far from tensor-core speed, and this is what the
   paper's slope implies.
4. Not calibratable from those figures, so fixed by assumption: memory_efficiency = 0.80 (the
   fraction of peak DRAM bandwidth large weight-streaming GEMVs typically reach), host overhead
   1 ms, kernel-launch overhead 0.1 ms per layer.

The same `Calibration` is used for every GPU and model (there are no published A100 figures to
calibrate against): efficiencies transfer, peaks come from the datasheets.

What the model implies (worth knowing before comparing absolute rates with the paper)
------------------------------------------------------------------------------------
Llama-7B has no GQA: a decoding sequence with ~1,100 tokens of context reads ~0.55 GB of KV per
token, ~1 ms at 80% of the A40's bandwidth, on top of ~28 ms per iteration for the weights; a
1,000-token prefill costs ~130 ms (+40 ms of LoRA at the paper's average rank 50). With the
Azure conversation trace's lengths (prompt mean 1,155, output mean 211) the modelled A40
saturates near 2 requests/s. The paper's 6-9 requests/s on that trace would need, for decode
alone, 9 · 211 · 0.55 GB ≈ 1 TB/s of KV reads: more than the A40's 696 GB/s peak. So compare
policies at the same *fraction* of capacity, not at the paper's absolute rates.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import numpy as np

__all__ = [
    "A100_80GB",
    "A40_48GB",
    "A40_LLAMA7B_CALIBRATION",
    "DEFAULT_LORA_TARGETS",
    "GPUS",
    "LLAMA_13B",
    "LLAMA_30B",
    "LLAMA_7B",
    "MODELS",
    "PAPER_CALIBRATION_PROMPT_LEN",
    "PAPER_LOAD_SHARE_AT_MAX_RANK",
    "PAPER_TTFT_BY_RANK_S",
    "AnalyticCostModel",
    "BatchShape",
    "BatchShapeBuilder",
    "Calibration",
    "CostModel",
    "CostProfile",
    "GPUSpec",
    "MemoryPlan",
    "ModelCost",
    "ProfileEngine",
    "derive_paper_calibration",
    "get_gpu",
    "get_model",
    "llama_model_cost",
    "memory_plan",
]

GiB = 1 << 30
MiB = 1 << 20
FP16_BYTES = 2

# ------------------------------------------------------------------------------------------------
# Hardware and model values
# ------------------------------------------------------------------------------------------------


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
_ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
# SPEC §1: the paper's adapters target q, k, v, o (a rank-32 adapter of Llama-7B is 64 MiB).
DEFAULT_LORA_TARGETS: tuple[str, ...] = _ATTENTION_MODULES


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
    def layer_matmul_params(self) -> int:
        """Parameters that multiply every token: the decoder layers' projections (no embeddings,
        no LM head, no norms)."""
        per_layer = sum(i * o for i, o in (self.module_dims(m) for m in _ATTENTION_MODULES + _MLP_MODULES))
        return self.num_layers * per_layer

    def module_dims(self, module: str) -> tuple[int, int]:
        """(in, out) features of a projection, as PEFT's lora_A / lora_B see them."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        dims = {
            "q_proj": (self.hidden, q),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }
        try:
            return dims[module]
        except KeyError:
            raise ValueError(f"unknown target module {module!r}; known: {sorted(dims)}") from None

    def lora_features(self, targets: Sequence[str]) -> int:
        """Σ over target modules of (in + out): one rank row of every target, in one layer."""
        return sum(sum(self.module_dims(m)) for m in targets)

    def adapter_row_bytes(self, targets: Sequence[str] = DEFAULT_LORA_TARGETS) -> int:
        """Device bytes of one rank row of an adapter: A row (in) + B row (out), every target, every layer."""
        return self.dtype_bytes * self.num_layers * self.lora_features(targets)


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
    q, kv = num_heads * head_dim, kv_heads * head_dim
    per_layer = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * intermediate + 2 * hidden
    params = 2 * vocab_size * hidden + num_layers * per_layer + hidden
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
        kv_bytes_per_token=2 * num_layers * kv * dtype_bytes,
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


# ------------------------------------------------------------------------------------------------
# Batch shapes
# ------------------------------------------------------------------------------------------------


@attrs.frozen
class BatchShape:
    """What an iteration's cost depends on, aggregated over its sequences (no request objects)."""

    num_seqs: int
    num_tokens: int  # new tokens computed this iteration, all sequences
    prefill_seqs: int
    prefill_tokens: int
    prefill_attention_pairs: int  # Σ over prefill chunks of (query, key) pairs
    decode_seqs: int
    decode_context_tokens: int  # Σ context (keys attended) of the decoding sequences
    context_tokens: int  # Σ over all sequences of computed + new tokens: KV read
    attention_pairs: int  # Σ over all sequences of (query, key) pairs
    sampled: int  # rows that sample a token (LM head + sampler)
    lora_token_ranks: int  # Σ new_tokens · rank over sequences with an adapter
    lora_adapter_ranks: int  # Σ rank over the distinct adapters of the batch
    lora_adapters: int = 0  # distinct adapters in the batch (LoRA segments)

    @classmethod
    def single_prefill(cls, tokens: int, rank: int = 0) -> BatchShape:
        """One request's whole prompt in one iteration (an unloaded TTFT)."""
        b = BatchShapeBuilder()
        b.add(tokens, 0, rank, "a" if rank else None, samples=True, decode=False)
        return b.build()

    @classmethod
    def decode(cls, seqs: int, context: int, rank: int = 0) -> BatchShape:
        """`seqs` sequences decoding one token each, every one with `context` tokens of context."""
        b = BatchShapeBuilder()
        for i in range(seqs):
            b.add(1, context - 1, rank, f"a{i}" if rank else None, samples=True, decode=True)
        return b.build()


class BatchShapeBuilder:
    """Accumulates a `BatchShape` one sequence at a time (plain ints: it runs every iteration)."""

    __slots__ = ("_adapters", "_v")

    def __init__(self) -> None:
        # num_seqs, num_tokens, prefill_seqs, prefill_tokens, prefill_pairs, decode_seqs,
        # decode_ctx, context, pairs, sampled, lora_token_ranks
        self._v = [0] * 11
        self._adapters: dict[Any, int] = {}

    def add(self, new_tokens: int, computed: int, rank: int, adapter: Any, *, samples: bool, decode: bool) -> None:
        v = self._v
        context = computed + new_tokens
        pairs = new_tokens * computed + new_tokens * (new_tokens + 1) // 2
        v[0] += 1
        v[1] += new_tokens
        if decode:
            v[5] += 1
            v[6] += context
        else:
            v[2] += 1
            v[3] += new_tokens
            v[4] += pairs
        v[7] += context
        v[8] += pairs
        v[9] += samples
        if rank and adapter is not None:
            v[10] += new_tokens * rank
            self._adapters[adapter] = rank

    def build(self) -> BatchShape:
        v = self._v
        return BatchShape(
            num_seqs=v[0],
            num_tokens=v[1],
            prefill_seqs=v[2],
            prefill_tokens=v[3],
            prefill_attention_pairs=v[4],
            decode_seqs=v[5],
            decode_context_tokens=v[6],
            context_tokens=v[7],
            attention_pairs=v[8],
            sampled=v[9],
            lora_token_ranks=v[10],
            lora_adapter_ranks=sum(self._adapters.values()),
            lora_adapters=len(self._adapters),
        )


class CostModel(Protocol):
    def iteration_s(self, shape: BatchShape) -> float:
        """Seconds one iteration of this shape takes."""
        ...

    def load_s(self, nbytes: int) -> float:
        """Seconds to copy `nbytes` of adapter weights host -> device."""
        ...

    def time_factor(self, u: float) -> float:
        """Multiplicative variability of one iteration's time, for `u` uniform in [0, 1)."""
        ...


# ------------------------------------------------------------------------------------------------
# The analytic model
# ------------------------------------------------------------------------------------------------


@attrs.frozen
class Calibration:
    """Efficiency factors: what fraction of each datasheet peak the serving stack reaches."""

    compute_efficiency: float  # base GEMMs, of fp16 tensor peak
    memory_efficiency: float  # of device memory bandwidth
    lora_efficiency: float  # LoRA shrink/expand kernels, of fp16 tensor peak
    h2d_efficiency: float  # adapter copies, of the PCIe host->device peak
    host_overhead_s: float  # per iteration: scheduling, input preparation, sampling on the host
    per_layer_overhead_s: float  # per iteration and layer: kernel launches


# The paper's unloaded TTFT of Llama-7B on an A40 by adapter rank (SPEC §1).
PAPER_TTFT_BY_RANK_S: dict[int, float] = {8: 0.074, 16: 0.078, 32: 0.088, 64: 0.107, 128: 0.144}
PAPER_LOAD_SHARE_AT_MAX_RANK = 0.175  # SPEC §1: "at rank 128 loading is 17.5% of TTFT"
# ASSUMPTION (the paper does not say): the prompt length of the unloaded TTFT measurement.
PAPER_CALIBRATION_PROMPT_LEN = 512
# ASSUMPTIONS, not calibratable from the TTFT figures (see the module docstring).
_MEMORY_EFFICIENCY = 0.80
_HOST_OVERHEAD_S = 1.0e-3
_PER_LAYER_OVERHEAD_S = 1.0e-4  # ~10 kernel launches per layer at ~10 µs


def derive_paper_calibration(
    gpu: GPUSpec = A40_48GB,
    model: ModelCost = LLAMA_7B,
    *,
    ttft_by_rank_s: Mapping[int, float] = PAPER_TTFT_BY_RANK_S,
    load_share_at_max_rank: float = PAPER_LOAD_SHARE_AT_MAX_RANK,
    prompt_len: int = PAPER_CALIBRATION_PROMPT_LEN,
    memory_efficiency: float = _MEMORY_EFFICIENCY,
    host_overhead_s: float = _HOST_OVERHEAD_S,
    per_layer_overhead_s: float = _PER_LAYER_OVERHEAD_S,
    lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
) -> Calibration:
    """Fit the efficiency factors to TTFT-by-rank figures (the derivation in the module docstring)."""
    ranks = np.array(sorted(ttft_by_rank_s), dtype=float)
    ttft = np.array([ttft_by_rank_s[int(r)] for r in ranks])
    slope, intercept = (float(x) for x in np.polyfit(ranks, ttft, 1))
    row_bytes = model.adapter_row_bytes(lora_targets)
    max_rank = float(ranks[-1])
    h2d_Bps = max_rank * row_bytes / (load_share_at_max_rank * float(ttft[-1]))
    overhead = host_overhead_s + per_layer_overhead_s * model.num_layers
    unit = AnalyticCostModel(gpu, model, _UNIT, lora_targets=tuple(lora_targets))
    shape = BatchShape.single_prefill(prompt_len)
    compute_s = unit.base_flops(shape) / gpu.fp16_flops
    memory_s = unit.base_bytes(shape) / (gpu.hbm_bandwidth_Bps * memory_efficiency)
    prefill_s = intercept - overhead
    if not prefill_s > memory_s:
        raise ValueError("the calibration prompt would be memory-bound: cannot infer a compute efficiency")
    lora_s_per_rank = slope - row_bytes / h2d_Bps
    lora_flops_per_rank = prompt_len * 2 * model.num_layers * model.lora_features(lora_targets)
    return Calibration(
        compute_efficiency=compute_s / prefill_s,
        memory_efficiency=memory_efficiency,
        lora_efficiency=lora_flops_per_rank / gpu.fp16_flops / lora_s_per_rank,
        h2d_efficiency=h2d_Bps / gpu.pcie_h2d_Bps,
        host_overhead_s=host_overhead_s,
        per_layer_overhead_s=per_layer_overhead_s,
    )


_UNIT = Calibration(1.0, 1.0, 1.0, 1.0, 0.0, 0.0)

# `derive_paper_calibration()` with its defaults, rounded to 3 significant digits (tests check that
# the two agree). Source: the paper's TTFT-by-rank figures + the assumptions in the module docstring.
A40_LLAMA7B_CALIBRATION = Calibration(
    compute_efficiency=0.690,  # fitted: intercept 69.1 ms − 4.2 ms overhead = 512-token prefill
    memory_efficiency=_MEMORY_EFFICIENCY,  # assumed
    lora_efficiency=0.0184,  # fitted: 0.389 ms of LoRA compute per rank for 512 tokens
    h2d_efficiency=0.333,  # fitted: 256 MiB in 17.5% of 144 ms = 10.65 GB/s of PCIe Gen4's 32 GB/s
    host_overhead_s=_HOST_OVERHEAD_S,  # assumed
    per_layer_overhead_s=_PER_LAYER_OVERHEAD_S,  # assumed
)


@attrs.frozen
class AnalyticCostModel:
    """Roofline iteration times for `model` on `gpu` (see the module docstring)."""

    gpu: GPUSpec
    model: ModelCost
    calibration: Calibration = A40_LLAMA7B_CALIBRATION
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    @property
    def overhead_s(self) -> float:
        c = self.calibration
        return c.host_overhead_s + c.per_layer_overhead_s * self.model.num_layers

    @property
    def adapter_row_bytes(self) -> int:
        return self.model.adapter_row_bytes(self.lora_targets)

    @property
    def h2d_Bps(self) -> float:
        """Effective host -> device bandwidth for adapter copies."""
        return self.gpu.pcie_h2d_Bps * self.calibration.h2d_efficiency

    def base_flops(self, s: BatchShape) -> float:
        m = self.model
        linear = 2.0 * m.layer_matmul_params * s.num_tokens + 2.0 * m.vocab_size * m.hidden * s.sampled
        attention = 4.0 * m.num_layers * m.num_heads * m.head_dim * s.attention_pairs
        return linear + attention

    def base_bytes(self, s: BatchShape) -> float:
        return float(self.model.weight_bytes) + self.model.kv_bytes_per_token * (s.context_tokens + s.num_tokens)

    def lora_flops(self, s: BatchShape) -> float:
        return 2.0 * self.model.num_layers * self.model.lora_features(self.lora_targets) * s.lora_token_ranks

    def lora_bytes(self, s: BatchShape) -> float:
        return float(self.adapter_row_bytes * s.lora_adapter_ranks)

    def iteration_s(self, shape: BatchShape) -> float:
        c, g = self.calibration, self.gpu
        bw = g.hbm_bandwidth_Bps * c.memory_efficiency
        base = max(self.base_flops(shape) / (g.fp16_flops * c.compute_efficiency), self.base_bytes(shape) / bw)
        lora = 0.0
        if shape.lora_token_ranks:
            lora = max(self.lora_flops(shape) / (g.fp16_flops * c.lora_efficiency), self.lora_bytes(shape) / bw)
        return self.overhead_s + base + lora

    def load_s(self, nbytes: int) -> float:
        return nbytes / self.h2d_Bps

    def time_factor(self, u: float) -> float:
        # GPU iterations of a fixed shape are close to deterministic, and the paper gives no spread
        # to calibrate one against: no variability.
        return 1.0

    def unloaded_ttft_s(self, prompt_len: int, rank: int) -> float:
        """TTFT of a lone request: load its adapter (a miss), then prefill its prompt in one iteration."""
        load = self.load_s(rank * self.adapter_row_bytes) if rank else 0.0
        return load + self.iteration_s(BatchShape.single_prefill(prompt_len, rank))

    def memory(self, *, reserve_fraction: float = DEFAULT_RESERVE_FRACTION) -> MemoryPlan:
        return memory_plan(self.gpu, self.model, reserve_fraction=reserve_fraction)


# ------------------------------------------------------------------------------------------------
# A measured profile
# ------------------------------------------------------------------------------------------------


@attrs.frozen
class ProfileEngine:
    """The shape of the real engine that was profiled, so the simulator can mirror its limits."""

    num_kv_blocks: int
    block_size: int
    kv_block_bytes: int
    adapter_row_bytes: int
    adapter_pool_rows: int
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    max_num_batched_tokens: int


_PROFILE_KIND = "chameleon.cost_profile"
_PROFILE_VERSION = 1


@attrs.frozen(kw_only=True)
class CostProfile:
    """Iteration and load times fitted to measurements of a real executor (`chameleon calibrate`).

    Fitted forms (seconds):
      prefill_s(tokens)      = a + b · tokens + q · attention pairs   (one sequence; q may be 0)
      decode_s(seqs, ctx)    = c + d · seqs + e · ctx                 (ctx = Σ context tokens)
      lora_s                 = f · Σ tokens · rank + g · distinct adapters  (g: per-segment work)
      load_s(bytes)          = bytes / load_Bps
    and each simulated iteration's time is multiplied by a draw from `step_time_ratios` (the
    measured spread around these forms; see `time_factor`).
    A mixed batch (prefills and decodes in one iteration) costs
      a + b · prefill_tokens + q · prefill pairs + d · (sequences − 1) + e · decode ctx + lora
    when it has a prefill — each sequence past the first costs d, its per-sequence work (LM head
    row, sampling, bookkeeping) — and decode_s otherwise. Both fitted forms are reproduced at
    their own fitting points.
    """

    prefill_a_s: float
    prefill_b_s_per_token: float
    decode_c_s: float
    decode_d_s_per_seq: float
    decode_e_s_per_ctx_token: float
    prefill_q_s_per_pair: float = 0.0
    lora_s_per_token_rank: float = 0.0
    lora_s_per_adapter: float = 0.0
    load_Bps: float = math.inf
    # Measured / predicted time of the calibration steps, sorted (at most 512 order statistics):
    # the spread of step times around the fitted forms. Empty: deterministic.
    step_time_ratios: tuple[float, ...] = attrs.field(default=(), converter=tuple)
    engine: ProfileEngine | None = None
    meta: Mapping[str, Any] = attrs.field(factory=dict)

    def prefill_s(self, tokens: int) -> float:
        return (
            self.prefill_a_s
            + self.prefill_b_s_per_token * tokens
            + self.prefill_q_s_per_pair * tokens * (tokens + 1) / 2
        )

    def decode_s(self, seqs: int, context_tokens: int) -> float:
        return self.decode_c_s + self.decode_d_s_per_seq * seqs + self.decode_e_s_per_ctx_token * context_tokens

    def iteration_s(self, shape: BatchShape) -> float:
        e_ctx = self.decode_e_s_per_ctx_token * shape.decode_context_tokens
        if shape.prefill_seqs:
            t = (
                self.prefill_a_s
                + self.prefill_b_s_per_token * shape.prefill_tokens
                + self.prefill_q_s_per_pair * shape.prefill_attention_pairs
                + self.decode_d_s_per_seq * (shape.num_seqs - 1)
                + e_ctx
            )
        else:
            t = self.decode_c_s + self.decode_d_s_per_seq * shape.decode_seqs + e_ctx
        lora = self.lora_s_per_token_rank * shape.lora_token_ranks + self.lora_s_per_adapter * shape.lora_adapters
        return max(t, 0.0) + lora

    def load_s(self, nbytes: int) -> float:
        return nbytes / self.load_Bps

    def time_factor(self, u: float) -> float:
        """A draw from the measured spread: the order statistic at `u` (an empirical bootstrap).

        Why: queueing grows with the variability of service times, not just their mean
        (Pollaczek–Khinchine), so a simulator with mean step times alone underestimates the
        TTFT tail of a machine whose steps jitter (a CPU with Python on it does).
        """
        ratios = self.step_time_ratios
        return ratios[min(int(u * len(ratios)), len(ratios) - 1)] if ratios else 1.0

    # --- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self, recurse=True)
        d["meta"] = dict(self.meta)
        d["load_Bps"] = None if math.isinf(self.load_Bps) else self.load_Bps
        d["step_time_ratios"] = list(self.step_time_ratios)
        return {"kind": _PROFILE_KIND, "version": _PROFILE_VERSION, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CostProfile:
        if d.get("kind") != _PROFILE_KIND:
            raise ValueError(f"not a chameleon cost profile (kind={d.get('kind')!r})")
        if d.get("version") != _PROFILE_VERSION:
            raise ValueError(f"unsupported cost profile version {d.get('version')!r}")
        fields = {k: v for k, v in d.items() if k not in ("kind", "version")}
        engine = fields.pop("engine", None)
        load = fields.pop("load_Bps", None)
        return cls(
            **fields,
            load_Bps=math.inf if load is None else float(load),
            engine=None if engine is None else ProfileEngine(**engine),
        )

    def to_json(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, allow_nan=False)
            f.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> CostProfile:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def fit_nonnegative(
    columns: Sequence[Iterable[float]], y: Iterable[float], *, relative: bool = False
) -> list[float]:
    """Least squares y ≈ X·β with β ≥ 0: drop the most negative coefficient and refit until none is.

    Costs cannot be negative; a negative coefficient is noise fitting noise, so it is fixed at 0.
    `relative=True` minimises relative errors (each row weighted by 1/y), so that a few large
    observations do not decide the fit for the many small ones.
    """
    X = np.array([list(c) for c in columns], dtype=float).T
    target = np.asarray(list(y), dtype=float)
    if relative:
        weights = 1.0 / np.maximum(target, np.finfo(float).tiny)
        X, target = X * weights[:, None], target * weights
    active = list(range(X.shape[1]))
    beta = np.zeros(X.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(X[:, active], target, rcond=None)
        if (sol >= 0).all():
            beta[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return [float(b) for b in beta]
