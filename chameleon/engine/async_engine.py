"""The async front end: request intake, one output stream per request, one background loop.

The loop owns the engine core. Between iterations it applies queued aborts, operations and adds
(at most `INTAKE_SLICE` adds per turn, so a burst never stalls the event loop); the blocking
`step()` runs in a worker thread so the event loop stays responsive. Runs under asyncio and trio
(anyio). Nothing in the core knows this module exists.

Every generate() is tagged with a unique token and every abort carries the token of the request
it meant, so a stale abort never ends a later request that reuses the id. The loop ends every
open stream in a `finally`, however it stops (close, the `async with` body raising, a bug).
"""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from collections import deque
from collections.abc import Callable, Generator, Sequence
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectSendStream

from chameleon.clock import Clock
from chameleon.config import EngineConfig
from chameleon.engine.checks import output_kind
from chameleon.engine.core import EngineCore
from chameleon.engine.stream import RequestStream
from chameleon.errors import (
    AdapterExistsError,
    AdapterInUseError,
    AdapterNotFoundError,
    AdapterQuarantinedError,
    ChameleonError,
    EngineClosedError,
    EngineOverloadedError,
    InvalidRequestError,
)
from chameleon.outputs import AdapterInfo, RequestMetrics, RequestOutput, merge_outputs
from chameleon.sampling_params import SamplingParams

log = logging.getLogger(__name__)

INTAKE_SLICE = 256  # adds applied per loop turn; a checkpoint separates slices
OUTPUT_BUFFER = 64  # unread outputs per stream; past it, outputs are merged into one (bounded)
_tokens = itertools.count(1)


@attrs.define
class _Live:
    """A request the front end still streams to: its send side, tag and held-back output."""

    send: MemoryObjectSendStream[RequestOutput]
    token: int
    cumulative: bool
    adapter: str | None
    held: RequestOutput | None = None  # merged outputs while the consumer lags (bounded buffer)


@attrs.define(eq=False)
class _Add:
    request_id: str
    token: int
    prompt_ids: list[int]
    sampling: SamplingParams
    adapter: str | None
    arrival: float


class _Op:
    """A core mutation applied between steps; awaitable for its result (or its error)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn: Callable[[], Any] | None = fn
        self._done = anyio.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    def run(self) -> None:
        fn, self._fn = self._fn, None  # drop the closure (it may hold an adapter's host copy)
        try:
            self._result = fn() if fn is not None else None
        except Exception as exc:  # handed to whoever awaits the op, not the loop
            log.info("engine operation failed: %s", exc)
            self._error = exc
        self._done.set()

    def cancel(self, exc: BaseException) -> None:
        self._fn = None
        self._error = exc
        self._done.set()

    async def wait(self) -> Any:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result

    def __await__(self) -> Generator[Any, None, Any]:
        return self.wait().__await__()


class AsyncEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.tokenizer = core.tokenizer
        self._streams: dict[str, _Live] = {}
        self._adds: deque[_Add] = deque()
        self._ops: deque[_Op] = deque()  # core mutations, applied between steps
        self._adapter_users: dict[str, set[str]] = {}  # adapter -> live request ids (front-end view)
        self._adapters: dict[str, AdapterInfo] = dict(core.adapters)
        self._aborts: deque[tuple[str, int]] = deque()  # (id, token); appended from any thread (finalizers)
        self._core_waiting = 0  # the scheduler's queue length after the last turn
        self._wake: anyio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._started = False
        self._closed = False

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], config: EngineConfig | None = None, *, clock: Clock | None = None
    ) -> AsyncEngine:
        from chameleon.engine.factory import build_core

        if config is not None and not isinstance(config, EngineConfig):
            raise InvalidRequestError(f"config must be an EngineConfig, got {type(config).__name__}")
        if not isinstance(path, str | os.PathLike):
            raise InvalidRequestError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        return cls(build_core(path, config or EngineConfig(), clock=clock))

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncEngine:
        if self._closed or self._started:
            raise EngineClosedError("this engine was closed or is already running; create a new one")
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._loop)
        self._started = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._closed = True
        self._poke()
        assert self._task_group is not None
        return await self._task_group.__aexit__(exc_type, exc, tb)

    # --- requests -----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> RequestStream:
        """Queue a request; iterate the result for its outputs. Errors in the request raise here.

        `adapter` names a registered LoRA adapter; None runs the base model. Past
        `EngineConfig.max_queued_requests` waiting requests this raises `EngineOverloadedError`.
        """
        self._check_running()
        if sampling is None:
            sampling = SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequestError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if request_id is None:
            request_id = uuid.uuid4().hex
        _check_name("request_id", request_id)
        if request_id in self._streams:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use")
        self._check_adapter(adapter)
        self._check_load()
        prompt_ids = self.core.check_request(request_id, self._tokenize(prompt), sampling=sampling)  # type: ignore[arg-type]  # checked inside
        rows = self._adapters[adapter].max_rank if adapter is not None else 0
        self.core.check_memory(request_id, len(prompt_ids), sampling, adapter, rows)  # else it would wait forever
        send, receive = anyio.create_memory_object_stream[RequestOutput](float("inf"))
        token = next(_tokens)
        self._streams[request_id] = _Live(send, token, output_kind(sampling) == "cumulative", adapter)
        if adapter is not None:
            self._adapter_users.setdefault(adapter, set()).add(request_id)
        self._adds.append(_Add(request_id, token, prompt_ids, sampling, adapter, self.core.now()))
        self._poke()
        return RequestStream(self, request_id, receive, token)

    def chat(
        self,
        messages: Sequence[Any],
        sampling: SamplingParams | None = None,
        *,
        adapter: str | None = None,
        chat_template: str | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """`generate()` on `messages` rendered by the chat template (see `chameleon.chat`)."""
        from chameleon.chat import render_chat

        prompt = render_chat(self.tokenizer, messages, chat_template)
        return self.generate(prompt, sampling, request_id=request_id, adapter=adapter)

    def abort(self, request_id: str) -> None:
        """Abort the request live under this id now; its stream ends with finish_reason "abort".

        Unknown or finished ids are ignored; a non-string id raises `InvalidRequestError`.
        """
        if not isinstance(request_id, str):
            raise InvalidRequestError(f"request_id must be a string, got {type(request_id).__name__}")
        live = self._streams.get(request_id)
        if live is not None:
            self._queue_abort(request_id, live.token)

    def _check_load(self) -> None:
        limit = self.core.config.max_queued_requests
        queued = len(self._adds) + self._core_waiting
        if queued >= limit:
            raise EngineOverloadedError(f"{queued} requests are queued (max_queued_requests={limit}); retry later")

    def _check_adapter(self, adapter: object) -> None:
        if adapter is None:
            return
        _check_name("adapter", adapter)
        info = self._adapters.get(adapter)  # type: ignore[call-overload]
        if info is None:
            raise AdapterNotFoundError(f"no adapter named {adapter!r} is registered (known: {sorted(self._adapters)})")
        if info.broken:
            raise AdapterQuarantinedError(f"adapter {adapter!r} is quarantined ({info.error}); remove and re-add it")

    # --- adapters ---------------------------------------------------------------------------------

    async def add_adapter(self, name: str, path: str | os.PathLike[str]) -> AdapterInfo:
        """Validate a PEFT adapter against the model and load it into host memory.

        The reading happens in a worker thread (the event loop and the running batch go on); the
        registration is applied between two iterations. A refused registration keeps nothing.
        """
        self._check_running()
        _check_name("adapter name", name)
        if not isinstance(path, str | os.PathLike):
            raise InvalidRequestError(f"adapter path must be a str or os.PathLike, got {type(path).__name__}")
        if name in self._adapters:
            raise AdapterExistsError(f"an adapter named {name!r} is already registered")
        holder = [await anyio.to_thread.run_sync(self.core.read_adapter, name, os.fspath(path))]
        try:
            info: AdapterInfo = await self._between_steps(lambda: self.core.register_adapter(name, holder.pop()))
        finally:
            holder.clear()  # a refused adapter's host copy must not outlive this call
        self._adapters[name] = info
        return info

    def remove_adapter(self, name: str) -> _Op:
        """Unregister an adapter (a quarantined one too). Refused while unfinished requests use it.

        Applied between steps; await the result to see the core's answer.
        """
        self._check_running()
        _check_name("adapter name", name)
        if name not in self._adapters:
            raise AdapterNotFoundError(f"no adapter named {name!r} is registered")
        users = self._adapter_users.get(name)
        if users:
            raise AdapterInUseError(f"adapter {name!r} is used by {len(users)} unfinished requests")
        del self._adapters[name]
        self._adapter_users.pop(name, None)
        return self._queue_op(lambda: self.core.remove_adapter(name))

    def pin_adapter(self, name: str) -> _Op:
        """Keep the adapter on the device once loaded: it is never evicted while pinned.

        Applied between steps; `await engine.pin_adapter(name)` raises `AdapterMemoryError` if the
        cache refuses (`adapters()` reports `pinned=True` only once a pin succeeded).
        """
        return self._set_pinned(name, True)

    def unpin_adapter(self, name: str) -> _Op:
        return self._set_pinned(name, False)

    def adapters(self) -> list[AdapterInfo]:
        """Registered adapters, with `pinned`, and `broken`/`error` for quarantined ones."""
        return list(self._adapters.values())

    def _set_pinned(self, name: str, pinned: bool) -> _Op:
        self._check_running()
        _check_name("adapter name", name)
        if name not in self._adapters:
            raise AdapterNotFoundError(f"no adapter named {name!r} is registered")

        def apply() -> AdapterInfo:
            self.core.pin_adapter(name, pinned)
            info = self._adapters[name] = self.core.adapters[name]
            return info

        return self._queue_op(apply)

    def _check_running(self) -> None:
        if not self._started or self._closed:
            raise EngineClosedError("the engine is not running (use `async with engine:`)")

    def _queue_op(self, fn: Callable[[], Any]) -> _Op:
        op = _Op(fn)
        self._ops.append(op)
        self._poke()
        return op

    async def _between_steps(self, fn: Callable[[], Any]) -> Any:
        return await self._queue_op(fn)

    def stats(self) -> dict[str, Any]:
        stats = self.core.stats().as_dict()
        stats["requests"]["waiting"] += len(self._adds)
        stats["open_streams"] = len(self._streams)
        return stats

    def _tokenize(self, prompt: object) -> object:
        if not isinstance(prompt, str):
            return prompt  # token ids: the core checks them
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: pass the prompt as token ids")
        try:
            return list(self.tokenizer(prompt).input_ids)
        except Exception as exc:  # e.g. lone surrogates
            raise InvalidRequestError(f"the prompt cannot be tokenized: {type(exc).__name__}: {exc}") from exc

    def _queue_abort(self, request_id: str, token: int) -> None:
        self._aborts.append((request_id, token))

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # --- the loop -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        try:
            while not self._closed:
                self._apply_intake()
                if not self.core.has_unfinished_requests():
                    await self._idle()
                    continue
                try:
                    outputs = await anyio.to_thread.run_sync(self.core.step)
                except Exception as exc:  # a bug, not a bad batch (the core handles those): fail everyone
                    log.exception("engine step failed")
                    outputs = self._abort_all(error=f"{type(exc).__name__}: {exc}")
                for out in outputs:
                    self._deliver(out)
                self._sync_adapters()
                await anyio.lowlevel.checkpoint()  # let consumers see their tokens before the next step
        finally:
            self._closed = True
            self._shutdown()

    async def _idle(self) -> None:
        if self._adds or self._aborts:
            await anyio.lowlevel.checkpoint()  # the next intake slice, after others had a turn
            return
        self._wake = anyio.Event()
        if not self._ops and not self._closed:
            with anyio.move_on_after(0.1):  # also re-checks aborts queued from other threads
                await self._wake.wait()
        self._wake = None

    def _shutdown(self) -> None:
        """End everything: apply queued ops, abort every request, end every open stream."""
        try:
            self._apply_aborts()
            self._apply_ops()
            for out in self._abort_all():
                self._deliver(out)
        except Exception:
            log.exception("shutting the engine down failed; ending the streams anyway")
        self._adds.clear()
        while self._ops:
            self._ops.popleft().cancel(EngineClosedError("the engine closed before this operation ran"))
        for request_id in list(self._streams):
            self._deliver(self._terminal(request_id))

    def _apply_intake(self) -> None:
        self._apply_aborts()  # first: an abort meant a request that is live now, never a later one
        self._apply_ops()
        for _ in range(min(INTAKE_SLICE, len(self._adds))):
            self._apply_add(self._adds.popleft())
        self._core_waiting = self.core.scheduler.num_waiting

    def _apply_ops(self) -> None:
        while self._ops:
            self._ops.popleft().run()
        self._sync_adapters()

    def _apply_add(self, add: _Add) -> None:
        live = self._streams.get(add.request_id)
        if live is None or live.token != add.token:
            return  # aborted before it reached the core
        try:
            self.core.add_request(
                add.request_id, add.prompt_ids, add.sampling, adapter=add.adapter, arrival_time=add.arrival
            )
        except ChameleonError as exc:  # checked in generate(); only a race (adapter removed, quarantined) gets here
            self._deliver(self._terminal(add.request_id, error=str(exc)))

    def _apply_aborts(self) -> None:
        while self._aborts:
            request_id, token = self._aborts.popleft()
            live = self._streams.get(request_id)
            if live is None or live.token != token:
                continue  # stale: that request finished; the id may belong to a newer one
            out = self.core.abort(request_id)
            self._deliver(out if out is not None else self._terminal(request_id))

    def _sync_adapters(self) -> None:
        """Mirror quarantines (the core marks adapters broken) into the front end's view."""
        for name, info in self.core.adapters.items():
            if info.broken and name in self._adapters and not self._adapters[name].broken:
                self._adapters[name] = info

    def _terminal(self, request_id: str, error: str | None = None) -> RequestOutput:
        now = self.core.now()
        metrics = RequestMetrics(arrival_time=now, finish_time=now)
        return RequestOutput(request_id, "", (), "", True, "abort", metrics, error=error)

    def _abort_all(self, error: str | None = None) -> list[RequestOutput]:
        outputs = self.core.abort_all()
        return outputs if error is None else [_with_error(out, error) for out in outputs]

    def _deliver(self, out: RequestOutput) -> None:
        live = self._streams.get(out.request_id)
        if live is None:
            return
        if live.held is not None:
            out, live.held = _merge(live.held, out, live.cumulative), None
        if not out.finished and live.send.statistics().current_buffer_used >= OUTPUT_BUFFER:
            live.held = out  # the consumer lags: keep one merged output instead of a growing queue
            return
        try:
            live.send.send_nowait(out)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.WouldBlock):
            if not out.finished:  # nobody is listening any more
                self._aborts.append((out.request_id, live.token))
        if out.finished:
            live.send.close()
            del self._streams[out.request_id]
            if live.adapter is not None:
                self._adapter_users.get(live.adapter, set()).discard(out.request_id)


def _check_name(what: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{what} must be a non-empty string, got {type(value).__name__} {value!r:.80}")


def _merge(first: RequestOutput, then: RequestOutput, cumulative: bool) -> RequestOutput:
    """Two consecutive outputs of one request as one (what a lagging consumer reads)."""
    return merge_outputs(first, then, cumulative)


def _with_error(out: RequestOutput, error: str) -> RequestOutput:
    return attrs.evolve(out, error=error)
