"""`chameleon calibrate`: measure the real engine on this machine and write a `CostProfile`.

Every rule and its reason: `docs/simulator.md` (Calibration against the real engine).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from chameleon.clock import MonotonicClock
from chameleon.config import EngineConfig
from chameleon.engine.core import EngineCore
from chameleon.executor.base import StepInput
from chameleon.harness.driver import PROMPT_TOKEN_ID, run_workload, warm_up
from chameleon.harness.workload import Workload, WorkloadRequest
from chameleon.outputs import RequestOutput
from chameleon.sampling_params import SamplingParams
from chameleon.sim.executor import batch_shape
from chameleon.sim.profile import CostProfile, ProfileEngine, fit_nonnegative
from chameleon.sim.shape import BatchShape

__all__ = ["StepSample", "add_calibrate_arguments", "calibrate", "run_calibrate", "write_synthetic_peft_adapter"]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)


# ------------------------------------------------------------------------------------------------
# In-situ step logging
# ------------------------------------------------------------------------------------------------


@attrs.frozen
class StepSample:
    shape: BatchShape
    step_s: float  # EngineCore.step() wall time
    driver_s: float  # driver time since the previous step, when the engine stayed busy (else 0)

    @property
    def cost_s(self) -> float:
        return self.step_s + self.driver_s


class _LoggedCore:
    """What `run_workload` needs of a core, with every step that ran a batch logged."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.last: BatchShape | None = None  # the shape of the batch the last step executed
        core.observe_steps(self._observe)
        self.samples: list[StepSample] = []
        self._last_end: float | None = None  # None: the engine was idle after the previous step

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)

    def _observe(self, step: StepInput) -> None:
        self.last = batch_shape(step, {})  # LoRA is measured separately: ranks do not matter here

    def step(self) -> list[RequestOutput]:
        self.last = None
        start = time.perf_counter()
        outputs = self.core.step()
        end = time.perf_counter()
        if self.last is not None:
            driver = 0.0 if self._last_end is None else start - self._last_end
            self.samples.append(StepSample(self.last, end - start, driver))
        self._last_end = end if self.core.has_unfinished_requests() else None
        return outputs

    def detach(self) -> None:
        self.core.observe_steps(None)


def _calibration_workload(
    rng: np.random.Generator, n: int, rate: float | None, max_prompt_len: int, output_range: tuple[int, int], tag: str
) -> Workload:
    """`n` base-model requests, Poisson at `rate` (all at 0 when None), uniform lengths."""
    gaps = np.zeros(n) if rate is None else rng.exponential(1.0 / rate, n)
    arrivals = np.cumsum(gaps)
    prompts = rng.integers(1, max_prompt_len + 1, n)
    outputs = rng.integers(output_range[0], output_range[1] + 1, n)
    requests = [
        WorkloadRequest(f"__cal_{tag}_{i}__", float(t), int(p), int(o), None)
        for i, (t, p, o) in enumerate(zip(arrivals, prompts, outputs, strict=True))
    ]
    return Workload(requests, (), f"calibration {tag}")


def _fit_steps(samples: Sequence[StepSample]) -> tuple[dict[str, float], list[float]]:
    """Fit the unified step-cost form; returns the profile's fields and the sorted measured /
    fitted ratios of the steps."""
    has_prefill = [1.0 if s.shape.prefill_seqs else 0.0 for s in samples]
    columns: list[list[float]] = [
        [1.0] * len(samples),
        has_prefill,
        [s.shape.prefill_tokens for s in samples],
        [s.shape.prefill_attention_pairs for s in samples],
        [s.shape.num_seqs for s in samples],
        [s.shape.decode_context_tokens for s in samples],
    ]
    c0, c1, b, q, d, e = fit_nonnegative(columns, [s.cost_s for s in samples], relative=True)
    fields = dict(
        prefill_a_s=c0 + c1 + d,
        prefill_b_s_per_token=b,
        prefill_q_s_per_pair=q,
        decode_c_s=c0,
        decode_d_s_per_seq=d,
        decode_e_s_per_ctx_token=e,
    )
    model = CostProfile(**fields)  # type: ignore[arg-type]  # all six are float fields
    ratios = sorted(s.cost_s / p for s in samples if (p := model.iteration_s(s.shape)) > 0)
    return fields, ratios


def _winsorized(sorted_values: Sequence[float], tail: float) -> list[float]:
    """Clamp a sorted sample to its `tail` and 1 − `tail` quantiles. A step slowed several-fold by
    another process or an OS hiccup is an event of that moment, not of the engine: unclamped, it
    would be replayed in every simulated run."""
    n = len(sorted_values)
    if n < 3:
        return list(sorted_values)
    lo, hi = sorted_values[int(tail * (n - 1))], sorted_values[int((1 - tail) * (n - 1))]
    return [min(max(v, lo), hi) for v in sorted_values]


def _order_statistics(sorted_values: Sequence[float], k: int) -> tuple[float, ...]:
    """At most `k` evenly spaced order statistics of a sorted sample (all of it when smaller)."""
    n = len(sorted_values)
    if n <= k:
        return tuple(sorted_values)
    return tuple(sorted_values[round(i * (n - 1) / (k - 1))] for i in range(k))


def _median_of(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def calibrate(
    model_dir: str | os.PathLike[str],
    *,
    out_path: str | os.PathLike[str] | None = None,
    config: EngineConfig | None = None,
    burst: int = 32,
    load_fractions: Sequence[float] = (0.3, 0.6, 0.9),
    requests_per_run: int = 40,
    max_prompt_len: int | None = None,
    output_range: tuple[int, int] = (4, 64),
    seed: int = 1234,
    lora_rank: int | None = 16,
    repeats: int = 5,
    variability: bool = False,
    log: Callable[[str], None] | None = None,
) -> CostProfile:
    """Profile the real executor for `model_dir` (with `config`) and return (and write) a profile.

    See the module docstring for the method. `max_prompt_len` defaults to the smaller of 512,
    half the context and the batch token budget. `lora_rank=None` skips the LoRA and load
    measurements (the profile then charges nothing for LoRA and loads adapters instantly).
    """
    from chameleon.engine.factory import build_core

    say = log or (lambda _msg: None)
    config = config or EngineConfig(scheduler="fifo", adapter_cache="lru")
    # Step costs per computed token: repeated probe prompts must not hit a prefix cache (the
    # simulator runs the real block manager, so prefix reuse is modelled there, not in the costs).
    config = attrs.evolve(config, enable_prefix_caching=False)
    core = build_core(model_dir, config, clock=MonotonicClock())
    warm_up(core)
    limits = core.limits
    plen = max_prompt_len or min(512, limits.max_model_len // 2, config.max_num_batched_tokens)
    outs = (output_range[0], min(output_range[1], limits.max_model_len - plen - 1))
    rng = np.random.default_rng(seed)
    logged = _LoggedCore(core)
    try:
        wl = _calibration_workload(rng, burst, None, plen, outs, "burst")
        start = time.perf_counter()
        run_workload(logged, wl, core.clock)  # type: ignore[arg-type]
        capacity = burst / (time.perf_counter() - start)
        say(f"capacity: {capacity:.1f} requests/s (a burst of {burst}, prompts <= {plen}, outputs {outs})")
        for fraction in load_fractions:
            wl = _calibration_workload(rng, requests_per_run, fraction * capacity, plen, outs, f"{fraction:g}")
            say(f"open-loop run at {fraction:.0%} of capacity ({fraction * capacity:.1f} requests/s)")
            run_workload(logged, wl, core.clock)  # type: ignore[arg-type]
    finally:
        logged.detach()
    fields, ratios = _fit_steps(logged.samples)
    residuals = [1.0 / r - 1.0 for r in ratios]  # predicted / measured − 1
    say(f"fitted {len(logged.samples)} steps: median |error| {statistics.median(abs(r) for r in residuals):.1%}")
    lora: dict[str, Any] = {}
    if lora_rank is not None:
        lora = _measure_lora(core, _Prober(core), lora_rank, (16, plen), repeats, say)
    ex = core.executor
    engine = ProfileEngine(
        num_kv_blocks=ex.num_kv_blocks,
        block_size=ex.block_size,
        kv_block_bytes=ex.kv_block_bytes,
        adapter_row_bytes=ex.adapter_row_bytes,
        adapter_pool_rows=ex.adapter_pool_rows,
        max_model_len=limits.max_model_len,
        vocab_size=limits.vocab_size,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
    )
    abs_res = sorted(abs(r) for r in residuals)
    meta = {
        "model_dir": str(model_dir),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "device": str(getattr(ex, "device", "?")),
        "dtype": str(getattr(ex, "dtype", "?")),
        "threads": _torch_threads(),
        "method": "in-situ step regression (see chameleon.harness.calibrate)",
        "capacity_rps": capacity,
        "steps_fitted": len(logged.samples),
        "step_fit_abs_rel_error_p50": abs_res[len(abs_res) // 2] if abs_res else None,
        "step_fit_abs_rel_error_p90": abs_res[int(len(abs_res) * 0.9)] if abs_res else None,
        "step_time_ratio_p10_p50_p90": [ratios[int(q * (len(ratios) - 1))] for q in (0.1, 0.5, 0.9)]
        if ratios
        else None,
        "calibration_workload": {"max_prompt_len": plen, "output_range": list(outs), "seed": seed},
        **{k: v for k, v in lora.items() if k.startswith("lora_")},
    }
    profile = CostProfile(
        **fields,
        lora_s_per_token_rank=lora.get("f", 0.0),
        lora_s_per_adapter=lora.get("g", 0.0),
        load_Bps=lora.get("load_Bps", float("inf")),
        step_time_ratios=_order_statistics(_winsorized(ratios, 0.01), 512) if variability else (),
        engine=engine,
        meta=meta,
    )
    if out_path is not None:
        profile.to_json(out_path)
        say(f"wrote {out_path}")
    return profile


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


class _Prober:
    """Submits one probe request at a time and times the step that prefills it."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._n = 0

    def prefill_s(self, tokens: int, adapter: str | None = None) -> float:
        self._n += 1
        rid = f"__calibrate_{self._n}__"
        self.core.add_request(rid, [PROMPT_TOKEN_ID] * tokens, _greedy(1), adapter=adapter)
        elapsed = _timed(self.core.step)
        while self.core.has_request(rid):
            self.core.step()
        return elapsed


def write_synthetic_peft_adapter(
    path: str | os.PathLike[str],
    *,
    rank: int,
    num_layers: int,
    module_shapes: dict[str, tuple[int, int]],
    targets: Sequence[str] = LORA_TARGETS,
    seed: int = 0,
) -> Path:
    """A random PEFT LoRA adapter directory (config + safetensors) for a Llama-family base."""
    import torch
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for module in targets:
            parent = "self_attn" if module in LORA_TARGETS else "mlp"
            d_in, d_out = module_shapes[module]
            key = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.01
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(targets), "bias": "none"}
    (out / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


def _measure_lora(
    core: EngineCore, probe: _Prober, rank: int, tokens: Sequence[int], repeats: int, say: Callable[[str], None]
) -> dict[str, Any]:
    ex = core.executor
    base = getattr(ex, "base_spec", None)
    if base is None:
        say("this executor exposes no base-model shapes: LoRA and load bandwidth not measured")
        return {}
    name = "__calibrate_lora__"
    with tempfile.TemporaryDirectory(prefix="chameleon-calibrate-") as tmp:
        path = write_synthetic_peft_adapter(
            Path(tmp) / name, rank=rank, num_layers=base.num_layers, module_shapes=dict(base.module_shapes)
        )
        info = core.add_adapter(name, str(path))
    # Load bandwidth: the executor's copy into the device pool, timed directly (row 0; the cache
    # is not told, and the pool copy is evicted again afterwards).
    ex.load_adapter(name, 0)  # first load allocates the pool: not a copy cost
    load_s = _median_of(lambda: _timed(lambda: ex.load_adapter(name, 0)), repeats)
    ex.evict_adapter(name)
    say(f"adapter load: {info.device_bytes} bytes in {load_s * 1e3:.3f} ms")
    # LoRA compute: prefill with and without the adapter at two lengths, interleaved.
    short, long_ = tokens[0], tokens[-1]
    # First use: the cache loads it and ("lru", the calibration config's cache) keeps it resident,
    # so the timed steps below pay no load.
    probe.prefill_s(short, adapter=name)
    extra = {}
    for t in (short, long_):
        diffs = [probe.prefill_s(t, adapter=name) - probe.prefill_s(t) for _ in range(repeats)]
        extra[t] = max(0.0, statistics.median(diffs))
    say(f"LoRA rank {rank}: +{extra[short] * 1e3:.3f} ms at {short} tokens, +{extra[long_] * 1e3:.3f} ms at {long_}")
    f, g = fit_nonnegative([[t * rank for t in extra], [1.0] * len(extra)], list(extra.values()))
    return {
        "f": f,
        "g": g,
        "load_Bps": info.device_bytes / load_s if load_s > 0 else float("inf"),
        "lora_extra_measured": [[t, s] for t, s in extra.items()],
        "lora_load_measured": [info.device_bytes, load_s],
        "lora_rank": rank,
    }


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a local Hugging Face model directory")
    parser.add_argument("--out", type=Path, default=Path("profile.json"), help="where to write the profile")
    parser.add_argument("--repeats", type=int, default=5, help="LoRA / load measurements per point (median kept)")
    parser.add_argument("--requests-per-run", type=int, default=40, help="requests of each calibration run")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the calibration workload")
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads on CPU")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the synthetic adapter (0: skip LoRA)")
    parser.add_argument(
        "--variability",
        action="store_true",
        help="store the measured spread of step times; the simulator then draws from it (see the module docs)",
    )


def run_calibrate(args: argparse.Namespace) -> int:
    from chameleon.errors import ChameleonError

    extra = {
        k: v
        for k, v in (("max_num_seqs", args.max_num_seqs), ("max_num_batched_tokens", args.max_num_batched_tokens))
        if v
    }
    try:
        config = EngineConfig(
            device=args.device,
            dtype=args.dtype,
            num_threads=args.num_threads,
            max_model_len=args.max_model_len,
            scheduler="fifo",  # step cost is measured on batches we compose; the policy is irrelevant
            adapter_cache="lru",  # keeps the probe adapter resident between the timed steps
            max_lora_rank=max(64, args.lora_rank or 0),
            **extra,
        )
        profile = calibrate(
            args.model,
            out_path=args.out,
            config=config,
            repeats=args.repeats,
            requests_per_run=args.requests_per_run,
            seed=args.seed,
            lora_rank=args.lora_rank or None,
            variability=args.variability,
            log=lambda msg: print(msg, flush=True),
        )
    except (ChameleonError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    p = profile
    print(
        f"prefill: {p.prefill_a_s * 1e3:.3f} ms + {p.prefill_b_s_per_token * 1e6:.3f} µs/token "
        f"+ {p.prefill_q_s_per_pair * 1e9:.3f} ns/pair\n"
        f"decode:  {p.decode_c_s * 1e3:.3f} ms + {p.decode_d_s_per_seq * 1e6:.1f} µs/seq "
        f"+ {p.decode_e_s_per_ctx_token * 1e9:.3f} ns/context token\n"
        f"LoRA:    {p.lora_s_per_token_rank * 1e9:.3f} ns per token·rank "
        f"+ {p.lora_s_per_adapter * 1e6:.1f} µs per adapter\n"
        f"load:    {p.load_Bps / 1e9:.2f} GB/s"
    )
    return 0
