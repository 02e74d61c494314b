"""Workloads: who asks for what, when. Pure values and seeded generators (numpy only).

S-LoRA's synthetic generator, the paper's setup and trace replay; every rule (arrivals, lengths,
adapter popularity, clipping): `docs/workloads.md`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

import attrs
import numpy as np

from chameleon.harness.traces import TraceRow, load_trace, trace_label

__all__ = [
    "PAPER_RANKS",
    "AdapterSpec",
    "Workload",
    "WorkloadRequest",
    "paper_adapters",
    "paper_workload",
    "scale_length",
    "scale_lengths",
    "slora_adapter_pmf",
    "slora_adapters",
    "slora_workload",
    "trace_workload",
    "with_system_prompts",
    "zipf_pmf",
]

PAPER_RANKS: tuple[int, ...] = (8, 16, 32, 64, 128)
PAPER_ADAPTERS_PER_RANK = 20
SLORA_RANKS: tuple[int, ...] = (64, 32, 16, 8)  # S-LoRA's "S2" model setting, in its order


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@attrs.frozen
class WorkloadRequest:
    request_id: str
    arrival_s: float  # seconds from the start of the run
    prompt_len: int
    output_len: int  # tokens to generate (the "true" length; simulators and oracles use it)
    adapter: str | None  # None = base model
    # A shared prefix (a chat system prompt): the first `prefix_len` prompt tokens are the same for
    # every request with this `prefix_id` (the driver derives them from the id); the rest are its own.
    prefix_id: str | None = None
    prefix_len: int = 0


@attrs.frozen
class AdapterSpec:
    name: str
    rank: int


def _request_tuple(values: Iterable[WorkloadRequest]) -> tuple[WorkloadRequest, ...]:
    return tuple(values)


def _adapter_tuple(values: Iterable[AdapterSpec]) -> tuple[AdapterSpec, ...]:
    return tuple(values)


@attrs.frozen
class Workload:
    requests: tuple[WorkloadRequest, ...] = attrs.field(converter=_request_tuple)  # sorted by arrival
    adapters: tuple[AdapterSpec, ...] = attrs.field(converter=_adapter_tuple)
    description: str = ""

    def __attrs_post_init__(self) -> None:
        _check_workload(self.requests, self.adapters)

    def __len__(self) -> int:
        return len(self.requests)

    def duration_s(self) -> float:
        """Arrival time of the last request (the run starts at 0); 0.0 when empty."""
        return self.requests[-1].arrival_s if self.requests else 0.0

    def rate(self) -> float:
        """Mean arrival rate = 1 / mean inter-arrival gap = (n-1) / (last - first arrival).

        0.0 with fewer than two requests; inf if they all arrive at once.
        """
        if len(self.requests) < 2:
            return 0.0
        span = self.requests[-1].arrival_s - self.requests[0].arrival_s
        return math.inf if span <= 0 else (len(self.requests) - 1) / span

    def adapter_ranks(self) -> dict[str, int]:
        return {a.name: a.rank for a in self.adapters}

    def to_jsonl(self, path: str | os.PathLike[str]) -> None:
        """One header line (description, adapters) then one line per request."""
        with open(path, "w", encoding="utf-8") as f:
            self.write_jsonl(f)

    def write_jsonl(self, f: TextIO) -> None:
        header = {
            "type": "chameleon.harness.workload",
            "version": 1,
            "description": self.description,
            "adapters": [attrs.asdict(a) for a in self.adapters],
        }
        f.write(json.dumps(header) + "\n")
        for r in self.requests:  # json writes floats with repr: they round-trip exactly
            f.write(json.dumps(attrs.asdict(r)) + "\n")

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str]) -> Workload:
        with open(path, encoding="utf-8") as f:
            return cls.read_jsonl(f)

    @classmethod
    def read_jsonl(cls, f: TextIO) -> Workload:
        lines = [line for line in f if line.strip()]
        if not lines:
            raise ValueError("empty workload file")
        header = json.loads(lines[0])
        if header.get("type") != "chameleon.harness.workload":
            raise ValueError("not a chameleon workload file (bad header line)")
        adapters = [AdapterSpec(name=a["name"], rank=int(a["rank"])) for a in header["adapters"]]
        requests = [_request_from_dict(json.loads(line)) for line in lines[1:]]
        return cls(requests=requests, adapters=adapters, description=header.get("description", ""))


def _request_from_dict(d: dict[str, Any]) -> WorkloadRequest:
    return WorkloadRequest(
        request_id=str(d["request_id"]),
        arrival_s=float(d["arrival_s"]),
        prompt_len=int(d["prompt_len"]),
        output_len=int(d["output_len"]),
        adapter=d["adapter"],
        prefix_id=d.get("prefix_id"),
        prefix_len=int(d.get("prefix_len", 0)),
    )


def _check_workload(requests: tuple[WorkloadRequest, ...], adapters: tuple[AdapterSpec, ...]) -> None:
    names = {a.name for a in adapters}
    if len(names) != len(adapters):
        raise ValueError("adapter names must be unique")
    if len({r.request_id for r in requests}) != len(requests):
        raise ValueError("request ids must be unique")
    prev = -math.inf
    for r in requests:
        if r.arrival_s < prev:
            raise ValueError(f"requests must be sorted by arrival (at {r.request_id})")
        if r.adapter is not None and r.adapter not in names:
            raise ValueError(f"request {r.request_id} uses unknown adapter {r.adapter!r}")
        if not 0 <= r.prefix_len < r.prompt_len or (r.prefix_len > 0) != (r.prefix_id is not None):
            raise ValueError(f"request {r.request_id}: a prefix needs an id and 0 < prefix_len < prompt_len")
        prev = r.arrival_s


# --------------------------------------------------------------------------------------------
# Popularity laws
# --------------------------------------------------------------------------------------------


def slora_adapter_pmf(num_adapters: int, alpha: float) -> np.ndarray:
    """S-LoRA's law: P(i) = ((i+1)/N)**alpha - (i/N)**alpha (alpha = 1 is uniform)."""
    _check_alpha(alpha)
    if num_adapters < 1:
        raise ValueError("need at least one adapter")
    edges = (np.arange(num_adapters + 1, dtype=np.float64) / num_adapters) ** alpha
    return np.diff(edges)


def zipf_pmf(n: int, alpha: float) -> np.ndarray:
    """Zipf: P(i) ∝ (i+1)**(-alpha), i = 0..n-1 (alpha = 0 is uniform)."""
    if alpha < 0:
        raise ValueError("alpha must be >= 0")
    weights = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    return weights / weights.sum()


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ValueError("S-LoRA's power law needs alpha > 0")


# --------------------------------------------------------------------------------------------
# S-LoRA's synthetic generator
# --------------------------------------------------------------------------------------------


def slora_workload(
    *,
    num_adapters: int,
    alpha: float,
    rate: float,
    cv: float,
    duration_s: float,
    input_range: tuple[int, int] = (8, 512),
    output_range: tuple[int, int] = (8, 512),
    ranks: Sequence[int] = SLORA_RANKS,
    seed: int,
) -> Workload:
    """S-LoRA's `generate_requests` (see the module docstring for the exact semantics)."""
    _check_positive(rate=rate, cv=cv, duration_s=duration_s)
    _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    n = _count(rate, duration_s)
    x = rng.power(alpha, n)
    ids = np.minimum((x * max(num_adapters, 1)).astype(np.int64), max(num_adapters - 1, 0))
    prompt = rng.integers(input_range[0], input_range[1], n)  # [lo, hi), as numpy randint
    output = rng.integers(output_range[0], output_range[1], n)
    gaps = rng.gamma(1.0 / (cv * cv), cv * cv / rate, n)
    adapters = slora_adapters(num_adapters, ranks)
    names: list[str | None] = [a.name for a in adapters] if adapters else [None]
    chosen = [names[i] for i in ids]
    desc = (
        f"slora(num_adapters={num_adapters}, alpha={alpha}, rate={rate}, cv={cv}, duration_s={duration_s}, "
        f"input_range={tuple(input_range)}, output_range={tuple(output_range)}, ranks={tuple(ranks)}, seed={seed})"
    )
    return _build(np.cumsum(gaps), prompt, output, chosen, adapters, desc)


def slora_adapters(num_adapters: int, ranks: Sequence[int] = SLORA_RANKS) -> tuple[AdapterSpec, ...]:
    """Adapter i has rank `ranks[i % len(ranks)]` (S-LoRA cycles its list); named `a{i:03d}-r{rank}`."""
    return tuple(AdapterSpec(f"a{i:03d}-r{ranks[i % len(ranks)]}", ranks[i % len(ranks)]) for i in range(num_adapters))


def _count(rate: float, duration_s: float) -> int:
    """int(rate * duration_s), S-LoRA's request count, immune to round-off (2.3 * 100 -> 230, not 229)."""
    return int(rate * duration_s + 1e-9)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _build(
    arrivals: np.ndarray,
    prompt: np.ndarray,
    output: np.ndarray,
    adapter_names: Sequence[str | None],
    adapters: Sequence[AdapterSpec],
    description: str,
) -> Workload:
    requests = [
        WorkloadRequest(f"req-{i:06d}", float(arrivals[i]), int(prompt[i]), int(output[i]), adapter_names[i])
        for i in range(len(arrivals))
    ]
    return Workload(requests=requests, adapters=adapters, description=description)


# --------------------------------------------------------------------------------------------
# The Chameleon paper's setup
# --------------------------------------------------------------------------------------------


def paper_adapters(
    ranks: Sequence[int] = PAPER_RANKS, per_rank: int = PAPER_ADAPTERS_PER_RANK
) -> tuple[AdapterSpec, ...]:
    """The paper's adapter set: `per_rank` adapters of each rank, named `r{rank}-{j:02d}`."""
    return tuple(AdapterSpec(f"r{rank}-{j:02d}", rank) for rank in ranks for j in range(per_rank))


def _pick_paper_adapters(
    rng: np.random.Generator, n: int, alpha: float, num_ranks: int, per_rank: int
) -> np.ndarray:
    """Indices into `paper_adapters()`: a uniform rank, then Zipf(alpha) within the rank."""
    rank_idx = rng.integers(0, num_ranks, n)
    within = rng.choice(per_rank, size=n, p=zipf_pmf(per_rank, alpha))
    return rank_idx * per_rank + within


def _poisson_arrivals(rng: np.random.Generator, rate: float, duration_s: float) -> np.ndarray:
    """Arrival times of a Poisson process of intensity `rate` on [0, duration_s)."""
    expected = rate * duration_s
    chunk = int(expected + 6 * math.sqrt(expected) + 16)  # almost always enough in one draw
    times = np.cumsum(rng.exponential(1.0 / rate, chunk))
    while times[-1] < duration_s:
        more = np.cumsum(rng.exponential(1.0 / rate, chunk)) + times[-1]
        times = np.concatenate([times, more])
    return times[times < duration_s]


def paper_workload(
    *,
    rate: float,
    duration_s: float,
    seed: int,
    trace: str | os.PathLike[str] = "conv",
    alpha: float = 1.0,
    ranks: Sequence[int] = PAPER_RANKS,
    per_rank: int = PAPER_ADAPTERS_PER_RANK,
    max_prompt_len: int | None = None,
    max_output_len: int | None = None,
    length_scale: float = 1.0,
) -> Workload:
    """The Chameleon paper's workload (see the module docstring); lengths scaled by `length_scale`
    before clipping (paper §3.2, `docs/workloads.md`)."""
    _check_positive(rate=rate, duration_s=duration_s)
    rows = load_trace(trace)
    rng = np.random.default_rng(seed)
    arrivals = _poisson_arrivals(rng, rate, duration_s)
    n = len(arrivals)
    idx = _pick_paper_adapters(rng, n, alpha, len(ranks), per_rank)
    row_idx = rng.integers(0, len(rows), n)
    prompt, output = _lengths(rows, row_idx, max_prompt_len, max_output_len, length_scale)
    adapters = paper_adapters(ranks, per_rank)
    desc = (
        f"paper(rate={rate}, duration_s={duration_s}, seed={seed}, trace={trace_label(trace)}, alpha={alpha}, "
        f"ranks={tuple(ranks)}, per_rank={per_rank}, max_prompt_len={max_prompt_len}, max_output_len={max_output_len}"
        f"{_scale_desc(length_scale)})"
    )
    return _build(arrivals, prompt, output, [adapters[i].name for i in idx], adapters, desc)


def scale_length(value: int, scale: float) -> int:
    """One length scaled by `scale`: `max(1, round(value * scale))` (round half to even)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"length scale must be a positive finite number, got {scale!r}")
    return max(1, int(round(value * scale)))


def scale_lengths(workload: Workload, scale: float) -> Workload:
    """Every prompt and output length scaled by `scale` (`scale_length`); arrivals untouched."""
    if scale == 1.0:
        return workload
    requests = [
        attrs.evolve(r, prompt_len=scale_length(r.prompt_len, scale), output_len=scale_length(r.output_len, scale))
        for r in workload.requests
    ]
    return attrs.evolve(workload, requests=requests, description=workload.description + _scale_desc(scale))


def with_system_prompts(workload: Workload, length: int) -> Workload:
    """Chat-style sharing: every request starts with its adapter's system prompt of `length` tokens
    (the base model's requests share one too). Prompt lengths are unchanged: the system prompt is
    the first `min(length, prompt_len - 1)` tokens, so every request keeps at least one of its own."""
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise ValueError(f"system prompt length must be an int >= 0, got {length!r}")
    if length == 0:
        return workload
    requests = [
        attrs.evolve(r, prefix_id=f"system:{r.adapter or '<base>'}", prefix_len=min(length, r.prompt_len - 1))
        if r.prompt_len > 1
        else r
        for r in workload.requests
    ]
    return attrs.evolve(workload, requests=requests, description=f"{workload.description}, system_prompt_len={length}")


def _scale_desc(scale: float) -> str:
    return "" if scale == 1.0 else f", length_scale={scale:.4g}"


def _lengths(
    rows: Sequence[TraceRow],
    idx: np.ndarray,
    max_prompt: int | None,
    max_output: int | None,
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Trace lengths of rows `idx`, scaled by `scale`, zero clamped to 1 and optionally clipped."""
    prompt = np.array([rows[i].context_tokens for i in idx], dtype=np.int64)
    output = np.array([rows[i].generated_tokens for i in idx], dtype=np.int64)
    if scale != 1.0:
        scale_length(1, scale)  # validates
        prompt = np.rint(prompt * scale).astype(np.int64)
        output = np.rint(output * scale).astype(np.int64)
    prompt = np.maximum(prompt, 1)
    output = np.maximum(output, 1)
    if max_prompt is not None:
        prompt = np.minimum(prompt, max_prompt)
    if max_output is not None:
        output = np.minimum(output, max_output)
    return prompt, output


# --------------------------------------------------------------------------------------------
# Trace replay
# --------------------------------------------------------------------------------------------


def trace_workload(
    path_or_name: str | os.PathLike[str] = "conv",
    *,
    rate: float | None = None,
    duration_s: float | None = None,
    adapters: Sequence[AdapterSpec] | None = None,
    alpha: float = 1.0,
    base_fraction: float = 0.0,
    seed: int = 0,
    max_prompt_len: int | None = None,
    max_output_len: int | None = None,
    length_scale: float = 1.0,
) -> Workload:
    """Replay a trace's lengths (scaled by `length_scale`, then clipped) and (rescaled) arrival
    pattern (see the module docstring)."""
    if not 0.0 <= base_fraction <= 1.0:
        raise ValueError("base_fraction must be in [0, 1]")
    rows = sorted(load_trace(path_or_name), key=lambda r: r.timestamp_s)  # stable: ties keep file order
    if not rows:
        raise ValueError(f"trace {path_or_name!r} has no rows")
    offsets, row_idx = _replay_times(rows, rate, duration_s)
    prompt, output = _lengths(rows, row_idx, max_prompt_len, max_output_len, length_scale)
    rng = np.random.default_rng(seed)
    specs, names = _assign_adapters(rng, len(offsets), adapters, alpha, base_fraction)
    desc = (
        f"trace({trace_label(path_or_name)}, rate={rate}, duration_s={duration_s}, "
        f"adapters={'paper' if adapters is None else len(specs)}, alpha={alpha}, base_fraction={base_fraction}, "
        f"seed={seed}, max_prompt_len={max_prompt_len}, max_output_len={max_output_len}{_scale_desc(length_scale)})"
    )
    return _build(offsets, prompt, output, names, specs, desc)


def _replay_times(
    rows: Sequence[TraceRow], rate: float | None, duration_s: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """(arrival offsets, row index of each request) for the four rate/duration cases."""
    ts = np.array([r.timestamp_s for r in rows], dtype=np.float64)
    offsets = ts - ts[0]
    if rate is not None:
        _check_positive(rate=rate)
    if duration_s is not None:
        _check_positive(duration_s=duration_s)
    if rate is None and duration_s is None:
        return offsets, np.arange(len(rows))
    if rate is None:
        return _cyclic(offsets, lambda t: t < duration_s)
    if duration_s is None:
        return _rescale(offsets, rate), np.arange(len(rows))
    m = _count(rate, duration_s)
    times, idx = _cyclic(offsets, lambda t: np.arange(len(t)) < m)
    return (_rescale(times, rate) if m > 1 else times), idx


def _rescale(offsets: np.ndarray, rate: float) -> np.ndarray:
    """Stretch time by one factor so the mean gap is exactly 1/rate (first arrival stays at 0)."""
    span = float(offsets[-1] - offsets[0]) if len(offsets) >= 2 else 0.0
    if span <= 0:
        raise ValueError("cannot rescale a trace with fewer than two distinct timestamps")
    return (offsets - offsets[0]) * ((len(offsets) - 1) / span / rate)


def _cyclic(offsets: np.ndarray, keep: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The trace replayed cyclically, cut where `keep` (a prefix predicate on times) turns false."""
    n = len(offsets)
    span = float(offsets[-1])
    period = span + (span / (n - 1) if n > 1 else 0.0)
    if period <= 0:  # a single timestamp cannot be repeated in time: no cycling
        mask = keep(offsets)
        return offsets[mask], np.arange(n)[mask]
    copies = 1
    while bool(keep(np.concatenate([offsets + k * period for k in range(copies)]))[-1]):
        copies *= 2  # grow until the last request of the tiled trace is cut
    tiled = np.concatenate([offsets + k * period for k in range(copies)])
    mask = keep(tiled)
    return tiled[mask], np.tile(np.arange(n), copies)[mask]


def _assign_adapters(
    rng: np.random.Generator,
    n: int,
    adapters: Sequence[AdapterSpec] | None,
    alpha: float,
    base_fraction: float,
) -> tuple[tuple[AdapterSpec, ...], list[str | None]]:
    """Synthetic adapter ids: base-model coin first, then the popularity law."""
    is_base = rng.random(n) < base_fraction
    if adapters is None:
        specs = paper_adapters()
        idx = _pick_paper_adapters(rng, n, alpha, len(PAPER_RANKS), PAPER_ADAPTERS_PER_RANK)
    else:
        specs = tuple(adapters)
        if not specs:
            return specs, [None] * n
        idx = rng.choice(len(specs), size=n, p=zipf_pmf(len(specs), alpha))
    names = [None if base else specs[i].name for base, i in zip(is_base, idx, strict=True)]
    return specs, names
