"""Per-request sampling parameters, validated on construction (vLLM's names and meanings).

Every bad value raises `InvalidSamplingParamsError`, never another exception type. Bools are never
accepted as numbers, and ints are required where ints are meant. Bounds (all documented in README):
- `temperature`: 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE] = [1e-3, 1e4]. vLLM silently
  clamps tiny temperatures; we refuse them instead, because dividing logits by 1e-300 overflows them to
  inf and the row cannot be sampled. Use 0 for greedy decoding.
- `top_p`: in [MIN_TOP_P, 1] = [1e-6, 1]; smaller values underflow to 0 in the float32 sampler.
- `stop`: a str or a list/tuple of non-empty str; `stop_token_ids`: a list/tuple of ints in
  [0, 2**31). `seed`: None or an int in [0, 2**63).
- `output_kind` (vLLM's `RequestOutputKind`): "delta" (each output carries only the new text and
  tokens), "cumulative" (each carries everything so far), "final" (one output, at the end).
- `n`: an int in [1, MAX_N] = [1, 128]: that many independent completions of the prompt, carried in
  `RequestOutput.outputs` (index 0..n-1). With a `seed`, completion i samples with seed
  `(seed + i) % 2**63`, so completion i equals an n=1 request with that seed; without one, each
  completion gets its own seed from the engine's. Greedy completions are identical (as in vLLM).
- `logprobs`, `prompt_logprobs`: None or an int in [0, MAX_LOGPROBS] = [0, 20] (OpenAI's limit):
  per sampled (or prompt) token its own logprob, its rank, and the `logprobs` most likely tokens.
  They are vLLM's default "raw" logprobs: log-softmax of the model's logits *before* temperature,
  top-k and top-p (see `chameleon/outputs.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import attrs

from chameleon.errors import InvalidSamplingParamsError

MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1e4
MIN_TOP_P = 1e-6
MAX_TOKEN_ID = 2**31 - 1
MAX_N = 128
MAX_LOGPROBS = 20
OutputKind = Literal["delta", "cumulative", "final"]
OUTPUT_KINDS: tuple[str, ...] = ("delta", "cumulative", "final")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidSamplingParamsError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _items(value: Any, field: str) -> tuple[Any, ...]:
    """A list or tuple as a tuple; any other container (str, bytes, dict, set, ...) is refused."""
    if not isinstance(value, list | tuple):
        raise InvalidSamplingParamsError(f"{field} must be a list or tuple, got {type(value).__name__}: {value!r}")
    return tuple(value)


def _to_str_tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return _items(value, "stop")


def _to_int_tuple(value: Sequence[int] | None) -> tuple[int, ...]:
    return () if value is None else _items(value, "stop_token_ids")


@attrs.frozen
class SamplingParams:
    """How to pick tokens and when to stop. `temperature=0` is greedy decoding (module docstring: bounds)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled (vLLM uses -1; both are accepted)
    seed: int | None = None
    stop: tuple[str, ...] = attrs.field(default=(), converter=_to_str_tuple)
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=_to_int_tuple)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    output_kind: OutputKind = "delta"
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __attrs_post_init__(self) -> None:
        self._check_numbers()
        self._check_stops()
        self._check_outputs()
        for field in ("ignore_eos", "include_stop_str_in_output"):
            _check(isinstance(getattr(self, field), bool), f"{field} must be a bool, got {getattr(self, field)!r}")
        _check(
            isinstance(self.output_kind, str) and self.output_kind in OUTPUT_KINDS,
            f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}",
        )

    def _check_numbers(self) -> None:
        _check(
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            f"max_tokens must be an int >= 1, got {self.max_tokens!r}",
        )
        t = self.temperature
        _check(
            _is_real(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE),
            f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {t!r}",
        )
        _check(
            _is_real(self.top_p) and MIN_TOP_P <= self.top_p <= 1.0,
            f"top_p must be in [{MIN_TOP_P:g}, 1], got {self.top_p!r}",
        )
        _check(
            _is_int(self.top_k) and self.top_k >= -1,
            f"top_k must be an int >= 0 (0 or -1 disables it), got {self.top_k!r}",
        )
        _check(
            self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
            f"seed must be None or an int in [0, 2**63), got {self.seed!r}",
        )

    def _check_stops(self) -> None:
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            f"stop strings must be non-empty strings, got {self.stop!r}",
        )
        _check(
            all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in self.stop_token_ids),
            f"stop_token_ids must be ints in [0, {MAX_TOKEN_ID}], got {self.stop_token_ids!r}",
        )

    def _check_outputs(self) -> None:
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, f"n must be an int in [1, {MAX_N}], got {self.n!r}")
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(self, field)
            _check(
                value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS),
                f"{field} must be None or an int in [0, {MAX_LOGPROBS}], got {value!r}",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_logits(self) -> bool:
        """Whether this row's full-vocabulary logits must be materialised: it samples from a
        distribution, or asks for logprobs. A greedy row without logprobs needs only the argmax,
        which the LM head may reduce chunk by chunk (`LlamaModel.greedy_tokens`)."""
        return not self.greedy or self.logprobs is not None

