"""Response bodies in OpenAI's shapes (as vLLM sends them): full responses and SSE chunks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import attrs

from chameleon.engine.token_text import TokenText
from chameleon.errors import ChameleonError
from chameleon.outputs import PositionLogprobs
from chameleon.serve.logprobs import chat_logprobs, completion_logprobs
from chameleon.serve.runs import ChoiceState, Run

Kind = Literal["completion", "chat"]


@attrs.frozen
class Envelope:
    """What every body and chunk of one response shares; `logprobs` is the top-k the request
    asked for (None: no logprobs) and `token_text` spells the tokens."""

    kind: Kind
    model: str
    logprobs: int | None = None
    token_text: TokenText | None = None
    id: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    created: int = attrs.field(factory=lambda: int(time.time()))

    def head(self, chunk: bool) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        obj = {"chat": "chat.completion", "completion": "text_completion"}[self.kind]
        if chunk and self.kind == "chat":
            obj += ".chunk"
        return {"id": prefix + self.id, "object": obj, "created": self.created, "model": self.model}

    def logprobs_body(self, entries: Sequence[PositionLogprobs], choice: ChoiceState) -> dict[str, Any] | None:
        """The `logprobs` of a choice (or of one chunk of it) in the endpoint's OpenAI shape."""
        if self.logprobs is None or self.token_text is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(entries, self.logprobs, self.token_text)
        body = completion_logprobs(entries, choice.text_offset)
        choice.text_offset = body.pop("next_offset")
        return body


def usage(run: Run) -> dict[str, int]:
    p, c = run.prompt_tokens, run.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def full_body(env: Envelope, run: Run) -> dict[str, Any]:
    """The non-streaming response, once every choice has finished."""
    choices = []
    for c in run.choices:
        choice: dict[str, Any] = {"index": c.index, "logprobs": env.logprobs_body(c.logprobs, c)}
        choice["finish_reason"] = c.finish_reason
        if env.kind == "chat":
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        choice["stop_reason"] = None
        choices.append(choice)
    return {**env.head(chunk=False), "choices": choices, "usage": usage(run)}


def _chunk(
    env: Envelope, index: int, text: str | None, finish: str | None, role: bool = False, logprobs: Any = None
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish}
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
            async for out in run.events():
                has_logprobs = env.logprobs is not None and bool(out.logprobs)
                if out.delta or out.finished or has_logprobs:
                    lp = env.logprobs_body(out.logprobs or (), run.choices[out.index]) if has_logprobs else None
                    yield sse(_chunk(env, out.index, out.delta, out.finish_reason, logprobs=lp))
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
