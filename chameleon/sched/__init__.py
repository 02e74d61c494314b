"""Scheduling policies, one per file behind the `AdmissionPolicy` protocol (see `base.py`)."""

from __future__ import annotations

from typing import Any, Literal, get_args

from chameleon.sched.fifo import FifoPolicy
from chameleon.sched.options import SchedulerOptions
from chameleon.sched.policy import AdmissionPolicy, PolicyBase, SchedulingView
from chameleon.sched.predictors import OutputLengthPredictor, make_predictor

SchedulerName = Literal[
    "chameleon",
    "fifo",
    "sjf",
    "mlfq",
    "slora-exact",
    "chameleon-static",
    "chameleon-k4",
    "chameleon-paper",
    "chameleon-noslo",
]
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)  # the one list: EngineConfig validates against it
_LITERAL = {"quota_charge": "upfront", "work_conserving": False, "seat_shares": False, "triage": False, "urgent_fraction": None}
#: MLQ variants by scheduler name: options they override (docs/scheduling.md).
MLQ_VARIANTS: dict[str, dict[str, object]] = {
    "chameleon": {},
    "chameleon-paper": _LITERAL,  # the paper's MLQ, read literally
    "chameleon-k4": {"k_rule": "wcss"},  # K by minimal WCSS, read literally (K = 4)
    "chameleon-static": {"k_rule": "static"},  # Ch-Static: 4 equal ranges, equal quotas
    "chameleon-noslo": {"triage": False, "urgent_fraction": None},  # ours without the SLO rules
}


def make_policy(name: str, options: SchedulerOptions | None = None) -> AdmissionPolicy:
    options = options or SchedulerOptions()
    if name == "fifo":
        return FifoPolicy()
    if name == "slora-exact":
        from chameleon.sched.slora import SLoRAPolicy

        return SLoRAPolicy(options)
    predictor = _predictor(options)
    if name == "sjf":
        from chameleon.sched.sjf import SjfPolicy

        return SjfPolicy(predictor)
    if name in MLQ_VARIANTS:
        import attrs

        from chameleon.sched.mlq.policy import MLQPolicy

        variant: dict[str, Any] = dict(MLQ_VARIANTS[name])
        return MLQPolicy(predictor, attrs.evolve(options, **variant))
    if name == "mlfq":
        from chameleon.sched.mlfq import MLFQPolicy

        return MLFQPolicy(options)
    raise ValueError(f"unknown scheduler {name!r}; choose from {SCHEDULERS}")


def _predictor(options: SchedulerOptions) -> OutputLengthPredictor:
    if options.predictor == "noisy-oracle":
        return make_predictor("noisy-oracle", accuracy=options.predictor_accuracy, seed=options.seed)
    return make_predictor(options.predictor)


__all__ = ["SCHEDULERS", "AdmissionPolicy", "FifoPolicy", "PolicyBase", "SchedulerName", "SchedulerOptions", "SchedulingView", "make_policy"]
