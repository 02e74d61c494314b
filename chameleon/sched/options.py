"""Knobs of every scheduling policy, MLQ's included (one frozen value, validated on construction).

Defaults follow the papers: MLQ's 5 min refresh, K <= 4, TTFT SLO 5 s and WRS weights 0.4/0.6
(Chameleon §4.3); MLFQ's 2x quanta and 300 ms promotion (FastServe). The K rule and the estimator
windows are ours, documented in `docs/scheduling.md`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs

from chameleon.errors import ConfigError
from chameleon.sched.mlq.clustering import DEFAULT_MIN_SAMPLES, DEFAULT_MIN_SILHOUETTE, QueueLayout
from chameleon.sched.mlq.estimators import ArrivalRateEstimator
from chameleon.validate import boolean, int_at_least, number, one_of, positive, positive_int, unit_interval

PredictorName = Literal["history", "oracle", "noisy-oracle"]


@attrs.frozen
class SchedulerOptions:
    # Output-length prediction (sjf, chameleon): an online history predictor by default; the oracle
    # and the noisy oracle are for simulation and sensitivity studies (SPEC §3).
    predictor: PredictorName = attrs.field(default="history", validator=one_of("history", "oracle", "noisy-oracle"))
    predictor_accuracy: float = attrs.field(default=0.8, validator=unit_interval)
    seed: int = 0
    # Chameleon MLQ (paper §4.3).
    slo_ttft_s: float = attrs.field(default=5.0, validator=positive)
    refresh_period_s: float = attrs.field(default=300.0, validator=positive)  # paper: 5 minutes
    # Ours: the first refresh as soon as `min_cluster_samples` sizes are known, not 5 min in.
    early_first_refresh: bool = attrs.field(default=True, validator=boolean)
    k_max: int = attrs.field(default=4, validator=int_at_least(1))
    # K rule: "silhouette" (ours), "wcss" (the paper's "minimal WCSS", read literally: K = k_max),
    # "static" (Ch-Static: k_max equal WRS ranges and equal token quotas).
    k_rule: str = attrs.field(default="silhouette", validator=one_of("silhouette", "wcss", "static"))
    bypass: bool = attrs.field(default=True, validator=boolean)
    # How MLQ's quotas meet the resources that bind (docs/scheduling.md, "MLQ at the knee"). The
    # paper's literal rule: quota_charge="upfront", work_conserving=False, seat_shares=False.
    # "held" (ours): a running request counts what it holds plus its predicted remainder, and an
    # adapter once per queue, recomputed every iteration.
    quota_charge: str = attrs.field(default="held", validator=one_of("upfront", "held"))
    work_conserving: bool = attrs.field(default=True, validator=boolean)  # ours: phase 3, FIFO
    seat_shares: bool = attrs.field(default=True, validator=boolean)  # ours: quotas share seats too
    # Ours (docs/scheduling.md, "MLQ and the TTFT SLO"): a request waiting longer than
    # urgent_fraction x slo_ttft_s is offered before the quotas, oldest first (None: never);
    # under `triage` a request that already missed the SLO is offered after every request that can
    # still meet it, while such misses stay within `triage_budget` of the recent arrivals.
    urgent_fraction: float | None = attrs.field(default=0.2, validator=attrs.validators.optional(unit_interval))  # type: ignore[arg-type]
    triage: bool = attrs.field(default=True, validator=boolean)
    triage_budget: float = attrs.field(default=0.01, validator=unit_interval)
    wrs_window: int = attrs.field(default=1024, validator=positive_int)  # recent WRS values clustered
    min_cluster_samples: int = attrs.field(default=DEFAULT_MIN_SAMPLES, validator=int_at_least(2))
    min_silhouette: float = attrs.field(
        default=DEFAULT_MIN_SILHOUETTE, validator=number(lambda v: -1.0 <= v <= 1.0, "in [-1, 1]")
    )
    rate_window_s: float = attrs.field(default=60.0, validator=positive)  # lambda, D and S window
    min_rate_span_s: float = attrs.field(default=1.0, validator=positive)
    default_service_s: float = attrs.field(default=1.0, validator=positive)  # D before any finish
    input_weight: float = attrs.field(default=0.4, validator=number(lambda v: v >= 0 and v < float("inf"), ">= 0"))
    output_weight: float = attrs.field(default=0.6, validator=number(lambda v: v >= 0 and v < float("inf"), ">= 0"))
    # S-LoRA's own admission (`slora-exact`, sched/slora.py; sources in docs/scheduling.md).
    slora_max_wait_tokens: int = attrs.field(default=10, validator=int_at_least(0))  # S-LoRA: 10
    slora_whole_prompt: bool = attrs.field(default=True, validator=boolean)
    slora_reserve_output: bool = attrs.field(default=True, validator=boolean)
    # FastServe skip-join MLFQ.
    mlfq_levels: int = attrs.field(default=6, validator=positive_int)
    mlfq_base_quantum_s: float = attrs.field(default=0.05, validator=positive)  # level i: base * 2**i
    mlfq_promote_after_s: float = attrs.field(default=0.3, validator=positive)  # alpha: 300 ms

    def __attrs_post_init__(self) -> None:
        if self.k_max > 8:
            raise ConfigError(f"SchedulerOptions.k_max must be in 1..8, got {self.k_max}")
        if self.input_weight + self.output_weight <= 0:
            raise ConfigError("SchedulerOptions.input_weight + output_weight must be > 0")

    def fit_layout(self, values: Sequence[float]) -> QueueLayout:
        """Queue layout for recent WRS values under these options' K rule."""
        return QueueLayout.fit(
            values,
            k_max=self.k_max,
            min_samples=self.min_cluster_samples,
            min_silhouette=self.min_silhouette,
            k_rule=self.k_rule,
        )

    def estimator(self, start_s: float) -> ArrivalRateEstimator:
        """A per-queue load estimator with these options' window, started at clock value `start_s`."""
        return ArrivalRateEstimator(
            start_s=start_s,
            window_s=self.rate_window_s,
            min_span_s=self.min_rate_span_s,
            default_service_s=self.default_service_s,
        )
