"""The synchronous engine core: requests in, one iteration per `step()`, outputs out.

No asyncio here and no reading of wall time: the clock is injected, so the same core runs under
the async front end, the simulator and deterministic tests.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol

import attrs

from chameleon.clock import Clock, MonotonicClock
from chameleon.config import EngineConfig
from chameleon.engine.kv_stats import prefix_salt, prefix_stats
from chameleon.engine.stats import AdapterStats, EngineStats, KVStats, MemoryStats, RequestStats
from chameleon.errors import (
    AdapterExistsError,
    AdapterInUseError,
    AdapterNotFoundError,
    InvalidRequestError,
    PromptTooLongError,
)
from chameleon.executor.base import AdapterT, Executor, SequenceInput, StepInput
from chameleon.memory.adapter_cache import AdapterCache
from chameleon.memory.arrival_predictor import ArrivalPredictor
from chameleon.memory.budget import MemoryBudget
from chameleon.memory.kv_blocks import KVBlockManager
from chameleon.outputs import AdapterInfo, FinishReason, RequestOutput
from chameleon.sampling_params import SamplingParams
from chameleon.sched import make_policy
from chameleon.sched.request import Request
from chameleon.sched.scheduler import ScheduledRequest, Scheduler, SchedulerOutput

log = logging.getLogger(__name__)


@attrs.frozen
class CoreLimits:
    """What the model imposes on a request (the config's limits come with `EngineConfig`)."""

    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()


class Detokenizer(Protocol):
    """What the core needs of a detokenizer (`engine.detokenizer.IncrementalDetokenizer`)."""

    text: str

    def add_tokens(self, token_ids: Sequence[int]) -> Any: ...

    def finish(self) -> str: ...


class EngineCore(Generic[AdapterT]):
    """One iteration per `step()`: schedule, move KV and adapters, execute, emit outputs.

    `config` is passed whole (scheduler, cache policy, limits, prefetch, seed); `limits` are what
    the model imposes. `tokenizer` (optional) turns token ids into text deltas and stop strings;
    without one, outputs carry ids only (the simulator). `clock` is injected.
    """

    def __init__(
        self,
        executor: Executor[AdapterT],
        config: EngineConfig,
        limits: CoreLimits,
        *,
        memory: MemoryBudget | None = None,
        tokenizer: Any | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._executor = executor
        self.config = config
        self.limits = limits
        self.tokenizer = tokenizer
        self._clock = clock or MonotonicClock()
        # Without an explicit budget, the memory is exactly the KV cache: adapters get what KV idles.
        self.memory = memory or MemoryBudget(
            total_bytes=executor.num_kv_blocks * executor.kv_block_bytes,
            reserve_bytes=0,
            kv_block_bytes=executor.kv_block_bytes,
            adapter_row_bytes=executor.adapter_row_bytes,
        )
        self.blocks = KVBlockManager(
            executor.num_kv_blocks, executor.block_size, self.memory, prefix_caching=config.enable_prefix_caching
        )
        self.adapter_cache = AdapterCache(executor.adapter_pool_rows, self.memory, config.adapter_cache)
        self.arrival_predictor = ArrivalPredictor() if config.adapter_arrival_prefetch else None
        self.adapter_load_critical_s = 0.0  # time the iteration waited for adapter copies
        self.adapters: dict[str, AdapterInfo] = {}
        self.scheduler = Scheduler(
            make_policy(config.scheduler, config.scheduler_options),
            self.blocks,
            self.adapter_cache,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=limits.max_model_len,
            prefetch_depth=config.adapter_prefetch_depth,
        )
        self.requests: dict[str, Request] = {}
        self._detokenizers: dict[str, Detokenizer] = {}
        self._gone: list[str] = []  # finished since the last execute: the executor drops their state
        self._seed_rng = random.Random(config.seed)
        self._num_finished = 0
        self._step_observer: Callable[[StepInput], None] | None = None

    # --- public views (the front end and the harness use these, not the internals) -------------

    @property
    def executor(self) -> Executor[AdapterT]:
        return self._executor

    @property
    def clock(self) -> Clock:
        return self._clock

    def now(self) -> float:
        return self._clock.now()

    def request_ids(self) -> list[str]:
        """Ids of the unfinished requests, in arrival order."""
        return list(self.requests)

    def has_request(self, request_id: str) -> bool:
        return request_id in self.requests

    def read_adapter(self, name: str, path: str) -> AdapterT:
        """Validate and read an adapter into host memory; safe in a worker thread (no core state)."""
        return self._executor.read_adapter(name, path)

    def observe_steps(self, observer: Callable[[StepInput], None] | None) -> None:
        """Call `observer` with every step's input before it executes (profiling; None: stop)."""
        self._step_observer = observer

    def abort_all(self) -> list[RequestOutput]:
        """Abort every unfinished request (shutdown); their final outputs."""
        return [out for rid in self.request_ids() if (out := self.abort(rid)) is not None]

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
            seed=self._seed(sampling),
            prefix_salt=prefix_salt(self.adapters[adapter] if adapter is not None else None, self.config),
        )
        if self.tokenizer is not None:
            self._detokenizers[request_id] = self._new_detokenizer(prompt, sampling)
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

    def _seed(self, sampling: SamplingParams) -> int:
        # Unseeded requests still get their own seed, derived from the engine seed, so a whole
        # run is reproducible and no request's randomness depends on its batch neighbours.
        return sampling.seed if sampling.seed is not None else self._seed_rng.getrandbits(62)

    def _new_detokenizer(self, prompt: list[int], sampling: SamplingParams) -> Detokenizer:
        from chameleon.engine.detokenizer import IncrementalDetokenizer  # transformers: only with a tokenizer

        make: Any = IncrementalDetokenizer  # attrs class with a hand-written __init__ mypy cannot see
        detokenizer: Detokenizer = make(
            self.tokenizer, prompt, stop=sampling.stop, include_stop_str_in_output=sampling.include_stop_str_in_output
        )
        return detokenizer

    # --- adapters -------------------------------------------------------------------------------

    def add_adapter(self, name: str, path: str) -> AdapterInfo:
        """Validate and load a PEFT adapter into host memory (see `register_adapter`)."""
        self._check_new_adapter(name)
        return self.register_adapter(name, self._executor.read_adapter(name, path))

    def register_adapter(self, name: str, adapter: AdapterT) -> AdapterInfo:
        """Register an adapter `read_adapter` returned (reading is safe off-thread; this is not)."""
        self._check_new_adapter(name)
        info = self._executor.register_adapter(adapter)
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
        self._executor.unregister_adapter(name)
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
            step = self._step_input(batch)
            if self._step_observer is not None:
                self._step_observer(step)
            sampled = self._executor.execute(step)
        except Exception as exc:  # a bad batch must not take the engine down: fail just this batch
            log.exception("iteration failed; aborting the %d requests in it", len(batch.scheduled))
            message = f"{type(exc).__name__}: {exc}"
            outputs = [self._finish(s.request, "abort", "", (), error=message) for s in batch.scheduled]
            for load in (*batch.adapter_loads, *batch.adapter_prefetches):  # copies may not have happened
                self.adapter_cache.drop(load.name)
                self._executor.evict_adapter(load.name)
            return outputs
        self.scheduler.iteration_done(batch.scheduled, self.clock.now() - now, self.clock.now())
        return self._process(batch, sampled)

    def _step_input(self, batch: SchedulerOutput) -> StepInput:
        sequences = tuple(sequence_input(s) for s in batch.scheduled)
        gone, self._gone = tuple(self._gone), []
        return StepInput(sequences, gone)

    def _move_kv(self, batch: SchedulerOutput) -> None:
        for swap in batch.swap_out:  # first: the blocks may belong to someone else this iteration
            self._executor.swap_out(swap.request_id, swap.block_ids)
        for request_id in batch.swap_drop:
            self._executor.drop_swapped(request_id)
        for swap in batch.swap_in:
            self._executor.swap_in(swap.request_id, swap.block_ids)

    def _move_adapters(self, batch: SchedulerOutput) -> None:
        for name in batch.adapter_evictions:
            self._executor.evict_adapter(name)
        start = self.clock.now()
        for load in batch.adapter_loads:  # on the critical path: this batch needs them
            self._executor.load_adapter(load.name, load.row)
        self.adapter_load_critical_s += self.clock.now() - start
        for load in batch.adapter_prefetches:  # overlapped with this batch
            self._executor.prefetch_adapter(load.name, load.row)

    def _process(self, batch: SchedulerOutput, sampled: dict[str, int]) -> list[RequestOutput]:
        now = self.clock.now()
        outputs = []
        for item in batch.scheduled:
            request = item.request
            samples = item.samples
            request.num_computed_tokens += item.num_new_tokens
            self.blocks.commit(request)  # prefix caching: index the blocks it has just filled
            if not samples:
                continue
            token = sampled[request.request_id]
            request.output_token_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = now
            outputs.append(self._emit(request, token))
        return outputs

    def _emit(self, request: Request, token: int) -> RequestOutput:
        reason = self._stop_reason(request, token)
        delta = ""
        detokenizer = self._detokenizers.get(request.request_id)
        if detokenizer is not None:
            update = detokenizer.add_tokens([token])
            delta = update.delta
            if update.stop_hit is not None:
                return self._finish(request, "stop", delta, (token,), flush=False)
        if reason is not None:
            return self._finish(request, reason, delta, (token,))
        return RequestOutput(
            request_id=request.request_id,
            delta=delta,
            token_ids=(token,),
            text=detokenizer.text if detokenizer is not None else "",
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
        self._gone.append(request.request_id)
        self._num_finished += 1
        detokenizer = self._detokenizers.pop(request.request_id, None)
        if detokenizer is not None and flush:
            delta += detokenizer.finish()
        return RequestOutput(
            request_id=request.request_id,
            delta=delta,
            token_ids=new_ids,
            text=detokenizer.text if detokenizer is not None else "",
            finished=True,
            finish_reason=reason,
            metrics=request.metrics(),
            error=error,
        )

    # --- introspection ------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        cache, mech, mem = self.adapter_cache.stats, self.scheduler.stats, self.memory
        return EngineStats(
            requests=RequestStats(
                running=len(self.scheduler.running),
                waiting=self.scheduler.num_waiting,
                finished=self._num_finished,
                preemptions=mech.preemptions,
                policy_preemptions=mech.policy_preemptions,
            ),
            kv=KVStats(
                blocks_in_use=self.blocks.num_in_use,
                blocks_total=self.blocks.num_blocks,
                swapped_out_bytes=mech.swapped_out_bytes,
                swapped_in_bytes=mech.swapped_in_bytes,
            ),
            memory=MemoryStats(
                budget_bytes=mem.total_bytes, kv_bytes=mem.kv_bytes, adapter_bytes=mem.adapter_bytes, free_bytes=mem.free_bytes
            ),
            adapters=AdapterStats(
                registered=len(self.adapters),
                resident=len(self.adapter_cache.resident()),
                resident_bytes=mem.adapter_bytes,
                hits=cache.hits,
                misses=cache.misses,
                loads=cache.loads,
                prefetches=cache.prefetches,
                evictions=cache.evictions,
                bytes_loaded=cache.bytes_loaded,
                load_critical_s=self.adapter_load_critical_s,
                ref_count=self.adapter_cache.total_ref_count,
            ),
            scheduler=self.scheduler.policy.metrics(),
            prefix=prefix_stats(self.blocks),
        )


def sequence_input(item: ScheduledRequest) -> SequenceInput:
    """The executor's view of one scheduled request (no mutable scheduler state)."""
    r, n = item.request, item.num_new_tokens
    start = r.num_computed_tokens
    return SequenceInput(
        request_id=r.request_id,
        token_ids=_token_range(r.prompt_token_ids, r.output_token_ids, start, start + n),
        start_pos=start,
        num_prompt_tokens=len(r.prompt_token_ids),
        block_table=r.block_table,
        adapter=r.adapter,
        sampling=r.sampling if start + n == r.num_tokens else None,
        seed=r.seed,
    )


def _token_range(prompt: list[int], output: list[int], start: int, stop: int) -> list[int]:
    """`(prompt + output)[start:stop]` without concatenating the whole sequence every step."""
    n = len(prompt)
    if start >= n:
        return output[start - n : stop - n]
    if stop <= n:
        return prompt[start:stop]
    return prompt[start:] + output[: stop - n]


__all__ = ["CoreLimits", "EngineCore", "EngineStats", "sequence_input"]
