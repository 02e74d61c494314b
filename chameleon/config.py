"""Engine configuration (one frozen attrs class, validated on construction)."""

from __future__ import annotations

from typing import Literal

import attrs

from chameleon.errors import ConfigError
from chameleon.sched.options import SchedulerOptions

DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
LoRABackend = Literal["auto", "torch", "triton"]
SchedulerName = Literal["chameleon", "fifo", "sjf", "mlfq", "slora-exact", "chameleon-static", "chameleon-k4", "chameleon-paper"]
AdapterCacheName = Literal["chameleon", "lru", "slora", "fairshare"]
_SCHEDULERS = ("chameleon", "fifo", "sjf", "mlfq", "slora-exact", "chameleon-static", "chameleon-k4", "chameleon-paper")

_MiB = 1 << 20


def _positive(_inst: object, attribute: attrs.Attribute, value: int | None) -> None:  # type: ignore[type-arg]
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"EngineConfig.{attribute.name} must be a positive int, got {value!r}")


def _one_of(*choices: str):  # type: ignore[no-untyped-def]
    def check(_inst: object, attribute: attrs.Attribute, value: str) -> None:  # type: ignore[type-arg]
        if value not in choices:
            raise ConfigError(f"EngineConfig.{attribute.name} must be one of {choices}, got {value!r}")

    return check


@attrs.frozen
class EngineConfig:
    """How the engine runs. Defaults suit a laptop CPU; every field is checked here, not deep inside."""

    device: Device = attrs.field(default="auto", validator=_one_of("auto", "cpu", "cuda"))
    dtype: DType = attrs.field(default="auto", validator=_one_of("auto", "float32", "bfloat16", "float16"))
    # None: the model's max_position_embeddings (capped by the KV cache size).
    max_model_len: int | None = attrs.field(default=None, validator=_positive)
    block_size: int = attrs.field(default=16, validator=_positive)
    # One budget for KV blocks, the activation reserve and resident adapters (KV always wins).
    # None: 1 GiB on CPU, 90% of the free memory after weights on CUDA.
    device_memory_bytes: int | None = attrs.field(default=None, validator=_positive)
    # None: an estimate from max_num_batched_tokens and the model's sizes (see factory.py).
    activation_reserve_bytes: int | None = attrs.field(default=None, validator=_positive)
    # Fixes the KV cache size; the budget then defaults to exactly these blocks plus the reserve.
    num_kv_blocks: int | None = attrs.field(default=None, validator=_positive)
    max_num_seqs: int = attrs.field(default=128, validator=_positive)
    max_num_batched_tokens: int = attrs.field(default=2048, validator=_positive)
    scheduler: SchedulerName = attrs.field(default="chameleon", validator=_one_of(*_SCHEDULERS))
    scheduler_options: SchedulerOptions = attrs.field(factory=SchedulerOptions)
    # Adapters. Device memory for adapters is a pool of max_loras * max_lora_rank rank rows; any mix
    # of adapters whose ranks add up to that can be resident at once (no padding to the max rank).
    max_loras: int = attrs.field(default=8, validator=_positive)
    max_lora_rank: int = attrs.field(default=64, validator=_positive)
    lora_backend: LoRABackend = attrs.field(default="auto", validator=_one_of("auto", "torch", "triton"))
    adapter_cache: AdapterCacheName = attrs.field(default="chameleon", validator=_one_of("chameleon", "lru", "slora", "fairshare"))
    max_cpu_adapters: int | None = attrs.field(default=None, validator=_positive)  # host tier; None: all
    adapter_prefetch_depth: int = 8  # waiting requests whose adapters load ahead of admission; 0: off
    adapter_arrival_prefetch: bool = False  # prefetch for requests that have not arrived (predictor)
    seed: int = 0  # seeds the sampling of requests that bring no seed of their own
    num_threads: int | None = attrs.field(default=None, validator=_positive)  # torch intra-op threads on CPU

    @property
    def lora_pool_rows(self) -> int:
        return self.max_loras * self.max_lora_rank

    def default_budget_cpu(self) -> int:
        return self.device_memory_bytes or 1024 * _MiB
