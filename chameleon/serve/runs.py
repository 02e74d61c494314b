"""One API request as one engine request with `SamplingParams.n`: its stream, per choice, and the books.

The library runs the n choices (`engine/fanout.py`: choice i samples with seed `seed + i`, and with
prefix caching on, the choices share the prompt's prefill). Closing a `Run` (client gone, handler
cancelled) closes the engine stream, which aborts every choice and frees their KV blocks.

Metrics: TTFT is observed once per API request; in-flight counts (and so `--max-queued-requests`
and the per-adapter gauges) and finished-request counters count choices, each a unit of decode
work; prompt tokens are counted once per API request.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import attrs

from chameleon import CompletionOutput, RequestStream
from chameleon.outputs import PositionLogprobs
from chameleon.serve.metrics import InFlight, ServerMetrics


@attrs.define
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    started: bool = False
    last_time: float | None = None
    logprobs: list[PositionLogprobs] = attrs.field(factory=list)  # every token's, when asked
    text_offset: int = 0  # characters of token text before the next token (legacy logprobs)


@attrs.define
class Run:
    """The engine stream of one API request and the server's bookkeeping around it."""

    stream: RequestStream
    n: int
    adapter: str | None
    in_flight: InFlight
    metrics: ServerMetrics
    choices: list[ChoiceState] = attrs.field(init=False)
    prompt_tokens: int = attrs.field(default=0, init=False)
    _first: bool = attrs.field(default=True, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.choices = [ChoiceState(i) for i in range(self.n)]
        for _ in self.choices:
            self.in_flight.add(self.adapter)

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    async def events(self) -> AsyncIterator[CompletionOutput]:
        """Each choice's updates as they arrive (`index` says which); closes the run at the end."""
        try:
            async for out in self.stream:
                if self._first:
                    self._first = False
                    self.prompt_tokens = out.metrics.num_prompt_tokens
                    if out.metrics.ttft is not None:
                        self.metrics.observe_ttft(out.metrics.ttft)
                for completion in out.outputs:
                    self._account(self.choices[completion.index], completion)
                    yield completion
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.stream.aclose()
        for c in self.choices:
            self.in_flight.done(self.adapter, c.started)
            if c.finish_reason is None:
                self.metrics.observe_finished("abort", self._prompt_share(c), c.num_tokens)

    def _prompt_share(self, c: ChoiceState) -> int:
        return self.prompt_tokens if c.index == 0 else 0  # the prompt is counted once

    def _account(self, c: ChoiceState, out: CompletionOutput) -> None:
        now = time.perf_counter()
        if not c.started:
            c.started = True
            self.in_flight.started(self.adapter)
        elif c.last_time is not None and out.token_ids:
            gap = (now - c.last_time) / len(out.token_ids)
            for _ in out.token_ids:
                self.metrics.observe_tbt(gap)
        c.last_time = now
        c.text += out.delta
        c.num_tokens += len(out.token_ids)
        c.logprobs += out.logprobs or ()
        if out.finish_reason is not None:
            c.finish_reason = out.finish_reason
            self.metrics.observe_finished(out.finish_reason, self._prompt_share(c), c.num_tokens)


def start_run(stream: RequestStream, n: int, adapter: str | None, in_flight: InFlight, metrics: ServerMetrics) -> Run:
    return Run(stream, n, adapter, in_flight, metrics)
