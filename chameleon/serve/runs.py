"""One API request as `n` engine requests: start them, merge their streams, keep the books.

Choice i of n is an independent engine request (seed `seed + i` when a seed is given). Closing a
`Run` (client gone, handler cancelled) closes every engine stream, which aborts the requests and
frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence

import attrs

from chameleon import RequestOutput, RequestStream
from chameleon.serve.metrics import InFlight, ServerMetrics


@attrs.define
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    text: str = ""
    num_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None
    started: bool = False
    last_time: float | None = None


@attrs.define
class Run:
    """The engine streams of one API request and the server's bookkeeping around them."""

    streams: list[RequestStream]
    adapter: str | None
    in_flight: InFlight
    metrics: ServerMetrics
    choices: list[ChoiceState] = attrs.field(init=False)
    _closed: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.choices = [ChoiceState(i) for i in range(len(self.streams))]
        for _ in self.streams:
            self.in_flight.add(self.adapter)

    @property
    def prompt_tokens(self) -> int:
        return self.choices[0].prompt_tokens if self.choices else 0

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as they arrive from every stream; closes the run at the end."""
        try:
            async for index, out in _merge(self.streams):
                self._account(self.choices[index], out)
                yield index, out
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for stream in self.streams:
            await stream.aclose()
        for c in self.choices:
            self.in_flight.done(self.adapter, c.started)
            if c.finish_reason is None:
                self.metrics.observe_finished("abort", c.prompt_tokens, c.num_tokens)

    def _account(self, c: ChoiceState, out: RequestOutput) -> None:
        now = time.perf_counter()
        if not c.started:
            c.started = True
            self.in_flight.started(self.adapter)
            ttft = out.metrics.ttft
            if ttft is not None:
                self.metrics.observe_ttft(ttft)
        elif c.last_time is not None and out.token_ids:
            gap = (now - c.last_time) / len(out.token_ids)
            for _ in out.token_ids:
                self.metrics.observe_tbt(gap)
        c.last_time = now
        c.text += out.delta
        c.num_tokens += len(out.token_ids)
        c.prompt_tokens = out.metrics.num_prompt_tokens
        if out.finished:
            c.finish_reason = out.finish_reason
            self.metrics.observe_finished(out.finish_reason, c.prompt_tokens, c.num_tokens)


async def start_run(
    start_one: Callable[[int], RequestStream], n: int, adapter: str | None, in_flight: InFlight, metrics: ServerMetrics
) -> Run:
    """Start `n` engine requests; if one is refused, the ones already started are aborted."""
    streams: list[RequestStream] = []
    try:
        for i in range(n):
            streams.append(start_one(i))
    except BaseException:
        for s in streams:
            await s.aclose()
        raise
    return Run(streams, adapter, in_flight, metrics)


async def _merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several streams in arrival order; pending reads are cancelled on exit."""
    pending: dict[asyncio.Task[RequestOutput], int] = {}
    for i, s in enumerate(streams):
        pending[asyncio.ensure_future(s.__anext__())] = i
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: pending[t]):
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                if not out.finished:
                    pending[asyncio.ensure_future(streams[i].__anext__())] = i
                yield i, out
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
