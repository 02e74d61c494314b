"""The synchronous engine core: requests in, one iteration per `step()`, outputs out.

No asyncio here and no reading of wall time: the clock is injected, so the same core runs under
the async front end, the simulator and deterministic tests.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs

from chameleon.clock import Clock, MonotonicClock
from chameleon.config import EngineConfig
from chameleon.engine.checks import (
    check_adapter_usable,
    check_fits,
    check_memory,
    check_request_id,
    output_kind,
    prompt_list,
)
from chameleon.engine.core_adapters import CoreAdapters
from chameleon.engine.emit import output, record_logprobs, record_prompt_logprobs, stop_reason
from chameleon.engine.fanout import Fanout, Parent, child_id, child_sampling, ids_of
from chameleon.engine.kv_stats import prefix_salt
from chameleon.engine.moves import move_adapters, move_kv
from chameleon.engine.sequence import sequence_input
from chameleon.engine.stats import EngineStats, collect_stats
from chameleon.engine.token_text import TokenText
from chameleon.errors import (
    EngineStepError,
    InvalidRequestError,
)
from chameleon.executor.base import AdapterFault, AdapterT, Executor, StepInput
from chameleon.memory.adapter_cache import AdapterCache
from chameleon.memory.arrival_predictor import ArrivalPredictor
from chameleon.memory.budget import MemoryBudget
from chameleon.memory.kv_blocks import KVBlockManager
from chameleon.outputs import AdapterInfo, FinishReason, RequestMetrics, RequestOutput
from chameleon.sampling_params import SamplingParams
from chameleon.sched import make_policy
from chameleon.sched.request import Request, RequestStatus
from chameleon.sched.scheduler import Scheduler, SchedulerOutput

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


class EngineCore(CoreAdapters[AdapterT]):
    """One iteration per `step()`: schedule, move KV and adapters, execute, emit outputs.

    `config` is passed whole (scheduler, cache policy, limits, prefetch, seed); `limits` are what
    the model imposes. `tokenizer` (optional) turns token ids into text deltas and stop strings;
    without one, outputs carry ids only (the simulator). `clock` is injected. A request with
    `sampling.n > 1` runs as n child requests whose outputs are merged (`engine/fanout.py`).
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
            executor.num_kv_blocks,
            executor.block_size,
            self.memory,
            prefix_caching=config.enable_prefix_caching,
            window=config.kv_window,
        )
        self.adapter_cache = AdapterCache(executor.adapter_pool_rows, self.memory, config.adapter_cache)
        self.arrival_predictor = ArrivalPredictor() if config.adapter_arrival_prefetch else None
        self.adapter_load_critical_s = 0.0
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
        self._fanout = Fanout()  # requests with n > 1 and their children
        self._token_text = TokenText(tokenizer)  # logprobs' token strings
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
        """Ids of the unfinished requests, in arrival order (a request with n > 1 once)."""
        return self._fanout.public_ids(list(self.requests)) if self._fanout.parents else list(self.requests)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._fanout or (request_id in self.requests and not self._fanout.is_child(request_id))

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
        sampling = SamplingParams() if sampling is None else sampling
        prompt = self.check_request(request_id, prompt_token_ids, adapter, sampling=sampling)
        arrival = self.clock.now() if arrival_time is None else arrival_time
        if sampling.n > 1:
            self._add_parent(request_id, prompt, sampling, adapter, arrival)
        else:
            self._admit(self._new_request(request_id, prompt, sampling, adapter, arrival))
        if adapter is not None and self.arrival_predictor is not None:
            self.arrival_predictor.observe(adapter, arrival)

    def _new_request(
        self, request_id: str, prompt: list[int], sampling: SamplingParams, adapter: str | None, arrival: float
    ) -> Request:
        return Request(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling=sampling,
            arrival_time=arrival,
            adapter=adapter,
            seed=self._seed(sampling),
            prefix_salt=prefix_salt(self.adapters[adapter] if adapter is not None else None, self.config),
        )

    def _admit(self, request: Request) -> None:
        if self.tokenizer is not None:
            self._detokenizers[request.request_id] = self._new_detokenizer(request.prompt_token_ids, request.sampling)
        self.requests[request.request_id] = request
        self.scheduler.add(request, request.arrival_time)

    def _add_parent(
        self, request_id: str, prompt: list[int], sampling: SamplingParams, adapter: str | None, arrival: float
    ) -> None:
        """n children (`engine/fanout.py`); with prefix caching, 1..n-1 wait for child 0's prefill."""
        ids = tuple(child_id(request_id, i) for i in range(sampling.n))
        children = [self._new_request(cid, prompt, child_sampling(sampling, i), adapter, arrival) for i, cid in enumerate(ids)]
        for i, child in enumerate(children):
            child.index = i
        hold = self.config.enable_prefix_caching
        self._fanout.add(Parent(request_id, sampling, arrival, ids, children[1:] if hold else []))
        for child in children[:1] if hold else children:
            self._admit(child)

    def check_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        adapter: str | None = None,
        *,
        sampling: SamplingParams | None = None,
    ) -> list[int]:
        """Raise the typed error a request deserves, or return its prompt as a list.

        Checks types (ids are non-empty strings, prompts sequences of non-bool ints), the adapter
        (registered, not quarantined), the vocabulary, that prompt + `max_tokens` fits in
        `max_model_len` (else `PromptTooLongError`) and, next to the adapter, in the memory budget
        (else `RequestMemoryError`: it would wait forever).
        """
        check_request_id(request_id)
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise InvalidRequestError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        check_adapter_usable(adapter, self.adapters)
        for rid in ids_of(request_id, sampling.n if sampling is not None else 1):  # with n > 1: its children's
            if rid in self.requests or rid in self._fanout:
                child = "" if rid == request_id else f" (completion of {request_id!r})"
                raise InvalidRequestError(f"request_id {rid!r}{child} is already in use")
        prompt = prompt_list(request_id, prompt_token_ids, self.limits.vocab_size)
        check_fits(request_id, len(prompt), sampling, self.limits.max_model_len)
        self.check_memory(request_id, len(prompt), sampling, adapter)
        return prompt

    def check_memory(
        self, request_id: str, prompt_len: int, sampling: SamplingParams | None, adapter: str | None, rows: int = 0
    ) -> None:
        """`RequestMemoryError` if the request could never run, even alone, next to its adapter (`rows`
        rank rows; its registered size when `adapter` is known here) and the pinned adapters."""
        rows = self.adapter_cache.entries[adapter].rows if adapter in self.adapter_cache.entries else rows
        chunk = None if self.scheduler.policy.whole_prompts else self.config.max_num_batched_tokens  # per step
        peak = self.blocks.peak_blocks(prompt_len + (sampling.max_tokens if sampling else 1), chunk)
        pinned = self.adapter_cache.pinned_rows(adapter)
        check_memory(request_id, adapter, peak, rows, pinned, self.memory, self.blocks.num_blocks)

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

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free what it holds. Returns its final output, or None if unknown."""
        if request_id in self._fanout:
            return self._fanout.abort(request_id, self._abort_one)
        return None if self._fanout.is_child(request_id) else self._abort_one(request_id)

    def _abort_one(self, request_id: str) -> RequestOutput | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        return self._finish(request, "abort", delta="", new_ids=())

    # --- the iteration ----------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self._fanout.has_held()

    def step(self) -> list[RequestOutput]:
        """One iteration. Faults stay as local as they can: a failing adapter load fails only that
        adapter's requests (and quarantines it), a failed sampling row only its request, a
        `schedule()` failure only the waiting requests; any other exception fails the batch."""
        outputs = self._step()
        if not self._fanout.parents:
            return outputs
        outputs = self._fanout.collect(outputs, self._abort_one)
        for child in self._fanout.ready(self.requests.get):  # child 0 has computed the prompt
            self._admit(child)
        return outputs

    def _step(self) -> list[RequestOutput]:
        now = self.clock.now()
        try:
            batch = self.scheduler.schedule(now, self._likely(now))
        except Exception as exc:
            return self._schedule_failed(exc)
        outputs: list[RequestOutput] = []
        try:
            move_kv(self._executor, batch)
            failed, critical_s = move_adapters(self._executor, batch, self.clock)
            self.adapter_load_critical_s += critical_s  # time the iteration waited for adapter copies
            for name, reason in failed.items():
                outputs += self._quarantine(name, reason)
            if outputs:
                batch = self._live(batch)
            if not batch:
                return outputs
            batch, sampled = self._execute(batch, outputs)
        except Exception as exc:  # a bad batch must not take the engine down: fail just this batch
            return outputs + self._batch_failed(self._live(batch), exc)
        self.scheduler.iteration_done(batch.scheduled, self.clock.now() - now, self.clock.now())
        return outputs + self._process(batch, sampled)

    def _likely(self, now: float) -> tuple[str, ...]:
        if self.arrival_predictor is None:
            return ()
        return tuple(n for n in self.arrival_predictor.likely(now) if not self._is_broken(n))

    def _is_broken(self, name: str) -> bool:
        info = self.adapters.get(name)
        return info is not None and info.broken

    def _execute(self, batch: SchedulerOutput, outputs: list[RequestOutput]) -> tuple[SchedulerOutput, dict[str, int]]:
        """Execute; on an `AdapterFault`, quarantine that adapter and re-run the rest (nothing was
        computed yet). Bounded: each retry removes one registered adapter's rows."""
        for _ in range(len(self.adapters) + 1):
            step = self._step_input(batch)
            if self._step_observer is not None:
                self._step_observer(step)
            try:
                return batch, self._executor.execute(step)
            except AdapterFault as fault:
                if fault.name not in self.adapters or self.adapters[fault.name].broken:
                    raise
                outputs += self._quarantine(fault.name, fault.message)
                batch = self._live(batch)
                if not batch:
                    return batch, {}
        raise EngineStepError("adapter faults kept coming; failing the batch")

    def _live(self, batch: SchedulerOutput) -> SchedulerOutput:
        """The batch without the requests that finished (failed) since it was scheduled."""
        live = tuple(s for s in batch.scheduled if self.requests.get(s.request.request_id) is s.request)
        return batch if len(live) == len(batch.scheduled) else attrs.evolve(batch, scheduled=live)

    def _batch_failed(self, batch: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        log.exception("iteration failed; aborting the %d requests in it", len(batch.scheduled))
        message = f"{type(exc).__name__}: {exc}"
        outputs = [self._fail(s.request, message) for s in batch.scheduled]
        for load in (*batch.adapter_loads, *batch.adapter_prefetches):  # copies may not have happened
            self.adapter_cache.drop(load.name)
            self._executor.evict_adapter(load.name)
        return outputs

    def _schedule_failed(self, exc: Exception) -> list[RequestOutput]:
        """`schedule()` raised: fail the waiting requests (the running ones if none wait)."""
        log.exception("scheduling failed")
        message = f"scheduling failed: {type(exc).__name__}: {exc}"
        waiting = [r for r in self.requests.values() if r.status is RequestStatus.WAITING]
        return [self._fail(r, message) for r in waiting or list(self.requests.values())]

    def _fail(self, request: Request, message: str) -> RequestOutput:
        """Finish a request with an error, even if the scheduler's bookkeeping for it is broken."""
        try:
            return self._finish(request, "abort", "", (), error=message)
        except Exception:
            log.exception("could not release request %r cleanly", request.request_id)
            self.blocks.free(request)
            self.requests.pop(request.request_id, None)
            self._detokenizers.pop(request.request_id, None)
            request.status = RequestStatus.FINISHED
            metrics = RequestMetrics(arrival_time=request.arrival_time, finish_time=self.clock.now())
            return RequestOutput(request.request_id, "", (), "", True, "abort", metrics, error=message)

    def _quarantine(self, name: str, reason: str) -> list[RequestOutput]:
        """An adapter's load failed: mark it broken, fail every request that uses it, free its rows."""
        log.error("adapter %r quarantined: %s", name, reason)
        if name in self.adapters:
            self.adapters[name] = attrs.evolve(self.adapters[name], broken=True, error=reason)
        message = f"adapter {name!r} failed to load and is quarantined: {reason}"
        outputs = [self._fail(r, message) for r in list(self.requests.values()) if r.adapter == name]
        self.adapter_cache.drop(name)
        self._executor.evict_adapter(name)
        return outputs

    def _step_input(self, batch: SchedulerOutput) -> StepInput:
        edges = self.blocks.window_edges
        sequences = tuple(sequence_input(s, edges) for s in batch.scheduled)
        gone, self._gone = tuple(self._gone), []
        return StepInput(sequences, gone)

    def _process(self, batch: SchedulerOutput, sampled: dict[str, int]) -> list[RequestOutput]:
        """Apply a step's tokens. A sampling request the executor gave no token fails alone."""
        now = self.clock.now()
        errors: dict[str, str] = getattr(sampled, "errors", {})
        logprobs = getattr(sampled, "logprobs", {})
        prompt_logprobs = getattr(sampled, "prompt_logprobs", {})
        outputs = []
        for item in batch.scheduled:
            request = item.request
            samples = item.samples  # before the count moves: it is derived from it
            request.num_computed_tokens += item.num_new_tokens
            self.blocks.commit(request)  # prefix caching: index the blocks it has just filled
            if prompt_logprobs and request.request_id in prompt_logprobs:
                first, entries = prompt_logprobs[request.request_id]
                record_prompt_logprobs(request, first, entries, self._token_text)
            if not samples:
                continue
            token = sampled.get(request.request_id)
            if token is None:
                reason = errors.get(request.request_id, "the executor returned no token for this request")
                outputs.append(self._fail(request, reason))
                continue
            request.output_token_ids.append(token)
            record_logprobs(request, logprobs.get(request.request_id), self._token_text)
            if request.first_token_time is None:
                request.first_token_time = now
            out = self._emit(request, token)
            if out is not None:
                outputs.append(out)
        return outputs

    def _emit(self, request: Request, token: int) -> RequestOutput | None:
        reason = stop_reason(request, token, self.limits.eos_token_ids, self.limits.max_model_len)
        delta = ""
        detokenizer = self._detokenizers.get(request.request_id)
        if detokenizer is not None:
            update = detokenizer.add_tokens([token])
            delta = update.delta
            if update.stop_hit is not None:
                return self._finish(request, "stop", delta, (token,), flush=False)
        if reason is not None:
            return self._finish(request, reason, delta, (token,))
        kind = output_kind(request.sampling)
        if kind == "final":
            return None  # only the finished output, with everything
        cumulative = kind == "cumulative"
        return output(
            request,
            delta=delta,
            token_ids=tuple(request.output_token_ids) if cumulative else (token,),
            text=detokenizer.text if detokenizer is not None and cumulative else "",
            finished=False,
            reason=None,
            cumulative=cumulative,
        )

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
        kind = output_kind(request.sampling)
        if kind != "delta":  # cumulative and final outputs carry every id (final: the text too)
            new_ids = tuple(request.output_token_ids)
            if kind == "final" and detokenizer is not None:
                delta = detokenizer.text
        return output(
            request,
            delta=delta,
            token_ids=new_ids,
            text=detokenizer.text if detokenizer is not None else "",
            finished=True,
            reason=reason,
            cumulative=kind != "delta",
            error=error,
        )

    # --- introspection ------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return collect_stats(self)


__all__ = ["CoreLimits", "EngineCore", "EngineStats", "sequence_input"]
