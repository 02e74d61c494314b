"""Scheduling policies, one per file behind the `AdmissionPolicy` protocol (see `base.py`)."""

from __future__ import annotations

from chameleon.sched.fifo import FifoPolicy
from chameleon.sched.options import SchedulerOptions
from chameleon.sched.policy import AdmissionPolicy, PolicyBase, SchedulingView
from chameleon.sched.predictors import OutputLengthPredictor, make_predictor

SCHEDULERS = ("chameleon", "fifo", "sjf", "mlfq")


def make_policy(name: str, options: SchedulerOptions | None = None) -> AdmissionPolicy:
    options = options or SchedulerOptions()
    if name == "fifo":
        return FifoPolicy()
    predictor = _predictor(options)
    if name == "sjf":
        from chameleon.sched.sjf import SjfPolicy

        return SjfPolicy(predictor)
    if name == "chameleon":
        from chameleon.sched.mlq.policy import MLQPolicy

        return MLQPolicy(predictor, options)
    if name == "mlfq":
        from chameleon.sched.mlfq import MLFQPolicy

        return MLFQPolicy(options)
    raise ValueError(f"unknown scheduler {name!r}; choose from {SCHEDULERS}")


def _predictor(options: SchedulerOptions) -> OutputLengthPredictor:
    if options.predictor == "noisy-oracle":
        return make_predictor("noisy-oracle", accuracy=options.predictor_accuracy, seed=options.seed)
    return make_predictor(options.predictor)


__all__ = ["SCHEDULERS", "AdmissionPolicy", "FifoPolicy", "PolicyBase", "SchedulerOptions", "SchedulingView", "make_policy"]
