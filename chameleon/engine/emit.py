"""How the core turns one request's progress into `RequestOutput`s, logprobs included.

Pure functions over a `Request` (and its detokenizer's text): the core decides *when* an output
is due, these decide *what* it carries for the request's output kind (`engine/checks.py`).
"""

from __future__ import annotations

from chameleon.engine.token_text import TokenText
from chameleon.executor.base import TokenLogprobs
from chameleon.outputs import CompletionOutput, FinishReason, PositionLogprobs, RequestOutput
from chameleon.sched.request import Request


def stop_reason(
    request: Request, token: int, eos_token_ids: tuple[int, ...], max_model_len: int
) -> FinishReason | None:
    p = request.sampling
    if token in p.stop_token_ids or (not p.ignore_eos and token in eos_token_ids):
        return "stop"
    if len(request.output_token_ids) >= p.max_tokens or request.num_tokens >= max_model_len:
        return "length"
    return None


def record_logprobs(request: Request, logprobs: TokenLogprobs | None, text: TokenText) -> None:
    """Keep the sampled token's logprobs, when its sampling asks (an executor that computes none,
    such as the simulator, leaves an empty entry so entries stay aligned with the token ids)."""
    if request.sampling.logprobs is not None:
        request.logprobs.append(text.position(logprobs) if logprobs is not None else {})


def record_prompt_logprobs(request: Request, first: int, entries: list[TokenLogprobs], text: TokenText) -> None:
    for i, lp in enumerate(entries):
        request.prompt_logprobs[first + i] = text.position(lp)


def output(
    request: Request,
    *,
    delta: str,
    token_ids: tuple[int, ...],
    text: str,
    finished: bool,
    reason: FinishReason | None,
    cumulative: bool,
    error: str | None = None,
) -> RequestOutput:
    """One output of `request`; `token_ids` are the new ids, or all of them when `cumulative`."""
    p = request.sampling
    if p.logprobs is None and p.prompt_logprobs is None and request.index == 0:  # the common case, per token
        return RequestOutput(request.request_id, delta, token_ids, text, finished, reason, request.metrics(), error)
    logprobs: tuple[PositionLogprobs, ...] | None = None
    if p.logprobs is not None:
        got = request.logprobs
        logprobs = tuple(got) if cumulative else tuple(got[len(got) - len(token_ids) :]) if token_ids else ()
    completion = CompletionOutput(request.index, text, token_ids, reason, logprobs, delta)
    return RequestOutput.of(
        request.request_id,
        (completion,),
        finished,
        request.metrics(),
        error=error,
        prompt_logprobs=_prompt_logprobs_once(request),
    )


def _prompt_logprobs_once(request: Request) -> tuple[PositionLogprobs | None, ...] | None:
    """The prompt's logprobs on the first output that can carry all of them (vLLM: first is None)."""
    if request.sampling.prompt_logprobs is None or request.prompt_logprobs_sent:
        return None
    n = len(request.prompt_token_ids)
    if len(request.prompt_logprobs) < n - 1:  # not all computed yet (an abort during the prefill)
        return None
    request.prompt_logprobs_sent = True
    return (None, *(request.prompt_logprobs[i] for i in range(1, n)))
