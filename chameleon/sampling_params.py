"""Per-request sampling parameters, validated on construction (vLLM's names and meanings)."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from chameleon.errors import InvalidSamplingParamsError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidSamplingParamsError(message)


def _to_str_tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _to_int_tuple(value: Sequence[int] | None) -> tuple[int, ...]:
    return () if value is None else tuple(value)


@attrs.frozen
class SamplingParams:
    """How to pick tokens and when to stop. `temperature=0` is greedy decoding."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled (vLLM uses -1; both are accepted)
    seed: int | None = None
    stop: tuple[str, ...] = attrs.field(default=(), converter=_to_str_tuple)
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=_to_int_tuple)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False

    def __attrs_post_init__(self) -> None:
        _check(
            isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens >= 1,
            f"max_tokens must be an int >= 1, got {self.max_tokens!r}",
        )
        _check(
            isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature < float("inf"),
            f"temperature must be a finite number >= 0, got {self.temperature!r}",
        )
        _check(
            isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
            f"top_p must be in (0, 1], got {self.top_p!r}",
        )
        _check(
            isinstance(self.top_k, int) and self.top_k >= -1,
            f"top_k must be an int >= 0 (0 or -1 disables it), got {self.top_k!r}",
        )
        _check(
            self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
            f"seed must be None or an int in [0, 2**63), got {self.seed!r}",
        )
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
