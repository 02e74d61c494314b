"""Build an `EngineCore` for a model directory: sizes, devices, tokenizer, executor."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from chameleon.clock import Clock
from chameleon.config import EngineConfig
from chameleon.engine.core import CoreLimits, EngineCore
from chameleon.errors import ConfigError, ModelLoadError
from chameleon.executor.torch_executor import (
    TorchExecutor,
    configure_threads,
    kv_bytes_per_token,
    resolve_device,
    resolve_dtype,
    resolve_lora_backend,
)
from chameleon.memory.budget import MemoryBudget
from chameleon.model.loader import load_hf_config, load_model
from chameleon.model.spec import ModelSpec, model_spec_from_config

log = logging.getLogger(__name__)


def load_tokenizer(path: str | os.PathLike[str]) -> Any | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as exc:
        log.warning("%s: no usable tokenizer (%s); prompts must be token ids and no text is produced", path, exc)
        return None


def resolve_max_model_len(config: EngineConfig, spec: ModelSpec) -> int:
    limit = spec.max_position_embeddings
    if spec.sliding_window is not None:
        limit = min(limit, spec.sliding_window)  # we attend to the whole context: stay inside the window
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ConfigError(f"max_model_len={config.max_model_len} exceeds what the model supports ({limit})")
    return config.max_model_len


def activation_reserve(config: EngineConfig, spec: ModelSpec, dtype: torch.dtype) -> int:
    """Bytes kept for one iteration's activations: hidden states and MLP intermediates of the
    largest batch, plus float32 logits for every sequence. An estimate, not a measurement."""
    if config.activation_reserve_bytes is not None:
        return config.activation_reserve_bytes
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = (4 * spec.hidden_size + 3 * spec.intermediate_size) * elem
    return config.max_num_batched_tokens * per_token + config.max_num_seqs * spec.vocab_size * 4


def memory_budget(
    config: EngineConfig, spec: ModelSpec, dtype: torch.dtype, device: torch.device, reserve: int
) -> tuple[int, int]:
    """(budget bytes, KV blocks). KV may grow into the whole budget except the reserve."""
    block_bytes = kv_bytes_per_token(spec, dtype, config.kv_cache_dtype) * config.block_size
    if config.num_kv_blocks is not None:
        total = config.device_memory_bytes or config.num_kv_blocks * block_bytes + reserve
        return total, config.num_kv_blocks
    if config.device_memory_bytes is not None:
        total = config.device_memory_bytes
    elif device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        total = int(free * 0.9)
    else:
        total = config.default_budget_cpu()
    if total < reserve + block_bytes:
        raise ConfigError(f"device_memory_bytes={total} cannot hold the activation reserve ({reserve}) and one KV block")
    return total, (total - reserve) // block_bytes


def lora_pool_rows(config: EngineConfig, spec: ModelSpec, dtype: torch.dtype, usable_bytes: int) -> int:
    """Rank rows of the device adapter pool: `max_loras * max_lora_rank`, but never more than the
    budget could ever let adapters occupy, so the pool tensor stays inside `device_memory_bytes`."""
    from chameleon.model.geometry import TARGET_MODULES

    row_bytes = spec.geometry.lora_row_bytes(TARGET_MODULES, torch.empty((), dtype=dtype).element_size())
    return max(1, min(config.lora_pool_rows, usable_bytes // row_bytes))


def resolve_kv_cache_dtype(name: str, device: torch.device) -> str:
    if name == "fp8_e4m3":
        from chameleon.model.kv_quant import fp8_supported

        if not fp8_supported(device):
            raise ConfigError(f"kv_cache_dtype='fp8_e4m3' needs torch float8 support on {device}")
    return name


def _check_window(config: EngineConfig, num_blocks: int) -> None:
    """The KV cache must hold one sequence's window at its peak (sinks + recent + one step's tokens)."""
    from chameleon.memory.kv_blocks import KVBlockManager

    assert config.kv_window is not None
    peak = KVBlockManager(num_blocks, config.block_size, window=config.kv_window).peak_blocks(
        1 << 40, config.max_num_batched_tokens
    )
    if peak > num_blocks:
        raise ConfigError(
            f"kv_window={config.kv_window} with max_num_batched_tokens={config.max_num_batched_tokens} needs up to "
            f"{peak} KV blocks per sequence; the cache has {num_blocks}: raise the memory or shrink the window"
        )


def build_core(model_path: str | os.PathLike[str], config: EngineConfig, *, clock: Clock | None = None) -> EngineCore:
    path = Path(model_path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a directory (expected a local Hugging Face model directory)")
    configure_threads(config.num_threads)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    spec = model_spec_from_config(load_hf_config(path))  # fail fast, before reading any weights
    max_len = resolve_max_model_len(config, spec)
    model = load_model(path, spec, dtype, device, max_positions=max_len)
    reserve = activation_reserve(config, spec, dtype)
    budget_bytes, blocks = memory_budget(config, spec, dtype, device, reserve)
    kv_tokens = blocks * config.block_size
    if config.kv_window is not None:  # a sequence holds a bounded number of blocks, however long
        _check_window(config, blocks)
    elif kv_tokens < max_len:
        if config.max_model_len is not None:
            raise ConfigError(
                f"the KV cache holds {kv_tokens} tokens, fewer than max_model_len={max_len}: "
                "raise device_memory_bytes / num_kv_blocks or lower max_model_len"
            )
        max_len = kv_tokens
    executor = TorchExecutor(
        model,
        spec,
        device=device,
        dtype=dtype,
        num_kv_blocks=blocks,
        block_size=config.block_size,
        max_lora_rank=config.max_lora_rank,
        lora_pool_rows=lora_pool_rows(config, spec, dtype, budget_bytes - reserve),
        lora_backend=resolve_lora_backend(config.lora_backend, device),
        max_cpu_adapters=config.max_cpu_adapters,
        kv_cache_dtype=resolve_kv_cache_dtype(config.kv_cache_dtype, device),
    )
    memory = MemoryBudget(
        total_bytes=budget_bytes,
        reserve_bytes=reserve,
        kv_block_bytes=executor.kv_block_bytes,
        adapter_row_bytes=executor.adapter_row_bytes,
    )
    tokenizer = load_tokenizer(path)
    eos = set(spec.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    limits = CoreLimits(max_model_len=max_len, vocab_size=spec.vocab_size, eos_token_ids=tuple(sorted(eos)))
    return EngineCore(executor, config, limits, memory=memory, tokenizer=tokenizer, clock=clock)
