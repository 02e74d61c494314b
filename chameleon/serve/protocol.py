"""Request bodies of the OpenAI-compatible API (pydantic), with vLLM's sampling extras.

Unknown fields are ignored, as vLLM and OpenAI do, so clients that send `user`, `logit_bias`,
... still work; fields we cannot honour with a non-default value are refused in `to_sampling`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from chameleon.errors import InvalidRequestError
from chameleon.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_N = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampled(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extras
    top_k: int | None = Field(default=None, ge=-1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False

    def to_sampling(self, default_max_tokens: int) -> SamplingParams:
        """The engine's parameters: the library runs the n choices (choice i samples with seed
        `seed + i`) and computes `num_logprobs` per token when the request asks."""
        return SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            n=self.n,
            logprobs=self.num_logprobs,
        )

    @property
    def num_logprobs(self) -> int | None:
        """Top logprobs per token the response shows; None: no logprobs at all."""
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampled):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # legacy: top-k per token

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def single_prompt(self) -> str | list[int]:
        """One prompt (text or token ids); a batch of prompts is refused with a clear message."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise InvalidRequestError("only one prompt per request is supported; send one request per prompt")
            return p[0]  # type: ignore[return-value]
        if self.echo:
            raise InvalidRequestError("echo=true is not supported")
        return p  # type: ignore[return-value]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    chat_template: str | None = None  # vLLM extra
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[dict[str, Any]]:
        return [_flatten(m) for m in self.messages]

    def to_sampling(self, default_max_tokens: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            default_max_tokens = self.max_completion_tokens
        return super().to_sampling(default_max_tokens)


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def _flatten(message: ChatMessage) -> dict[str, Any]:
    """OpenAI content parts (`[{"type": "text", "text": ...}]`) joined into one string."""
    out = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if p.get("type") == "text"]
        if len(texts) != len(content):
            raise InvalidRequestError("only text content parts are supported")
        out["content"] = "".join(texts)
    out.setdefault("content", "")
    return out
