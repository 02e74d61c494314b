"""Build an `EngineCore` for a model directory: sizes, devices, tokenizer, executor."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from chameleon.clock import Clock
from chameleon.config import EngineConfig
from chameleon.engine_core import CoreLimits, EngineCore
from chameleon.errors import ConfigError, ModelLoadError
from chameleon.executor.torch_executor import (
    TorchExecutor,
    configure_threads,
    kv_bytes_per_token,
    resolve_device,
    resolve_dtype,
    resolve_lora_backend,
)
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


def num_kv_blocks(config: EngineConfig, spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = kv_bytes_per_token(spec, dtype) * config.block_size
    if device.type == "cuda" and config.kv_cache_memory_bytes is None:
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.9) // per_block
    return config.default_kv_bytes_cpu() // per_block


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
    blocks = num_kv_blocks(config, spec, dtype, device)
    kv_tokens = blocks * config.block_size
    if kv_tokens < max_len:
        if config.max_model_len is not None:
            raise ConfigError(
                f"the KV cache holds {kv_tokens} tokens, fewer than max_model_len={max_len}: "
                "raise kv_cache_memory_bytes / num_kv_blocks or lower max_model_len"
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
        lora_pool_rows=config.lora_pool_rows,
        lora_backend=resolve_lora_backend(config.lora_backend, device),
    )
    tokenizer = load_tokenizer(path)
    eos = set(spec.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    limits = CoreLimits(
        max_model_len=max_len,
        vocab_size=spec.vocab_size,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        eos_token_ids=tuple(sorted(eos)),
    )
    return EngineCore(
        executor,
        limits,
        scheduler=config.scheduler,
        adapter_cache=config.adapter_cache,
        tokenizer=tokenizer,
        clock=clock,
        seed=config.seed,
    )
