"""The workloads `chameleon bench` builds from its arguments, clipping, and binding to real adapters."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import attrs

from chameleon.harness.workload import (
    PAPER_RANKS,
    AdapterSpec,
    Workload,
    paper_workload,
    slora_adapters,
    slora_workload,
    trace_workload,
)

__all__ = ["bind_adapters", "clip_lengths", "make_workload"]



def make_workload(args: argparse.Namespace, rate: float) -> Workload:
    n = args.adapters
    if args.workload == "paper":
        if n is not None and (n <= 0 or n % len(PAPER_RANKS)):
            raise ValueError(f"--workload paper needs --adapters a positive multiple of {len(PAPER_RANKS)}, got {n}")
        per_rank = 20 if n is None else n // len(PAPER_RANKS)
        return paper_workload(
            rate=rate, duration_s=args.duration, seed=args.seed, trace=args.trace, alpha=args.alpha, per_rank=per_rank
        )
    if args.workload == "slora":
        return slora_workload(
            num_adapters=100 if n is None else n,
            alpha=args.alpha,
            rate=rate,
            cv=args.cv,
            duration_s=args.duration,
            input_range=args.input_range,
            output_range=args.output_range,
            seed=args.seed,
        )
    adapters: Sequence[AdapterSpec] | None = None if n is None else slora_adapters(n, PAPER_RANKS)
    return trace_workload(
        args.trace, rate=rate, duration_s=args.duration, adapters=adapters, alpha=args.alpha, seed=args.seed
    )


def clip_lengths(workload: Workload, max_prompt_len: int | None, max_output_len: int | None) -> Workload:
    """Clip prompt / output lengths (arrivals untouched)."""

    def clip(value: int, limit: int | None) -> int:
        return value if limit is None else max(1, min(value, limit))

    requests = [
        attrs.evolve(r, prompt_len=clip(r.prompt_len, max_prompt_len), output_len=clip(r.output_len, max_output_len))
        for r in workload.requests
    ]
    return attrs.evolve(workload, requests=requests)


def bind_adapters(workload: Workload, real: Sequence[AdapterSpec]) -> Workload:
    """Rename the workload's adapters onto `real` ones, in order, cycling (real runs only)."""
    if not workload.adapters:
        return workload
    mapping = {a.name: real[i % len(real)].name for i, a in enumerate(workload.adapters)}
    requests = [attrs.evolve(r, adapter=None if r.adapter is None else mapping[r.adapter]) for r in workload.requests]
    used = {mapping[a.name] for a in workload.adapters}
    return Workload(
        requests, [a for a in real if a.name in used], workload.description + " (adapters bound to real ones)"
    )
