"""Knobs of the scheduling policies (one frozen value, validated on construction)."""

from __future__ import annotations

from typing import Literal

import attrs

from chameleon.errors import ConfigError


def _positive(_inst: object, attribute: attrs.Attribute, value: float) -> None:  # type: ignore[type-arg]
    if not value > 0:
        raise ConfigError(f"SchedulerOptions.{attribute.name} must be > 0, got {value!r}")


@attrs.frozen
class SchedulerOptions:
    # Output-length prediction (sjf, chameleon): an online history predictor by default; the oracle
    # and the noisy oracle are for simulation and sensitivity studies (SPEC §3).
    predictor: Literal["history", "oracle", "noisy-oracle"] = "history"
    predictor_accuracy: float = 0.8
    seed: int = 0
    # Chameleon MLQ (paper §4.3).
    slo_ttft_s: float = attrs.field(default=5.0, validator=_positive)
    refresh_period_s: float = attrs.field(default=300.0, validator=_positive)  # paper: 5 minutes
    k_max: int = 4
    bypass: bool = True
    # FastServe skip-join MLFQ.
    mlfq_levels: int = 6
    mlfq_base_quantum_s: float = attrs.field(default=0.05, validator=_positive)  # level i: base * 2**i
    mlfq_promote_after_s: float = attrs.field(default=0.3, validator=_positive)  # alpha: 300 ms

    def __attrs_post_init__(self) -> None:
        if self.predictor not in ("history", "oracle", "noisy-oracle"):
            raise ConfigError(f"unknown predictor {self.predictor!r}")
        if not 0.0 <= self.predictor_accuracy <= 1.0:
            raise ConfigError("predictor_accuracy must be in [0, 1]")
        if not 1 <= self.k_max <= 8 or self.mlfq_levels < 1:
            raise ConfigError("k_max must be in 1..8 and mlfq_levels >= 1")
