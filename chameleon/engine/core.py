"""The synchronous engine core: requests in, one iteration per `step()`, outputs out.

No asyncio here and no reading of wall time: the clock is injected, so the same core runs under
the async front end, the simulator and deterministic tests.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from chameleon.clock import Clock, MonotonicClock
from chameleon.engine.detokenizer import IncrementalDetokenizer
from chameleon.engine.stats import EngineStats
from chameleon.errors import (
    AdapterExistsError,
    AdapterInUseError,
    AdapterNotFoundError,
    InvalidRequestError,
    PromptTooLongError,
)
from chameleon.executor.base import Executor
from chameleon.memory.adapter_cache import AdapterCache, CachePolicyName
from chameleon.memory.arrival_predictor import ArrivalPredictor
from chameleon.memory.budget import MemoryBudget
from chameleon.memory.kv_blocks import KVBlockManager
from chameleon.outputs import AdapterInfo, FinishReason, RequestOutput
from chameleon.sampling_params import SamplingParams
from chameleon.sched import SchedulerOptions, make_policy
from chameleon.sched.request import Request
from chameleon.sched.scheduler import Scheduler, SchedulerOutput

log = logging.getLogger(__name__)


@attrs.frozen
class CoreLimits:
    """What a request must satisfy to be accepted; derived from the model and the config."""

    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    eos_token_ids: tuple[int, ...] = ()


class EngineCore:
    def __init__(
        self,
        executor: Executor,
        limits: CoreLimits,
        *,
        scheduler: str = "fifo",
        scheduler_options: SchedulerOptions | None = None,
        adapter_cache: CachePolicyName = "chameleon",
        memory: MemoryBudget | None = None,
        prefetch_depth: int = 8,
        arrival_predictor: ArrivalPredictor | None = None,
        tokenizer: Any | None = None,
        clock: Clock | None = None,
        seed: int = 0,
    ) -> None:
        self.executor = executor
        self.limits = limits
        self.tokenizer = tokenizer
        self.clock = clock or MonotonicClock()
        # Without an explicit budget, the memory is exactly the KV cache: adapters get what KV idles.
        self.memory = memory or MemoryBudget(
            total_bytes=executor.num_kv_blocks * executor.kv_block_bytes,
            reserve_bytes=0,
            kv_block_bytes=executor.kv_block_bytes,
            adapter_row_bytes=executor.adapter_row_bytes,
        )
        self.blocks = KVBlockManager(executor.num_kv_blocks, executor.block_size, self.memory)
        self.adapter_cache = AdapterCache(executor.adapter_pool_rows, self.memory, adapter_cache)
        self.arrival_predictor = arrival_predictor
        self.adapter_load_critical_s = 0.0  # time the iteration waited for adapter copies
        self.adapters: dict[str, AdapterInfo] = {}
        self.scheduler = Scheduler(
            make_policy(scheduler, scheduler_options),
            self.blocks,
            self.adapter_cache,
            max_num_seqs=limits.max_num_seqs,
            max_num_batched_tokens=limits.max_num_batched_tokens,
            max_model_len=limits.max_model_len,
            prefetch_depth=prefetch_depth,
        )
        self.requests: dict[str, Request] = {}
        self._seed_rng = torch.Generator().manual_seed(seed)
        self._num_finished = 0

    # --- intake ---------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams | None = None,
        *,
        adapter: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        sampling = sampling or SamplingParams()
        prompt = self.check_request(request_id, prompt_token_ids, adapter)
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling=sampling,
            arrival_time=self.clock.now() if arrival_time is None else arrival_time,
            adapter=adapter,
            generator=self._generator(sampling),
        )
        if self.tokenizer is not None:
            request.detokenizer = IncrementalDetokenizer(  # type: ignore[call-arg, arg-type]  # attrs: custom __init__
                self.tokenizer,
                prompt,
                stop=sampling.stop,
                include_stop_str_in_output=sampling.include_stop_str_in_output,
            )
        self.requests[request_id] = request
        self.scheduler.add(request, request.arrival_time)
        if adapter is not None and self.arrival_predictor is not None:
            self.arrival_predictor.observe(adapter, request.arrival_time)

    def check_request(
        self, request_id: str, prompt_token_ids: Sequence[int], adapter: str | None = None
    ) -> list[int]:
        """Raise the typed error a request deserves, or return its prompt as a list."""
        if adapter is not None and adapter not in self.adapters:
            raise AdapterNotFoundError(f"no adapter named {adapter!r} is registered (known: {sorted(self.adapters)})")
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self.requests:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise InvalidRequestError(f"request {request_id!r}: the prompt is empty")
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < self.limits.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"request {request_id!r}: token ids out of range [0, {self.limits.vocab_size}): {bad[:5]}"
            )
        if len(prompt) >= self.limits.max_model_len:
            raise PromptTooLongError(
                f"request {request_id!r}: prompt has {len(prompt)} tokens; max_model_len is "
                f"{self.limits.max_model_len}, which leaves no room to generate"
            )
        return prompt

    def _generator(self, sampling: SamplingParams) -> torch.Generator:
        # Unseeded requests still get their own stream, derived from the engine seed, so a whole
        # run is reproducible and no request's randomness depends on its batch neighbours.
        seed = sampling.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_rng).item())
        return torch.Generator().manual_seed(seed)

    # --- adapters -------------------------------------------------------------------------------

    def add_adapter(self, name: str, path: str) -> AdapterInfo:
        """Validate and load a PEFT adapter into host memory (see `register_adapter`)."""
        self._check_new_adapter(name)
        return self.register_adapter(self.executor.read_adapter(name, path))

    def register_adapter(self, adapter: Any) -> AdapterInfo:
        """Register an adapter the executor has read (`executor.read_adapter`, safe off-thread)."""
        self._check_new_adapter(adapter.name)
        info = self.executor.register_adapter(adapter)
        self.adapter_cache.register(info.name, info.max_rank)
        self.adapters[info.name] = info
        return info

    def _check_new_adapter(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"adapter names are non-empty strings, got {name!r}")
        if name in self.adapters:
            raise AdapterExistsError(f"an adapter named {name!r} is already registered")

    def remove_adapter(self, name: str) -> None:
        users = [r.request_id for r in self.requests.values() if r.adapter == name]
        if name in self.adapters and users:
            raise AdapterInUseError(f"adapter {name!r} is used by {len(users)} unfinished requests, e.g. {users[0]!r}")
        self.adapter_cache.unregister(name)  # raises AdapterNotFoundError for unknown names
        self.executor.unregister_adapter(name)
        del self.adapters[name]

    def pin_adapter(self, name: str, pinned: bool = True) -> None:
        """A pinned adapter is never evicted from the device once loaded."""
        self.adapter_cache.pin(name, pinned)
        self.adapters[name] = attrs.evolve(self.adapters[name], pinned=pinned)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free what it holds. Returns its final output, or None if unknown."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        return self._finish(request, "abort", delta="", new_ids=())

    # --- the iteration ----------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        now = self.clock.now()
        likely = self.arrival_predictor.likely(now) if self.arrival_predictor is not None else ()
        batch = self.scheduler.schedule(now, likely)
        try:
            self._move_kv(batch)
            self._move_adapters(batch)
            if not batch:
                return []
            sampled = self.executor.execute(batch)
        except Exception as exc:  # a bad batch must not take the engine down: fail just this batch
            log.exception("iteration failed; aborting the %d requests in it", len(batch.scheduled))
            message = f"{type(exc).__name__}: {exc}"
            outputs = [self._finish(s.request, "abort", "", (), error=message) for s in batch.scheduled]
            for load in (*batch.adapter_loads, *batch.adapter_prefetches):  # copies may not have happened
                self.adapter_cache.drop(load.name)
                self.executor.evict_adapter(load.name)
            return outputs
        self.scheduler.iteration_done(batch.scheduled, self.clock.now() - now, self.clock.now())
        return self._process(batch, sampled)

    def _move_kv(self, batch: SchedulerOutput) -> None:
        for swap in batch.swap_out:  # first: the blocks may belong to someone else this iteration
            self.executor.swap_out(swap.request_id, swap.block_ids)
        for request_id in batch.swap_drop:
            self.executor.drop_swapped(request_id)
        for swap in batch.swap_in:
            self.executor.swap_in(swap.request_id, swap.block_ids)

    def _move_adapters(self, batch: SchedulerOutput) -> None:
        for name in batch.adapter_evictions:
            self.executor.evict_adapter(name)
        start = self.clock.now()
        for load in batch.adapter_loads:  # on the critical path: this batch needs them
            self.executor.load_adapter(load.name, load.row)
        self.adapter_load_critical_s += self.clock.now() - start
        for load in batch.adapter_prefetches:  # overlapped with this batch
            self.executor.prefetch_adapter(load.name, load.row)

    def _process(self, batch: SchedulerOutput, sampled: list[int]) -> list[RequestOutput]:
        now = self.clock.now()
        outputs = []
        tokens = iter(sampled)
        for item in batch.scheduled:
            request = item.request
            samples = item.samples
            request.num_computed_tokens += item.num_new_tokens
            if not samples:
                continue
            token = next(tokens)
            request.output_token_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = now
            outputs.append(self._emit(request, token))
        return outputs

    def _emit(self, request: Request, token: int) -> RequestOutput:
        reason = self._stop_reason(request, token)
        delta = ""
        if request.detokenizer is not None:
            update = request.detokenizer.add_tokens([token])
            delta = update.delta
            if update.stop_hit is not None:
                return self._finish(request, "stop", delta, (token,), flush=False)
        if reason is not None:
            return self._finish(request, reason, delta, (token,))
        return RequestOutput(
            request_id=request.request_id,
            delta=delta,
            token_ids=(token,),
            text=request.detokenizer.text if request.detokenizer else "",
            finished=False,
            finish_reason=None,
            metrics=request.metrics(),
        )

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        p = request.sampling
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.limits.eos_token_ids):
            return "stop"
        if len(request.output_token_ids) >= p.max_tokens or request.num_tokens >= self.limits.max_model_len:
            return "length"
        return None

    def _finish(
        self,
        request: Request,
        reason: FinishReason,
        delta: str,
        new_ids: tuple[int, ...],
        *,
        flush: bool = True,
        error: str | None = None,
    ) -> RequestOutput:
        now = self.clock.now()
        self.scheduler.finish(request, now, completed=reason != "abort")
        request.finish_reason = reason
        request.finish_time = now
        del self.requests[request.request_id]
        self._num_finished += 1
        if request.detokenizer is not None and flush:
            delta += request.detokenizer.finish()
        return RequestOutput(
            request_id=request.request_id,
            delta=delta,
            token_ids=new_ids,
            text=request.detokenizer.text if request.detokenizer else "",
            finished=True,
            finish_reason=reason,
            metrics=request.metrics(),
            error=error,
        )

    # --- introspection ------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        cache = self.adapter_cache.stats
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=self.scheduler.num_waiting,
            kv_blocks_in_use=self.blocks.num_in_use,
            kv_blocks_total=self.blocks.num_blocks,
            num_preemptions=self.scheduler.stats.preemptions,
            num_policy_preemptions=self.scheduler.stats.policy_preemptions,
            swapped_out_bytes=self.scheduler.stats.swapped_out_bytes,
            swapped_in_bytes=self.scheduler.stats.swapped_in_bytes,
            scheduler_metrics=self.scheduler.policy.metrics(),
            num_finished=self._num_finished,
            adapters_registered=len(self.adapters),
            adapters_resident=len(self.adapter_cache.resident()),
            adapter_resident_bytes=self.memory.adapter_bytes,
            adapter_hits=cache.hits,
            adapter_misses=cache.misses,
            adapter_loads=cache.loads,
            adapter_prefetches=cache.prefetches,
            adapter_evictions=cache.evictions,
            adapter_bytes_loaded=cache.bytes_loaded,
            adapter_load_critical_s=self.adapter_load_critical_s,
            adapter_ref_count=self.adapter_cache.total_ref_count,
            memory_budget_bytes=self.memory.total_bytes,
            kv_bytes=self.memory.kv_bytes,
            memory_free_bytes=self.memory.free_bytes,
        )


__all__ = ["CoreLimits", "EngineCore", "EngineStats"]
