"""The workloads `chameleon bench` builds from its arguments, clipping, binding to real adapters, and
the KV cache options (prefix caching, KV dtype, shared system prompts) with what they are measured by."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

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

__all__ = ["InFlight", "add_kv_arguments", "bind_adapters", "clip_lengths", "kv_config_fields", "make_workload"]


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
    """Clip prompt / output lengths (arrivals untouched); a shared prefix keeps one own token."""

    def clip(value: int, limit: int | None) -> int:
        return value if limit is None else max(1, min(value, limit))

    requests = []
    for r in workload.requests:
        prompt = clip(r.prompt_len, max_prompt_len)
        prefix = min(r.prefix_len, prompt - 1)
        requests.append(
            attrs.evolve(
                r,
                prompt_len=prompt,
                output_len=clip(r.output_len, max_output_len),
                prefix_len=prefix,
                prefix_id=r.prefix_id if prefix else None,
            )
        )
    return attrs.evolve(workload, requests=requests)


def add_kv_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("KV cache")
    g.add_argument(
        "--prefix-caching", choices=("on", "off"), default=None, help="prefix caching (default: the engine's default)"
    )
    g.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "int8", "fp8_e4m3"),
        default="auto",
        help="KV storage; int8/fp8 hold ~1.94x the fp16 blocks in the same memory (sim: bytes only, same costs)",
    )
    g.add_argument(
        "--system-prompt-len",
        type=int,
        default=0,
        help="chat-style sharing: each request's prompt starts with its adapter's system prompt of this many tokens",
    )


def kv_config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The `EngineConfig` fields the KV options set (none when they keep the defaults)."""
    fields: dict[str, Any] = {}
    if getattr(args, "prefix_caching", None) is not None:
        fields["enable_prefix_caching"] = args.prefix_caching == "on"
    if getattr(args, "kv_cache_dtype", "auto") != "auto":
        fields["kv_cache_dtype"] = args.kv_cache_dtype
    return fields


class InFlight:
    """`run_workload(on_step=...)`: requests running after each iteration (mean over iterations, peak)."""

    def __init__(self, core: Any, then: Any = None) -> None:
        self.core, self.then = core, then
        self.total = self.steps = self.peak = 0

    def __call__(self, t: float) -> None:
        running = len(self.core.scheduler.running)
        self.total += running
        self.steps += 1
        self.peak = max(self.peak, running)
        if self.then is not None:
            self.then(t)

    @property
    def mean(self) -> float | None:
        return self.total / self.steps if self.steps else None


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
