"""Scheduling policies. Each one lives in its own file behind the `AdmissionPolicy` protocol."""

from chameleon.policies.base import AdmissionPolicy
from chameleon.policies.fifo import FifoPolicy


def make_policy(name: str) -> AdmissionPolicy:
    if name == "fifo":
        return FifoPolicy()
    raise ValueError(f"unknown scheduler policy {name!r}")


__all__ = ["AdmissionPolicy", "FifoPolicy", "make_policy"]
