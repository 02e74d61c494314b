"""Scheduling policies, one per file behind the `AdmissionPolicy` protocol (see `base.py`)."""

from __future__ import annotations

from chameleon.sched.fifo import FifoPolicy
from chameleon.sched.options import SchedulerOptions
from chameleon.sched.policy import AdmissionPolicy, PolicyBase, SchedulingView
from chameleon.sched.predictors import OutputLengthPredictor, make_predictor

SCHEDULERS = ("chameleon", "fifo", "sjf", "mlfq", "slora-exact", "chameleon-static", "chameleon-k4")


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
    if name in ("chameleon", "chameleon-static", "chameleon-k4"):
        import attrs

        from chameleon.sched.mlq.policy import MLQPolicy

        rule = {"chameleon-static": "static", "chameleon-k4": "wcss"}.get(name)
        return MLQPolicy(predictor, options if rule is None else attrs.evolve(options, k_rule=rule))
    if name == "mlfq":
        from chameleon.sched.mlfq import MLFQPolicy

        return MLFQPolicy(options)
    raise ValueError(f"unknown scheduler {name!r}; choose from {SCHEDULERS}")


def _predictor(options: SchedulerOptions) -> OutputLengthPredictor:
    if options.predictor == "noisy-oracle":
        return make_predictor("noisy-oracle", accuracy=options.predictor_accuracy, seed=options.seed)
    return make_predictor(options.predictor)


__all__ = ["SCHEDULERS", "AdmissionPolicy", "FifoPolicy", "PolicyBase", "SchedulerOptions", "SchedulingView", "make_policy"]
