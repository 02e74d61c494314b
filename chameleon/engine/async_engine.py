"""The async front end: request intake, one output stream per request, one background loop.

The loop owns the engine core. Between iterations it applies queued adds and aborts; the blocking
`step()` runs in a worker thread so the event loop stays responsive. Runs under asyncio and trio
(anyio). Nothing in the core knows this module exists.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from chameleon.clock import Clock
from chameleon.config import EngineConfig
from chameleon.engine.core import EngineCore
from chameleon.errors import (
    AdapterExistsError,
    AdapterInUseError,
    AdapterNotFoundError,
    ChameleonError,
    EngineClosedError,
    EngineStepError,
    InvalidRequestError,
)
from chameleon.outputs import AdapterInfo, RequestMetrics, RequestOutput
from chameleon.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class RequestStream:
    """`async for out in engine.generate(...)`. Dropping or cancelling it aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, receive: MemoryObjectReceiveStream[RequestOutput]):
        self.request_id = request_id
        self._engine = engine
        self._receive = receive
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            out = await self._receive.receive()
        except anyio.EndOfStream:
            self._done = True
            raise StopAsyncIteration from None
        except BaseException:  # cancelled while waiting: the consumer is gone
            self._abort()
            raise
        if out.finished:
            self._done = True
            self._receive.close()
            if out.error is not None:
                raise EngineStepError(f"request {self.request_id!r} failed: {out.error}")
        return out

    async def aclose(self) -> None:
        self._abort()

    def _abort(self) -> None:
        if not self._done:
            self._done = True
            self._engine._queue_abort(self.request_id)
            self._receive.close()

    def __del__(self) -> None:
        # `break` out of `async for` drops the last reference right away in CPython.
        self._abort()


class AsyncEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.tokenizer = core.tokenizer
        self._streams: dict[str, MemoryObjectSendStream[RequestOutput]] = {}
        self._adds: deque[tuple[str, list[int], SamplingParams, str | None, float]] = deque()
        self._ops: deque[Callable[[], None]] = deque()  # core mutations, applied between steps
        self._adapter_users: dict[str, set[str]] = {}  # adapter -> live request ids (front-end view)
        self._adapters: dict[str, AdapterInfo] = dict(core.adapters)
        self._aborts: deque[str] = deque()  # appended from any thread (finalizers)
        self._wake: anyio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._started = False
        self._closed = False

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], config: EngineConfig | None = None, *, clock: Clock | None = None
    ) -> AsyncEngine:
        from chameleon.engine.factory import build_core

        return cls(build_core(path, config or EngineConfig(), clock=clock))

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncEngine:
        if self._closed:
            raise EngineClosedError("this engine was closed; create a new one")
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

        `adapter` names a registered LoRA adapter; None runs the base model.
        """
        self._check_running()
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequestError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        if request_id in self._streams:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use")
        if adapter is not None and adapter not in self._adapters:
            raise AdapterNotFoundError(f"no adapter named {adapter!r} is registered (known: {sorted(self._adapters)})")
        prompt_ids = self._tokenize(prompt)
        self.core.check_request(request_id, prompt_ids)
        send, receive = anyio.create_memory_object_stream[RequestOutput](math.inf)
        self._streams[request_id] = send
        if adapter is not None:
            self._adapter_users.setdefault(adapter, set()).add(request_id)
        self._adds.append((request_id, prompt_ids, sampling, adapter, self.core.now()))
        self._poke()
        return RequestStream(self, request_id, receive)

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
        """Abort a request by id; its stream ends with finish_reason "abort"."""
        self._queue_abort(request_id)

    # --- adapters ---------------------------------------------------------------------------------

    async def add_adapter(self, name: str, path: str | os.PathLike[str]) -> AdapterInfo:
        """Validate a PEFT adapter against the model and load it into host memory.

        The reading happens in a worker thread (the event loop and the running batch go on); the
        registration is applied between two iterations.
        """
        self._check_running()
        if name in self._adapters:
            raise AdapterExistsError(f"an adapter named {name!r} is already registered")
        adapter = await anyio.to_thread.run_sync(self.core.read_adapter, name, str(path))
        info: AdapterInfo = await self._between_steps(lambda: self.core.register_adapter(name, adapter))
        self._adapters[name] = info
        return info

    def remove_adapter(self, name: str) -> None:
        """Unregister an adapter. Refused while unfinished requests use it."""
        self._check_running()
        if name not in self._adapters:
            raise AdapterNotFoundError(f"no adapter named {name!r} is registered")
        users = self._adapter_users.get(name)
        if users:
            raise AdapterInUseError(f"adapter {name!r} is used by {len(users)} unfinished requests")
        del self._adapters[name]
        self._queue_op(lambda: self.core.remove_adapter(name))

    def pin_adapter(self, name: str) -> None:
        """Keep the adapter on the device once loaded: it is never evicted while pinned."""
        self._set_pinned(name, True)

    def unpin_adapter(self, name: str) -> None:
        self._set_pinned(name, False)

    def adapters(self) -> list[AdapterInfo]:
        return list(self._adapters.values())

    def _set_pinned(self, name: str, pinned: bool) -> None:
        self._check_running()
        if name not in self._adapters:
            raise AdapterNotFoundError(f"no adapter named {name!r} is registered")
        self._adapters[name] = attrs.evolve(self._adapters[name], pinned=pinned)
        self._queue_op(lambda: self.core.pin_adapter(name, pinned))

    def _check_running(self) -> None:
        if not self._started or self._closed:
            raise EngineClosedError("the engine is not running (use `async with engine:`)")

    def _queue_op(self, op: Callable[[], None]) -> None:
        self._ops.append(op)
        self._poke()

    async def _between_steps(self, fn: Callable[[], Any]) -> Any:
        done = anyio.Event()
        result: list[Any] = []
        error: list[BaseException] = []

        def op() -> None:
            try:
                result.append(fn())
            except Exception as exc:  # handed to the awaiting caller, not the loop
                error.append(exc)
            done.set()

        self._queue_op(op)
        await done.wait()
        if error:
            raise error[0]
        return result[0]

    def stats(self) -> dict[str, Any]:
        stats = self.core.stats().as_dict()
        stats["requests"]["waiting"] += len(self._adds)
        return stats

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: pass the prompt as token ids")
            return list(self.tokenizer(prompt).input_ids)
        return list(prompt)

    def _queue_abort(self, request_id: str) -> None:
        self._aborts.append(request_id)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # --- the loop -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._closed:
            self._apply_intake()
            if not self.core.has_unfinished_requests():
                self._wake = anyio.Event()
                if not self._adds and not self._ops and not self._closed:
                    with anyio.move_on_after(0.1):  # also re-checks aborts queued from other threads
                        await self._wake.wait()
                self._wake = None
                continue
            try:
                outputs = await anyio.to_thread.run_sync(self.core.step)
            except Exception as exc:  # a bug, not a bad batch (the core handles those): fail everyone
                log.exception("engine step failed")
                outputs = self._abort_all(error=f"{type(exc).__name__}: {exc}")
            for out in outputs:
                self._deliver(out)
            await anyio.lowlevel.checkpoint()  # let consumers see their tokens before the next step
        self._apply_intake()
        for out in self._abort_all():
            self._deliver(out)

    def _apply_intake(self) -> None:
        while self._ops:
            op = self._ops.popleft()
            try:
                op()
            except ChameleonError:  # already checked in the front end; only a race gets here
                log.exception("queued engine operation failed")
        while self._adds:
            request_id, prompt_ids, sampling, adapter, arrival = self._adds.popleft()
            try:
                self.core.add_request(request_id, prompt_ids, sampling, adapter=adapter, arrival_time=arrival)
            except ChameleonError as exc:  # checked in generate(); only a race gets here
                self._fail_unstarted(request_id, exc)
        while self._aborts:
            request_id = self._aborts.popleft()
            out = self.core.abort(request_id)
            if out is not None:
                self._deliver(out)
            else:
                self._streams.pop(request_id, None)
                self._forget_user(request_id)

    def _fail_unstarted(self, request_id: str, exc: ChameleonError) -> None:
        send = self._streams.pop(request_id, None)
        self._forget_user(request_id)
        if send is not None:
            now = self.core.now()
            metrics = RequestMetrics(arrival_time=now, finish_time=now)
            send.send_nowait(RequestOutput(request_id, "", (), "", True, "abort", metrics, error=str(exc)))
            send.close()

    def _abort_all(self, error: str | None = None) -> list[RequestOutput]:
        outputs = self.core.abort_all()
        return outputs if error is None else [_with_error(out, error) for out in outputs]

    def _deliver(self, out: RequestOutput) -> None:
        send = self._streams.get(out.request_id)
        if send is None:
            return
        try:
            send.send_nowait(out)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            if not out.finished:  # nobody is listening any more
                self._aborts.append(out.request_id)
        if out.finished:
            send.close()
            del self._streams[out.request_id]
            self._forget_user(out.request_id)

    def _forget_user(self, request_id: str) -> None:
        for users in self._adapter_users.values():
            users.discard(request_id)


def _with_error(out: RequestOutput, error: str) -> RequestOutput:
    return attrs.evolve(out, error=error)
