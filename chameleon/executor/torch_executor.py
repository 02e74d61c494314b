"""Runs the real model: turns a scheduled batch into tensors, calls the model, samples."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from chameleon.errors import AdapterLoadError, AdapterNotFoundError
from chameleon.executor.base import (
    AdapterFault,
    PromptLogprobsAsk,
    SequenceInput,
    StepInput,
    StepOutput,
    TokenLogprobs,
    WindowView,
)
from chameleon.executor.logprobs import head_rows, prompt_logprobs
from chameleon.executor.sampler import sample_from_hidden
from chameleon.lora.ops import Backend
from chameleon.lora.peft_adapter import BaseModelSpec, LoRAAdapter, load_peft_adapter
from chameleon.lora.pool import LoRAPool
from chameleon.model.attention import build_attention_metadata
from chameleon.model.kv_quant import KVCache, QuantDType, QuantizedKVCache
from chameleon.model.llama import LlamaModel, onednn_packing_supported
from chameleon.model.spec import ModelSpec
from chameleon.outputs import AdapterInfo


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Device bytes of one token's K and V (all layers); quantized KV counts its scales too."""
    return spec.geometry.kv_cache_bytes_per_token(torch.empty((), dtype=dtype).element_size(), kv_cache_dtype)


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
        max_lora_rank: int,
        lora_pool_rows: int,
        lora_backend: Backend,
        max_cpu_adapters: int | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.model, self.spec = model, spec
        self.device, self.dtype = device, dtype
        if onednn_packing_supported(dtype, device):
            model.pack_weights()  # oneDNN-blocked weights for the CPU path (see model/llama.py)
        self.max_lora_rank, self.lora_backend = max_lora_rank, lora_backend
        self.base_spec = base_model_spec(spec, dtype)
        self.lora_pool = LoRAPool(self.base_spec, lora_pool_rows, device=device, dtype=dtype)
        # Host tier: at most max_cpu_adapters in RAM (LRU); the rest are re-read from disk on demand.
        self.max_cpu_adapters = max_cpu_adapters
        self.host_adapters: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self._sources: dict[str, tuple[str, str]] = {}  # name -> (path, content hash)
        self._host_lock = threading.Lock()
        self.host_reloads = 0
        # Prefetch copies run here, overlapped with the model (a side stream on CUDA).
        self._copier: ThreadPoolExecutor | None = None
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: dict[str, Future[None]] = {}
        self._swapped: dict[str, list[tuple[object, object]]] = {}  # request -> per layer K, V (host copies)
        self._generators: dict[str, torch.Generator] = {}  # request -> its sampling stream
        self._num_kv_blocks, self._block_size = num_kv_blocks, block_size
        slots = num_kv_blocks * block_size
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_caches = [(self._new_cache(slots), self._new_cache(slots)) for _ in range(spec.num_layers)]

    def _new_cache(self, slots: int) -> KVCache:
        s = self.spec
        if self.kv_cache_dtype == "auto":
            return torch.zeros((slots, s.num_kv_heads, s.head_dim), dtype=self.dtype, device=self.device)
        mode: QuantDType = "int8" if self.kv_cache_dtype == "int8" else "fp8_e4m3"
        return QuantizedKVCache(slots, s.num_kv_heads, s.head_dim, mode, self.device)

    @property
    def num_kv_blocks(self) -> int:
        return self._num_kv_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def adapter_pool_rows(self) -> int:
        return self.lora_pool.capacity_rows

    @property
    def kv_block_bytes(self) -> int:
        return kv_bytes_per_token(self.spec, self.dtype, self.kv_cache_dtype) * self._block_size

    @property
    def adapter_row_bytes(self) -> int:
        return self.lora_pool.bytes_per_row

    # --- adapters ---------------------------------------------------------------------------------

    def read_adapter(self, name: str, path: str) -> LoRAAdapter:
        return load_peft_adapter(name, Path(path), self.base_spec, max_lora_rank=self.max_lora_rank, dtype=self.dtype)

    def register_adapter(self, adapter: LoRAAdapter) -> AdapterInfo:
        self.lora_pool.allocate()
        with self._host_lock:
            self._sources[adapter.name] = (adapter.path, adapter.content_hash)
            self._keep_in_host(adapter)
        return AdapterInfo(
            name=adapter.name,
            path=adapter.path,
            rank=adapter.rank,
            max_rank=adapter.max_rank,
            target_modules=adapter.target_modules,
            host_bytes=adapter.nbytes,
            device_bytes=adapter.max_rank * self.adapter_row_bytes,
            content_hash=adapter.content_hash,
        )

    def unregister_adapter(self, name: str) -> None:
        self.evict_adapter(name)
        with self._host_lock:
            self.host_adapters.pop(name, None)
            self._sources.pop(name, None)

    def load_adapter(self, name: str, row: int) -> None:
        if name in self._pending:
            self._await_copy(name)  # prefetched: wait for what is left of the copy
            return
        try:
            self._copy(name, row)
        except Exception as exc:
            raise AdapterFault(name, f"{type(exc).__name__}: {exc}") from exc

    def prefetch_adapter(self, name: str, row: int) -> None:
        if self._copier is None:
            self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chameleon-adapter-copy")
        self._pending[name] = self._copier.submit(self._copy, name, row)

    def evict_adapter(self, name: str) -> None:
        pending = self._pending.pop(name, None)
        if pending is not None:
            pending.exception()  # its rows are about to be reused: let the copy finish first
        self.lora_pool.evict(name)

    def _copy(self, name: str, row: int) -> None:
        adapter = self._host_adapter(name)
        if self._copy_stream is None:
            self.lora_pool.load(adapter, row)
            return
        with torch.cuda.stream(self._copy_stream):
            self.lora_pool.load(adapter, row)
        self._copy_stream.synchronize()

    def _host_adapter(self, name: str) -> LoRAAdapter:
        with self._host_lock:
            if name in self.host_adapters:
                self.host_adapters.move_to_end(name)
                return self.host_adapters[name]
            if name not in self._sources:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered")
            path, content_hash = self._sources[name]
        adapter = self.read_adapter(name, path)  # outside the lock: disk reads are slow
        if adapter.content_hash != content_hash:
            raise AdapterLoadError(f"adapter {name!r}: the files at {path} changed since it was registered")
        with self._host_lock:
            self.host_reloads += 1
            self._keep_in_host(adapter)
        return adapter

    def _keep_in_host(self, adapter: LoRAAdapter) -> None:
        if self.device.type == "cuda":  # pinned host memory makes the host->device copy async
            adapter = _pin(adapter)
        self.host_adapters[adapter.name] = adapter
        self.host_adapters.move_to_end(adapter.name)
        while self.max_cpu_adapters is not None and len(self.host_adapters) > self.max_cpu_adapters:
            self.host_adapters.popitem(last=False)

    # --- KV swapping (preemptive schedulers) -----------------------------------------------------

    def _slots(self, block_ids: tuple[int, ...]) -> torch.Tensor:
        blocks = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return (blocks[:, None] * self._block_size + torch.arange(self._block_size, device=self.device)).flatten()

    def swap_out(self, request_id: str, block_ids: tuple[int, ...]) -> None:
        slots = self._slots(block_ids)
        pin = self.device.type == "cuda"
        host: list[tuple[object, object]] = []
        for k, v in self.kv_caches:
            host.append((_to_host(k, slots, pin), _to_host(v, slots, pin)))
        self._swapped[request_id] = host

    def swap_in(self, request_id: str, block_ids: tuple[int, ...]) -> None:
        slots = self._slots(block_ids)
        for (k, v), (hk, hv) in zip(self.kv_caches, self._swapped.pop(request_id), strict=True):
            _from_host(k, slots, hk)
            _from_host(v, slots, hv)

    def drop_swapped(self, request_id: str) -> None:
        self._swapped.pop(request_id, None)

    # --- the iteration ----------------------------------------------------------------------------

    def execute(self, step: StepInput) -> StepOutput:
        for request_id in step.finished:
            self._generators.pop(request_id, None)
        token_ids: list[int] = []
        positions: list[int] = []
        query_lens, context_lens, tables, sample_rows = [], [], [], []
        windows: list[WindowView | None] = []
        samplers: list[SequenceInput] = []
        asks: list[tuple[int, PromptLogprobsAsk]] = []  # prompt logprobs: (first row, what it asks)
        ask_ids: list[str] = []
        adapters = []
        # Rows of one adapter side by side: each adapter becomes one segment for the LoRA kernels.
        items = sorted(step.sequences, key=lambda s: self._adapter_order(s.adapter))
        if self._pending:
            for name in {s.adapter for s in items if s.adapter is not None} & self._pending.keys():
                self._await_copy(name)  # a prefetched adapter this batch needs must be complete
        for seq in items:
            n, start = len(seq.token_ids), seq.start_pos
            if seq.prompt_logprobs is not None:
                asks.append((len(token_ids), seq.prompt_logprobs))
                ask_ids.append(seq.request_id)
            token_ids.extend(seq.token_ids)
            positions.extend(range(start, start + n))
            query_lens.append(n)
            context_lens.append(seq.cached_tokens + n)  # positions stay the original ones (RoPE)
            tables.append(seq.block_table)
            windows.append(seq.window)
            adapters.append(seq.adapter)
            if seq.sampling is not None:
                sample_rows.append(len(token_ids) - 1)
                samplers.append(seq)
        dev = self.device
        meta = build_attention_metadata(query_lens, context_lens, tables, self._block_size, dev, windows, self.dtype)
        rows, at_sample, at_prompt = head_rows(sample_rows, asks) if asks else (sample_rows, [], [])
        hidden = self.model(
            torch.tensor(token_ids, device=dev),
            torch.tensor(positions, device=dev),
            meta,
            self.kv_caches,
            torch.tensor(rows, dtype=torch.long, device=dev),
            self.lora_pool.batch(adapters, query_lens, self.lora_backend),
        )
        if not asks:
            return self._sample(hidden, samplers) if samplers else StepOutput()
        # Prompt logprobs (only sequences that ask): their prompt rows reached the head as well.
        out = self._sample(_take(hidden, at_sample), samplers) if samplers else StepOutput()
        out.prompt_logprobs.update(
            prompt_logprobs(_take(hidden, at_prompt), list(zip(ask_ids, (a for _, a in asks), strict=True)),
                            self.model.logits)
        )
        return out

    def _sample(self, hidden: torch.Tensor, samplers: list[SequenceInput]) -> StepOutput:
        """Sample every row at once; if that raises, row by row, so one bad row fails alone."""
        logprobs: dict[int, TokenLogprobs] = {}
        try:
            tokens = self._sample_rows(hidden, samplers, logprobs)
        except Exception:  # a degenerate row: find it without failing its neighbours
            return self._sample_each(hidden, samplers)
        out = StepOutput()
        for i, (seq, token) in enumerate(zip(samplers, tokens, strict=True)):
            self._accept(out, seq.request_id, token, logprobs.get(i))
        return out

    def _sample_each(self, hidden: torch.Tensor, samplers: list[SequenceInput]) -> StepOutput:
        out = StepOutput()
        for i, seq in enumerate(samplers):
            logprobs: dict[int, TokenLogprobs] = {}
            try:
                (token,) = self._sample_rows(hidden[i : i + 1], [seq], logprobs)
            except Exception as exc:
                out.errors[seq.request_id] = f"sampling failed: {type(exc).__name__}: {exc}"
                continue
            self._accept(out, seq.request_id, token, logprobs.get(0))
        return out

    def _sample_rows(
        self, hidden: torch.Tensor, samplers: list[SequenceInput], logprobs: dict[int, TokenLogprobs]
    ) -> list[int]:
        return sample_from_hidden(
            hidden,
            [s.sampling for s in samplers],  # type: ignore[misc]  # set for every sampler
            [self._generator(s) for s in samplers],
            logits=self.model.logits,
            greedy=self.model.greedy_tokens,
            logprobs_out=logprobs,
        )

    def _accept(self, out: StepOutput, request_id: str, token: object, logprobs: TokenLogprobs | None) -> None:
        """Keep a sampled token if it is a real id; a sampler's failure marker fails the row."""
        if isinstance(token, int) and not isinstance(token, bool) and 0 <= token < self.spec.vocab_size:
            out[request_id] = token
            if logprobs is not None:
                out.logprobs[request_id] = logprobs
        else:
            out.errors[request_id] = f"the sampler produced no valid token (got {token!r})"

    def _await_copy(self, name: str) -> None:
        try:
            self._pending.pop(name).result()
        except Exception as exc:
            raise AdapterFault(name, f"{type(exc).__name__}: {exc}") from exc

    def _generator(self, seq: SequenceInput) -> torch.Generator:
        """The request's own generator: its samples do not depend on its batch neighbours, and a
        preempted request resumes the same random stream."""
        gen = self._generators.get(seq.request_id)
        if gen is None:
            gen = self._generators[seq.request_id] = torch.Generator().manual_seed(seq.seed)
        return gen

    def _adapter_order(self, name: str | None) -> int:
        return -1 if name is None else self.lora_pool.resident[name][0]


def base_model_spec(spec: ModelSpec, dtype: torch.dtype) -> BaseModelSpec:
    """The shapes adapters are validated against, from the model's geometry."""
    return BaseModelSpec(num_layers=spec.num_layers, module_shapes=spec.geometry.module_shapes(), dtype=dtype)

def _take(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return hidden.index_select(0, torch.tensor(rows, dtype=torch.long, device=hidden.device))


def _to_host(cache: KVCache, slots: torch.Tensor, pin: bool) -> object:
    """A host copy of some slots of one cache (codes and scales when quantized)."""
    parts = cache.take(slots) if isinstance(cache, QuantizedKVCache) else (cache[slots],)
    host = tuple(p.to("cpu") for p in parts)
    return tuple(p.pin_memory() for p in host) if pin else host


def _from_host(cache: KVCache, slots: torch.Tensor, host: object) -> None:
    parts: tuple[torch.Tensor, ...] = host  # type: ignore[assignment]  # what _to_host made
    if isinstance(cache, QuantizedKVCache):
        cache.put(slots, (parts[0], parts[1]))
    else:
        cache.index_copy_(0, slots, parts[0].to(cache.device, non_blocking=True))


def _pin(adapter: LoRAAdapter) -> LoRAAdapter:
    import attrs

    weights = {k: attrs.evolve(w, a=w.a.pin_memory(), b_t=w.b_t.pin_memory()) for k, w in adapter.weights.items()}
    return attrs.evolve(adapter, weights=weights)


def resolve_lora_backend(name: str, device: torch.device) -> Backend:
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        from chameleon.errors import ConfigError

        raise ConfigError("lora_backend='triton' needs CUDA (or TRITON_INTERPRET=1, for tests only)")
    return name  # type: ignore[return-value]


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
    """One intra-op thread per core this process may run on (its CPU affinity: a container or
    `taskset` may grant fewer cores than the machine has), unless set or OMP_NUM_THREADS says."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, usable or 1))
