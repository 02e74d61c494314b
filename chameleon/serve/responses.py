"""Response bodies in OpenAI's shapes (as vLLM sends them): full responses and SSE chunks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import attrs

from chameleon.errors import ChameleonError
from chameleon.serve.runs import Run

Kind = Literal["completion", "chat"]


@attrs.frozen
class Envelope:
    """What every body and chunk of one response shares."""

    kind: Kind
    model: str
    id: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    created: int = attrs.field(factory=lambda: int(time.time()))

    def head(self, chunk: bool) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        obj = {"chat": "chat.completion", "completion": "text_completion"}[self.kind]
        if chunk and self.kind == "chat":
            obj += ".chunk"
        return {"id": prefix + self.id, "object": obj, "created": self.created, "model": self.model}


def usage(run: Run) -> dict[str, int]:
    p, c = run.prompt_tokens, run.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def full_body(env: Envelope, run: Run) -> dict[str, Any]:
    """The non-streaming response, once every choice has finished."""
    choices = []
    for c in run.choices:
        choice: dict[str, Any] = {"index": c.index, "logprobs": None, "finish_reason": c.finish_reason}
        if env.kind == "chat":
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        choice["stop_reason"] = None
        choices.append(choice)
    return {**env.head(chunk=False), "choices": choices, "usage": usage(run)}


def _chunk(env: Envelope, index: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish}
    if env.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {**env.head(chunk=True), "choices": [choice]}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def sse_stream(env: Envelope, run: Run, include_usage: bool) -> AsyncIterator[bytes]:
    """`data: {chunk}` events for every output, optionally a usage chunk, then `data: [DONE]`."""
    try:
        if env.kind == "chat":
            for c in run.choices:
                yield sse(_chunk(env, c.index, None, None, role=True))
        try:
            async for index, out in run.events():
                if out.delta or out.finished:
                    yield sse(_chunk(env, index, out.delta, out.finish_reason if out.finished else None))
        except ChameleonError as exc:  # the headers are sent: report it in the stream, as vLLM does
            yield sse({"error": {"message": str(exc), "type": "internal_error", "param": None, "code": 500}})
            yield sse("[DONE]")
            return
        if include_usage:
            yield sse({**env.head(chunk=True), "choices": [], "usage": usage(run)})
        yield sse("[DONE]")
    finally:
        await run.aclose()


async def collect(run: Run) -> None:
    """Drain a run (non-streaming responses)."""
    async for _ in run.events():
        pass
