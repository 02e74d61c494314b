"""`RequestStream`: what `AsyncEngine.generate()` returns; dropping or cancelling it aborts the request."""

from __future__ import annotations

from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from chameleon.errors import EngineStepError
from chameleon.outputs import RequestOutput


class _Aborts(Protocol):
    def _queue_abort(self, request_id: str, token: int) -> None: ...


class RequestStream:
    """`async for out in engine.generate(...)`. Dropping or cancelling it aborts the request."""

    def __init__(
        self, engine: _Aborts, request_id: str, receive: MemoryObjectReceiveStream[RequestOutput], token: int = 0
    ):
        self.request_id = request_id
        self._engine = engine
        self._receive = receive
        self._token = token
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            out = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
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
            self._engine._queue_abort(self.request_id, self._token)
            self._receive.close()

    def __del__(self) -> None:
        # `break` out of `async for` drops the last reference right away in CPython.
        self._abort()
