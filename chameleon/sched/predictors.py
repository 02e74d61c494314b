"""Output-length predictors: pure policy code behind one `OutputLengthPredictor` protocol.

Every rule and its reason: `docs/scheduling.md` (Output-length predictors).
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from collections.abc import Hashable
from typing import Any, Protocol, runtime_checkable

import attrs

from chameleon.errors import ChameleonError, ConfigError

__all__ = [
    "HistoryPredictor",
    "MissingTrueLengthError",
    "NoisyOraclePredictor",
    "OraclePredictor",
    "OutputLengthPredictor",
    "PredictionInput",
    "make_predictor",
    "prompt_bucket",
]


class MissingTrueLengthError(ChameleonError, ValueError):
    """An oracle predictor was asked about an item that carries no `true_output_len`."""


def _non_negative(_inst: object, attribute: attrs.Attribute, value: int | None) -> None:  # type: ignore[type-arg]
    if value is not None and value < 0:
        raise ValueError(f"PredictionInput.{attribute.name} must be >= 0, got {value!r}")


def _positive(_inst: object, attribute: attrs.Attribute, value: int | None) -> None:  # type: ignore[type-arg]
    if value is not None and value < 1:
        raise ValueError(f"PredictionInput.{attribute.name} must be >= 1, got {value!r}")


@attrs.frozen
class PredictionInput:
    """What a predictor may look at. `true_output_len` is known only to oracles (simulation)."""

    request_id: str
    adapter: str | None
    prompt_len: int = attrs.field(validator=_non_negative)
    true_output_len: int | None = attrs.field(default=None, validator=_non_negative)
    max_tokens: int | None = attrs.field(default=None, validator=_positive)  # predictions are clamped to it


@runtime_checkable
class OutputLengthPredictor(Protocol):
    def predict(self, item: PredictionInput) -> int:
        """Predicted number of output tokens, >= 1 and <= `item.max_tokens` when set."""
        ...

    def observe(self, item: PredictionInput, output_len: int) -> None:
        """A finished request's real output length (learning predictors update on it)."""
        ...


def clamp_prediction(length: int, max_tokens: int | None) -> int:
    """Clamp a raw prediction to [1, max_tokens]."""
    length = max(1, int(length))
    return length if max_tokens is None else min(length, max_tokens)


def prompt_bucket(prompt_len: int) -> int:
    """Log2 bucket of a prompt length: 0 -> 0, 1 -> 1, 2..3 -> 2, 4..7 -> 3, ..."""
    return max(0, prompt_len).bit_length()


# --- history ---------------------------------------------------------------------------------


class _Window:
    """The last `size` values, plus the same values kept sorted for O(1) quantiles."""

    __slots__ = ("_recent", "_sorted")

    def __init__(self, size: int) -> None:
        self._recent: deque[int] = deque(maxlen=size)
        self._sorted: list[int] = []

    def __len__(self) -> int:
        return len(self._recent)

    def add(self, value: int) -> None:
        if len(self._recent) == self._recent.maxlen:
            oldest = self._recent[0]  # the deque drops it on append; drop it from the sorted copy too
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self._recent.append(value)
        bisect.insort(self._sorted, value)

    def quantile(self, q: float) -> int:
        index = max(0, math.ceil(q * len(self._sorted)) - 1)  # nearest rank, lower
        return self._sorted[index]


class HistoryPredictor:
    """Online predictor: a quantile of recent output lengths per (adapter, log2 prompt bucket).

    Falls back (adapter, bucket) -> adapter -> bucket -> global -> `prior` until a level holds
    `min_samples` observations. Deterministic: the same observations give the same predictions.
    """

    def __init__(self, *, window: int = 64, min_samples: int = 8, quantile: float = 0.5, prior: int = 128) -> None:
        if window < 1:
            raise ConfigError(f"HistoryPredictor.window must be >= 1, got {window!r}")
        if not 1 <= min_samples <= window:
            raise ConfigError(f"HistoryPredictor.min_samples must be in 1..window ({window}), got {min_samples!r}")
        if not 0.0 <= quantile <= 1.0:
            raise ConfigError(f"HistoryPredictor.quantile must be in [0, 1], got {quantile!r}")
        if prior < 1:
            raise ConfigError(f"HistoryPredictor.prior must be >= 1, got {prior!r}")
        self.window = window
        self.min_samples = min_samples
        self.quantile = quantile
        self.prior = prior
        self._history: dict[Hashable, _Window] = {}

    @staticmethod
    def _keys(item: PredictionInput) -> tuple[Hashable, ...]:
        """History keys, finest level first. Tags keep levels apart (adapter names are free text)."""
        bucket = prompt_bucket(item.prompt_len)
        return (("ab", item.adapter, bucket), ("a", item.adapter), ("b", bucket), ("g",))

    def predict(self, item: PredictionInput) -> int:
        for key in self._keys(item):
            seen = self._history.get(key)
            if seen is not None and len(seen) >= self.min_samples:
                return clamp_prediction(seen.quantile(self.quantile), item.max_tokens)
        return clamp_prediction(self.prior, item.max_tokens)

    def observe(self, item: PredictionInput, output_len: int) -> None:
        if output_len < 0:
            raise ValueError(f"output_len must be >= 0, got {output_len!r}")
        for key in self._keys(item):
            self._history.setdefault(key, _Window(self.window)).add(int(output_len))

    def samples(self, adapter: str | None, prompt_len: int) -> int:
        """How many observations the finest level for this (adapter, prompt length) holds."""
        seen = self._history.get(("ab", adapter, prompt_bucket(prompt_len)))
        return 0 if seen is None else len(seen)


# --- oracles ---------------------------------------------------------------------------------


def _true_length(item: PredictionInput) -> int:
    if item.true_output_len is None:
        raise MissingTrueLengthError(f"request {item.request_id!r} carries no true_output_len for the oracle")
    return item.true_output_len


class OraclePredictor:
    """Returns the true output length (simulation only), clamped like every prediction."""

    def predict(self, item: PredictionInput) -> int:
        return clamp_prediction(_true_length(item), item.max_tokens)

    def observe(self, item: PredictionInput, output_len: int) -> None:
        pass  # nothing to learn


def within_tolerance(pred: int, true: int, tolerance: float) -> bool:
    """The accuracy criterion of `NoisyOraclePredictor`: |pred - true| <= tolerance * true."""
    return abs(pred - true) <= tolerance * true


class NoisyOraclePredictor:
    """The oracle, right with probability `accuracy` and wrong by more than `tolerance` otherwise.

    See the module docstring for the exact error model. Deterministic per (seed, request_id).
    """

    def __init__(
        self,
        accuracy: float,
        *,
        seed: int = 0,
        tolerance: float = 0.10,
        max_over_error: float = 1.0,
        max_under_error: float = 0.9,
    ) -> None:
        if not 0.0 <= accuracy <= 1.0:
            raise ConfigError(f"NoisyOraclePredictor.accuracy must be in [0, 1], got {accuracy!r}")
        if not 0.0 < tolerance < 1.0:
            raise ConfigError(f"NoisyOraclePredictor.tolerance must be in (0, 1), got {tolerance!r}")
        if not max_over_error > tolerance:
            raise ConfigError(f"max_over_error must exceed tolerance ({tolerance}), got {max_over_error!r}")
        if not tolerance < max_under_error < 1.0:
            raise ConfigError(f"max_under_error must be in (tolerance, 1), got {max_under_error!r}")
        self.accuracy = accuracy
        self.seed = seed
        self.tolerance = tolerance
        self.max_over_error = max_over_error
        self.max_under_error = max_under_error

    def predict(self, item: PredictionInput) -> int:
        true = clamp_prediction(_true_length(item), item.max_tokens)
        rng = random.Random(f"{self.seed}:{item.request_id}")
        if rng.random() < self.accuracy:
            return true
        sides = [side for side in (+1, -1) if self._side_possible(side, true, item.max_tokens)]
        if not sides:
            return true  # no wrong answer exists in [1, max_tokens]
        side = sides[0] if len(sides) == 1 else rng.choice(sides)
        return self._wrong(side, true, item.max_tokens, rng)

    def observe(self, item: PredictionInput, output_len: int) -> None:
        pass  # the error model is fixed

    def _side_possible(self, side: int, true: int, cap: int | None) -> bool:
        extreme = 1 if side < 0 else cap  # the farthest prediction on that side
        return extreme is None or not within_tolerance(extreme, true, self.tolerance)

    def _wrong(self, side: int, true: int, cap: int | None, rng: random.Random) -> int:
        top = self.max_over_error if side > 0 else self.max_under_error
        error = rng.uniform(self.tolerance, top)
        pred = clamp_prediction(round(true * (1 + side * error)), cap)
        while within_tolerance(pred, true, self.tolerance):  # rounding or clamping fell into the band
            pred += side  # terminates: _side_possible said the extreme on this side is outside the band
        return pred


# --- factory ---------------------------------------------------------------------------------

_PREDICTORS: dict[str, type[Any]] = {
    "history": HistoryPredictor,
    "oracle": OraclePredictor,
    "noisy-oracle": NoisyOraclePredictor,
}


def make_predictor(name: str, **kw: Any) -> OutputLengthPredictor:
    """Build a predictor by name: "history" | "oracle" | "noisy-oracle"; `kw` go to its constructor."""
    cls = _PREDICTORS.get(name)
    if cls is None:
        raise ConfigError(f"unknown predictor {name!r}; choose one of {sorted(_PREDICTORS)}")
    try:
        return cls(**kw)  # type: ignore[no-any-return]
    except TypeError as exc:  # a wrong keyword is a configuration mistake, say so in our terms
        raise ConfigError(f"bad arguments for predictor {name!r}: {exc}") from exc
