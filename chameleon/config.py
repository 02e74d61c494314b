"""Engine configuration (one frozen attrs class, validated on construction)."""

from __future__ import annotations

from typing import Literal

import attrs

from chameleon.errors import ConfigError
from chameleon.sched import SCHEDULERS, SchedulerName
from chameleon.sched.options import SchedulerOptions
from chameleon.validate import boolean, non_negative_int, one_of, optional_positive_int, positive_int

DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
LoRABackend = Literal["auto", "torch", "triton"]
KVCacheDType = Literal["auto", "int8", "fp8_e4m3"]
AdapterCacheName = Literal["chameleon", "lru", "slora", "fairshare"]

_MiB = 1 << 20


def _seed(inst: object, attribute: attrs.Attribute, value: object) -> None:  # type: ignore[type-arg]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ConfigError(f"{type(inst).__name__}.{attribute.name} must be an int in [0, 2**63), got {value!r}")


def _options(inst: object, attribute: attrs.Attribute, value: object) -> None:  # type: ignore[type-arg]
    if not isinstance(value, SchedulerOptions):
        raise ConfigError(f"{type(inst).__name__}.{attribute.name} must be a SchedulerOptions, got {value!r}")


def _window(inst: object, attribute: attrs.Attribute, value: object) -> None:  # type: ignore[type-arg]
    if value is not None and not isinstance(value, KVWindow):
        raise ConfigError(f"{type(inst).__name__}.{attribute.name} must be a KVWindow or None, got {value!r}")


@attrs.frozen
class KVWindow:
    """Bounded-window KV (StreamingLLM's attention sinks + a recent window; docs/kv_cache.md).

    Every query attends to the first `sink_tokens` tokens and to at least the `recent_tokens`
    tokens before it; KV blocks wholly between the two are freed as the sequence grows, so a
    sequence holds a bounded number of blocks however long it gets. Both edges are rounded out to
    whole KV blocks (the sinks up, the window start down). An approximation: outputs differ from
    full attention once a sequence outgrows the window. Tokens keep their original positions.
    """

    recent_tokens: int = attrs.field(validator=positive_int)
    sink_tokens: int = attrs.field(default=4, validator=non_negative_int)  # StreamingLLM uses 4


@attrs.frozen
class EngineConfig:
    """How the engine runs. Defaults suit a laptop CPU; every field is checked here (ConfigError), not deep
    inside: ints are never bools, enums are checked against their choices, options by type."""

    device: Device = attrs.field(default="auto", validator=one_of("auto", "cpu", "cuda"))
    dtype: DType = attrs.field(default="auto", validator=one_of("auto", "float32", "bfloat16", "float16"))
    # None: the model's max_position_embeddings (capped by the KV cache size).
    max_model_len: int | None = attrs.field(default=None, validator=optional_positive_int)
    block_size: int = attrs.field(default=16, validator=positive_int)
    # One budget for KV blocks, the activation reserve and resident adapters (KV always wins).
    # None: 1 GiB on CPU, 90% of the free memory after weights on CUDA.
    device_memory_bytes: int | None = attrs.field(default=None, validator=optional_positive_int)
    # None: an estimate from max_num_batched_tokens and the model's sizes (see factory.py).
    activation_reserve_bytes: int | None = attrs.field(default=None, validator=optional_positive_int)
    # Fixes the KV cache size; the budget then defaults to exactly these blocks plus the reserve.
    num_kv_blocks: int | None = attrs.field(default=None, validator=optional_positive_int)
    max_num_seqs: int = attrs.field(default=128, validator=positive_int)
    max_num_batched_tokens: int = attrs.field(default=2048, validator=positive_int)
    scheduler: SchedulerName = attrs.field(default="chameleon", validator=one_of(*SCHEDULERS))
    scheduler_options: SchedulerOptions = attrs.field(factory=SchedulerOptions, validator=_options)
    # Adapters. Device memory for adapters is a pool of max_loras * max_lora_rank rank rows; any mix
    # of adapters whose ranks add up to that can be resident at once (no padding to the max rank).
    max_loras: int = attrs.field(default=8, validator=positive_int)
    max_lora_rank: int = attrs.field(default=64, validator=positive_int)
    lora_backend: LoRABackend = attrs.field(default="auto", validator=one_of("auto", "torch", "triton"))
    adapter_cache: AdapterCacheName = attrs.field(default="chameleon", validator=one_of("chameleon", "lru", "slora", "fairshare"))
    max_cpu_adapters: int | None = attrs.field(default=None, validator=optional_positive_int)  # host tier; None: all
    # Waiting requests whose adapters load ahead of admission; 0: off.
    adapter_prefetch_depth: int = attrs.field(default=8, validator=non_negative_int)
    # Prefetch for requests that have not arrived yet (the arrival predictor).
    adapter_arrival_prefetch: bool = attrs.field(default=False, validator=boolean)
    seed: int = attrs.field(default=0, validator=_seed)  # seeds requests that bring no seed of their own
    # torch intra-op threads on CPU.
    num_threads: int | None = attrs.field(default=None, validator=optional_positive_int)
    # KV cache techniques (docs/kv_cache.md). Prefix caching (on by default) shares full KV blocks by
    # content (tokens, adapter content hash, KV dtype, window); kv_cache_dtype "int8"/"fp8_e4m3"
    # stores KV quantized.
    enable_prefix_caching: bool = attrs.field(default=True, validator=boolean)
    kv_cache_dtype: KVCacheDType = attrs.field(default="auto", validator=one_of("auto", "int8", "fp8_e4m3"))
    # Bounded-window eviction (opt-in, an approximation): sinks + a recent window per sequence.
    kv_window: KVWindow | None = attrs.field(default=None, validator=_window)
    # Unfinished requests (waiting + running) past which `generate()` raises EngineOverloadedError at once.
    max_queued_requests: int = attrs.field(default=4096, validator=positive_int)

    @property
    def lora_pool_rows(self) -> int:
        return self.max_loras * self.max_lora_rank

    def default_budget_cpu(self) -> int:
        return self.device_memory_bytes or 1024 * _MiB
