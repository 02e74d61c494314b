"""`SimulatedExecutor`: the `Executor` protocol over a cost model and a virtual clock (no torch).

The engine core, scheduler and adapter cache are the real ones; only the iteration is simulated:
`execute` advances the injected `ManualClock` by the cost model's time for the batch's shape;
adapters are synthetic (`synthetic://rank=R`); one FIFO host->device link carries adapter copies
and KV swaps, with prefetches overlapping compute. The modelling choices: `docs/simulator.md`.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping, Sequence

import attrs

from chameleon.clock import ManualClock
from chameleon.errors import AdapterNotFoundError, AdapterValidationError
from chameleon.executor.base import StepInput, StepOutput
from chameleon.outputs import AdapterInfo
from chameleon.sim.analytic import A40_LLAMA7B_CALIBRATION, AnalyticCostModel, Calibration
from chameleon.sim.hardware import DEFAULT_LORA_TARGETS, DEFAULT_RESERVE_FRACTION, GPUSpec, ModelCost
from chameleon.sim.profile import CostProfile
from chameleon.sim.shape import BatchShape, CostModel

__all__ = ["SYNTHETIC_SCHEME", "SimStats", "SimulatedExecutor", "SyntheticAdapter", "batch_shape", "synthetic_path"]

SYNTHETIC_SCHEME = "synthetic://"
_MIN_ITERATION_S = 1e-9
_SYNTHETIC_RE = re.compile(r"^synthetic://rank=([1-9][0-9]*)$")


def synthetic_path(rank: int) -> str:
    """The adapter 'path' that names a synthetic adapter of `rank`."""
    return f"{SYNTHETIC_SCHEME}rank={rank}"


@attrs.frozen
class SyntheticAdapter:
    """What `read_adapter` returns: a name and a rank, no weights."""

    name: str
    path: str
    rank: int


@attrs.define
class SimStats:
    iterations: int = 0
    busy_s: float = 0.0  # virtual seconds spent in iterations
    loads: int = 0
    prefetches: int = 0
    load_wait_s: float = 0.0  # virtual seconds adapter loads held the critical path
    bytes_loaded: int = 0
    swap_wait_s: float = 0.0  # virtual seconds KV swaps held the critical path
    bytes_swapped: int = 0


class SimulatedExecutor:
    def __init__(
        self,
        cost: CostModel,
        clock: ManualClock,
        *,
        num_kv_blocks: int,
        block_size: int,
        kv_block_bytes: int,
        adapter_row_bytes: int,
        adapter_pool_rows: int,
        lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
        token_id: int = 0,
        seed: int = 0,
    ) -> None:
        if num_kv_blocks < 1 or block_size < 1 or adapter_pool_rows < 0:
            raise ValueError("num_kv_blocks and block_size must be >= 1, adapter_pool_rows >= 0")
        self.cost, self.clock = cost, clock
        self._num_kv_blocks, self._block_size = num_kv_blocks, block_size
        self._kv_block_bytes, self._row_bytes = kv_block_bytes, adapter_row_bytes
        self._pool_rows = adapter_pool_rows
        self.lora_targets = tuple(lora_targets)
        self.token_id = token_id
        self._rng = random.Random(seed)  # draws of the cost model's step-time variability
        self.ranks: dict[str, int] = {}  # registered adapters
        self.resident: dict[str, int] = {}  # adapter -> first pool row
        self._prefetch_done: dict[str, float] = {}  # adapter -> when its background copy ends
        self._link_free_at = 0.0  # host -> device
        self._d2h_free_at = 0.0  # device -> host (KV swap-out)
        self._swapped: dict[str, int] = {}  # request -> KV blocks held in host memory
        self.stats = SimStats()

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_gpu(
        cls,
        gpu: GPUSpec,
        model: ModelCost,
        clock: ManualClock,
        *,
        calibration: Calibration = A40_LLAMA7B_CALIBRATION,
        block_size: int = 16,
        adapter_pool_rows: int | None = None,
        reserve_fraction: float = DEFAULT_RESERVE_FRACTION,
        lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
        kv_cache_dtype: str = "auto",
    ) -> SimulatedExecutor:
        """`kv_cache_dtype`: bytes per KV token as the real cache stores them (int8 / fp8: one byte
        per value plus fp16 scales), so the same memory holds more blocks. Iteration costs stay
        those of fp16 KV: the torch path dequantizes by gathering, it reads no fewer bytes."""
        cost = AnalyticCostModel(gpu, model, calibration, lora_targets=tuple(lora_targets))
        free = cost.memory(reserve_fraction=reserve_fraction).free_bytes
        kv_block_bytes = model.geometry.kv_cache_bytes_per_token(model.dtype_bytes, kv_cache_dtype) * block_size
        row_bytes = cost.adapter_row_bytes
        return cls(
            cost,
            clock,
            num_kv_blocks=free // kv_block_bytes,
            block_size=block_size,
            kv_block_bytes=kv_block_bytes,
            adapter_row_bytes=row_bytes,
            adapter_pool_rows=free // row_bytes if adapter_pool_rows is None else adapter_pool_rows,
            lora_targets=lora_targets,
        )

    @classmethod
    def from_profile(
        cls, profile: CostProfile, clock: ManualClock, *, adapter_pool_rows: int | None = None, seed: int = 0
    ) -> SimulatedExecutor:
        e = profile.engine
        if e is None:
            raise ValueError("this cost profile records no engine shape (num_kv_blocks, ...): re-run calibrate")
        return cls(
            profile,
            clock,
            num_kv_blocks=e.num_kv_blocks,
            block_size=e.block_size,
            kv_block_bytes=e.kv_block_bytes,
            adapter_row_bytes=e.adapter_row_bytes,
            adapter_pool_rows=e.adapter_pool_rows if adapter_pool_rows is None else adapter_pool_rows,
            seed=seed,
        )

    # --- Executor protocol: sizes ------------------------------------------------------------------

    @property
    def num_kv_blocks(self) -> int:
        return self._num_kv_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def adapter_pool_rows(self) -> int:
        return self._pool_rows

    @property
    def kv_block_bytes(self) -> int:
        return self._kv_block_bytes

    @property
    def adapter_row_bytes(self) -> int:
        return self._row_bytes

    # --- adapters ------------------------------------------------------------------------------------

    def read_adapter(self, name: str, path: str) -> SyntheticAdapter:
        match = _SYNTHETIC_RE.match(str(path))
        if match is None:
            raise AdapterValidationError(
                f"adapter {name!r}: the simulator only knows synthetic adapters, "
                f"path must look like {synthetic_path(16)!r}, got {path!r}"
            )
        return SyntheticAdapter(name, str(path), int(match.group(1)))

    def register_adapter(self, adapter: SyntheticAdapter) -> AdapterInfo:
        self.ranks[adapter.name] = adapter.rank
        nbytes = adapter.rank * self._row_bytes
        digest = hashlib.sha256(f"synthetic:{adapter.name}:{adapter.rank}".encode()).hexdigest()
        return AdapterInfo(
            name=adapter.name,
            path=adapter.path,
            rank=adapter.rank,
            max_rank=adapter.rank,
            target_modules=self.lora_targets,
            host_bytes=nbytes,
            device_bytes=nbytes,
            content_hash=digest,
        )

    def unregister_adapter(self, name: str) -> None:
        self.evict_adapter(name)
        self.ranks.pop(name, None)

    def _transfer_s(self, name: str) -> float:
        try:
            rank = self.ranks[name]
        except KeyError:
            raise AdapterNotFoundError(f"adapter {name!r} is not registered with the simulator") from None
        nbytes = rank * self._row_bytes
        self.stats.bytes_loaded += nbytes
        adapter_load = getattr(self.cost, "adapter_load_s", None)  # the analytic link model's
        return adapter_load(nbytes) if adapter_load is not None else self.cost.load_s(nbytes)

    def _start_copy(self, name: str) -> float:
        """Queue a copy on the link; returns when it ends."""
        start = max(self.clock.now(), self._link_free_at)
        self._link_free_at = start + self._transfer_s(name)
        return self._link_free_at

    def prefetch_adapter(self, name: str, row: int) -> None:
        if name in self._prefetch_done:
            return  # already on its way
        self._prefetch_done[name] = self._start_copy(name)
        self.resident[name] = row
        self.stats.prefetches += 1

    def load_adapter(self, name: str, row: int) -> None:
        done = self._prefetch_done.pop(name, None)
        if done is None:
            done = self._start_copy(name)
        wait = max(0.0, done - self.clock.now())
        self.clock.advance(wait)
        self.resident[name] = row
        self.stats.loads += 1
        self.stats.load_wait_s += wait

    def evict_adapter(self, name: str) -> None:
        # An evicted in-flight prefetch keeps the link busy until it ends (`_link_free_at` stays).
        self._prefetch_done.pop(name, None)
        self.resident.pop(name, None)

    def _await_prefetches(self, step: StepInput) -> None:
        # A batch cannot run before its adapters' weights are on the device, even if the engine
        # counted a prefetched adapter as resident without calling `load_adapter`.
        pending = self._prefetch_done
        done = max((pending.get(s.adapter, 0.0) for s in step.sequences if s.adapter), default=0.0)
        wait = max(0.0, done - self.clock.now())
        if wait:
            self.clock.advance(wait)
            self.stats.load_wait_s += wait

    # --- KV swapping (preemptive schedulers) -------------------------------------------------------

    def swap_out(self, request_id: str, block_ids: tuple[int, ...]) -> None:
        # Device -> host runs on the link's other direction (PCIe is full duplex), at the same rate.
        nbytes = len(block_ids) * self._kv_block_bytes
        start = max(self.clock.now(), self._d2h_free_at)
        self._d2h_free_at = start + self.cost.load_s(nbytes)
        self._swapped[request_id] = len(block_ids)
        self._wait_swap(self._d2h_free_at, nbytes)

    def swap_in(self, request_id: str, block_ids: tuple[int, ...]) -> None:
        self._swapped.pop(request_id, None)
        nbytes = len(block_ids) * self._kv_block_bytes
        start = max(self.clock.now(), self._link_free_at)  # shares host -> device with adapter copies
        self._link_free_at = start + self.cost.load_s(nbytes)
        self._wait_swap(self._link_free_at, nbytes)

    def drop_swapped(self, request_id: str) -> None:
        self._swapped.pop(request_id, None)

    def _wait_swap(self, done: float, nbytes: int) -> None:
        wait = max(0.0, done - self.clock.now())
        self.clock.advance(wait)
        self.stats.swap_wait_s += wait
        self.stats.bytes_swapped += nbytes

    # --- the iteration ---------------------------------------------------------------------------------

    def batch_shape(self, step: StepInput) -> BatchShape:
        return batch_shape(step, self.ranks)

    def execute(self, step: StepInput) -> StepOutput:
        if self._prefetch_done:
            self._await_prefetches(step)
        shape = self.batch_shape(step)
        dt = self.cost.iteration_s(shape) * self.cost.time_factor(self._rng.random())
        # An iteration always takes some time: the driver tells an iteration from an idle step by it.
        dt = max(dt, _MIN_ITERATION_S)
        self.clock.advance(dt)
        self.stats.iterations += 1
        self.stats.busy_s += dt
        return StepOutput({s.request_id: self.token_id for s in step.sequences if s.sampling is not None})


def batch_shape(step: StepInput, ranks: Mapping[str, int]) -> BatchShape:
    """Aggregate a scheduled batch into the numbers its cost depends on (`ranks`: adapter -> rank).

    The same sums as `BatchShapeBuilder`, inlined: this runs every iteration over every running
    sequence and is most of the simulator's own cost.
    """
    seqs = tokens = p_seqs = p_tokens = p_pairs = d_seqs = d_ctx = ctx = pairs = sampled = lora = 0
    adapters: dict[str, int] = {}
    for seq in step.sequences:
        # Keys read from the cache: a cached prefix counts (its tokens are not in token_ids), the
        # tokens a bounded window evicted do not.
        n, computed = len(seq.token_ids), seq.cached_tokens
        seqs += 1
        tokens += n
        ctx += computed + n
        if n == 1 and seq.start_pos >= seq.num_prompt_tokens:  # decoding
            d_seqs += 1
            d_ctx += computed + 1
            pairs += computed + 1
        else:  # prefilling (a chunk of) the prompt, or re-prefilling after a preemption
            p_seqs += 1
            p_tokens += n
            chunk_pairs = n * computed + n * (n + 1) // 2
            p_pairs += chunk_pairs
            pairs += chunk_pairs
        if seq.sampling is not None:
            sampled += 1
        if seq.adapter is not None:
            rank = ranks.get(seq.adapter, 0)
            lora += n * rank
            adapters[seq.adapter] = rank
    return BatchShape(
        num_seqs=seqs,
        num_tokens=tokens,
        prefill_seqs=p_seqs,
        prefill_tokens=p_tokens,
        prefill_attention_pairs=p_pairs,
        decode_seqs=d_seqs,
        decode_context_tokens=d_ctx,
        context_tokens=ctx,
        attention_pairs=pairs,
        sampled=sampled,
        lora_token_ranks=lora,
        lora_adapter_ranks=sum(adapters.values()),
        lora_adapters=len(adapters),
    )
