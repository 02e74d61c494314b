"""Runs the real model: turns a scheduled batch into tensors, calls the model, samples."""

from __future__ import annotations

import os

import torch

from chameleon.model.attention import build_attention_metadata
from chameleon.model.llama import LlamaModel
from chameleon.model.spec import ModelSpec
from chameleon.sampler import sample
from chameleon.scheduler import SchedulerOutput


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> int:
    return 2 * spec.num_layers * spec.kv_size * torch.empty((), dtype=dtype).element_size()


class TorchExecutor:
    def __init__(
        self,
        model: LlamaModel,
        spec: ModelSpec,
        *,
        device: torch.device,
        dtype: torch.dtype,
        num_kv_blocks: int,
        block_size: int,
    ) -> None:
        self.model, self.spec = model, spec
        self.device, self.dtype = device, dtype
        self._num_kv_blocks, self._block_size = num_kv_blocks, block_size
        slots = num_kv_blocks * block_size
        shape = (slots, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(spec.num_layers)
        ]

    @property
    def num_kv_blocks(self) -> int:
        return self._num_kv_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    def execute(self, batch: SchedulerOutput) -> list[int]:
        token_ids: list[int] = []
        positions: list[int] = []
        query_lens, context_lens, tables, sample_rows = [], [], [], []
        samplers = []
        for item in batch.scheduled:
            req, n = item.request, item.num_new_tokens
            start = req.num_computed_tokens
            token_ids.extend(req.all_token_ids[start : start + n])
            positions.extend(range(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(req.block_table)
            if item.samples:
                sample_rows.append(len(token_ids) - 1)
                samplers.append(req)
        dev = self.device
        meta = build_attention_metadata(query_lens, context_lens, tables, self._block_size, dev)
        logits = self.model(
            torch.tensor(token_ids, device=dev),
            torch.tensor(positions, device=dev),
            meta,
            self.kv_caches,
            torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )
        if not samplers:
            return []
        return sample(logits, [r.sampling for r in samplers], [r.generator for r in samplers])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from chameleon.errors import ConfigError

        raise ConfigError("device='cuda' but CUDA is not available on this machine")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # fp32 on CPU: bf16 matmuls are slow on most CPUs and fp32 matches reference numerics.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def configure_threads(num_threads: int | None) -> None:
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
