"""`chameleon bench`: run workloads against policies and rates, on a simulated GPU or the real engine.

For each policy (a scheduler + adapter-cache pair, `chameleon.harness.driver.POLICIES`) and each rate,
a fresh engine replays the same seeded workload open-loop (`run_workload`); the records are
summarised with `chameleon.harness.metrics.summarize`, the adapter hit rate comes from the engine's
statistics (hits / (hits + misses)). Throughput at SLO per policy is the highest rate whose P99
TTFT meets `--slo-ttft`: the given rates are scanned in order, then the gap between the last
passing and the first failing one is bisected `--refine-steps` times (`metrics.throughput_at_slo`).

Every output of a simulated run says so: the table's title, `"simulated": true` in the JSON and
every plot title. JSON numbers that are not finite (an overloaded run's P99 TTFT is +inf, an empty
one's NaN) are written as `null`, so the file is strict JSON.

Workloads (`--workload`): `paper` (the Chameleon setup: 100 adapters = ranks 8..128 × 20, uniform
rank, Zipf(alpha) within a rank, Poisson arrivals, lengths from the `--trace`), `slora` (S-LoRA's
generator: power-law(alpha) over `--adapters`, Gamma arrivals with `--cv`, uniform lengths), and
`trace` (the trace's own arrival pattern rescaled to the rate). Prompts longer than the model's
context are clipped to `max_model_len − 1` (`--max-prompt-len` clips further), outputs to
`--max-output-len` and to what the context leaves after the prompt. `--length-scale C` scales
prompt and output lengths by C before clipping; `--length-scale paper` derives C from the paper's
SLO rule on the simulated GPU (`chameleon.harness.length_factor`) and prints it. `--link` picks the
host->device link model; `--plots` adds a Fig. 6-style memory-over-time plot.

The real executor (`--executor real --model DIR`) runs the same driver on wall time (a warm-up
request first). Adapters there must be real PEFT adapters: `--adapter-dir DIR` holds one adapter per
subdirectory, and the workload's adapters are bound to them in order (cycling); without it only
base-model workloads (`--adapters 0`) can run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from chameleon.clock import Clock, MonotonicClock
from chameleon.config import EngineConfig
from chameleon.engine.core import EngineCore
from chameleon.errors import ChameleonError
from chameleon.harness.bench_workload import (
    InFlight,
    add_kv_arguments,
    bind_adapters,
    clip_lengths,
    kv_config_fields,
    make_workload,
)
from chameleon.harness.driver import POLICIES, run_workload, warm_up
from chameleon.harness.length_factor import PAPER, length_population, length_scale_arg, paper_length_scale
from chameleon.harness.metrics import RequestRecord, RunSummary, summarize, throughput_at_slo
from chameleon.harness.report import format_table, results_json, write_plots
from chameleon.harness.workload import AdapterSpec, Workload, scale_lengths, with_system_prompts
from chameleon.sched.options import SchedulerOptions
from chameleon.sim.analytic import A40_LLAMA7B_CALIBRATION, LINKS, AnalyticCostModel
from chameleon.sim.engine import build_sim_engine
from chameleon.sim.hardware import GPUS, MODELS, get_gpu, get_model
from chameleon.sim.profile import CostProfile

__all__ = ["add_bench_arguments", "main", "run_bench"]

SIM_LABEL = "SIMULATED"
MEMORY_SAMPLE_S = 1.0  # --plots: device memory sampled at most once per second of the run
REAL_LABEL = "REAL"


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _int_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got {text!r}") from None
    if not 1 <= lo < hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO < HI, got {text!r}")
    return lo, hi


def _policy_def(text: str) -> tuple[str, tuple[str, str]]:
    name, sep, rest = text.partition("=")
    scheduler, sep2, cache = rest.partition(":")
    if not (sep and sep2 and name and scheduler and cache):
        raise argparse.ArgumentTypeError(f"expected NAME=SCHEDULER:CACHE, got {text!r}")
    return name, (scheduler, cache)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The `chameleon bench` options (the CLI adds the subcommand, then calls `run_bench`)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--executor", choices=("sim", "real"), default="sim", help="simulated GPU or the real engine")
    g.add_argument("--gpu", default="A40", help=f"GPU preset for --executor sim: {', '.join(GPUS)}")
    g.add_argument(
        "--model",
        default=None,
        help=f"sim: a model preset ({', '.join(MODELS)}; default llama-7b); real: a model directory",
    )
    g.add_argument("--profile", type=Path, help="sim: a cost profile from `chameleon calibrate` instead of a preset")
    g.add_argument(
        "--link",
        choices=tuple(LINKS),
        default="bandwidth",
        help="sim: host->device link model (bandwidth: bytes / bandwidth; pageable: + a cost per tensor, fitted to Fig. 4)",
    )
    g.add_argument("--max-num-seqs", type=int, default=None, help="sequences per batch (default 128)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per iteration (default 2048)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--adapter-dir", type=Path, help="real: a directory of PEFT adapters, one per subdirectory")
    g.add_argument("--num-threads", type=int, default=None, help="real: torch threads on CPU")
    p = parser.add_argument_group("policies and load")
    p.add_argument("--policies", default="slora,chameleon", help=f"comma list of: {', '.join(POLICIES)}")
    p.add_argument(
        "--policy",
        action="append",
        type=_policy_def,
        default=[],
        metavar="NAME=SCHEDULER:CACHE",
        help="define another policy (repeatable), e.g. fifo-lru=fifo:lru",
    )
    p.add_argument("--rates", type=_floats, default=[6.0, 8.0, 9.0], help="requests/s, comma list (default 6,8,9)")
    p.add_argument(
        "--predictor",
        choices=("history", "oracle", "noisy-oracle"),
        default="history",
        help="output-length predictor of size-aware schedulers (the paper's BERT proxy is ~80%% accurate: "
        "noisy-oracle with --predictor-accuracy 0.8)",
    )
    p.add_argument("--predictor-accuracy", type=float, default=0.8, help="accuracy of the noisy oracle")
    p.add_argument("--refine-steps", type=int, default=4, help="bisection steps of the throughput-at-SLO search")
    w = parser.add_argument_group("workload")
    w.add_argument("--workload", choices=("paper", "slora", "trace"), default="paper")
    w.add_argument(
        "--trace", default="conv", help="conv | code | a CSV path (TIMESTAMP, ContextTokens, GeneratedTokens)"
    )
    w.add_argument("--duration", type=float, default=600.0, help="seconds of arrivals per run (default 600)")
    w.add_argument("--adapters", type=int, default=None, help="number of adapters (default 100; 0 = base model)")
    w.add_argument("--alpha", type=float, default=1.0, help="adapter popularity exponent")
    w.add_argument("--cv", type=float, default=1.0, help="slora workload: coefficient of variation of the gaps")
    w.add_argument("--input-range", type=_int_range, default=(8, 512), help="slora workload: prompt lengths LO,HI")
    w.add_argument("--output-range", type=_int_range, default=(8, 512), help="slora workload: output lengths LO,HI")
    w.add_argument(
        "--length-scale",
        type=length_scale_arg,
        default=1.0,
        help="scale prompt and output lengths by C before clipping; 'paper': derive C from the paper's "
        "rule (TTFT SLO = 5x the mean unloaded latency) on the modelled GPU",
    )
    w.add_argument("--max-prompt-len", type=int, default=None, help="clip prompts (default: context − 1)")
    w.add_argument("--max-output-len", type=int, default=None, help="clip outputs")
    w.add_argument("--seed", type=int, default=0)
    o = parser.add_argument_group("SLOs and output")
    o.add_argument("--slo-ttft", type=float, default=5.0, help="TTFT SLO, seconds (paper: 5)")
    o.add_argument("--slo-tbt", type=float, default=0.15, help="TBT SLO, seconds (paper: 0.15)")
    o.add_argument("--out", type=Path, help="write results as JSON here")
    o.add_argument("--plots", type=Path, help="write PNG plots into this directory")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_kv_arguments(parser)
    f = parser.add_argument_group("fleet (simulator)")
    f.add_argument("--replicas", type=int, default=1, help="simulate N replicas behind a router (sim only)")
    f.add_argument("--router", default="affinity", help="with --replicas: comma list of affinity, round-robin, lru")


# ------------------------------------------------------------------------------------------------
# Engines
# ------------------------------------------------------------------------------------------------


@attrs.frozen
class EngineFactory:
    """Builds a fresh engine (and its clock) for one run of one policy."""

    simulated: bool
    label: str  # e.g. "SIMULATED · A40-48GB · llama-7b · analytic cost model"
    build: Callable[[str, str, Workload], tuple[EngineCore, Clock, Workload]]
    max_model_len: int
    description: Mapping[str, Any]
    cost: Any = None  # the cost model of a simulated run (`--length-scale paper` derives C on it)
    adapter_row_bytes: int = 0


def scheduler_options(args: argparse.Namespace) -> SchedulerOptions:
    """The scheduler knobs a benchmark sets: predictor, seed, and the TTFT SLO (MLQ quotas use it)."""
    return SchedulerOptions(
        predictor=args.predictor, predictor_accuracy=args.predictor_accuracy, seed=args.seed, slo_ttft_s=args.slo_ttft
    )


def engine_config(args: argparse.Namespace, scheduler: str, cache: str, **fields: Any) -> EngineConfig:
    """The `EngineConfig` of one benchmark run: a policy pair plus the command line's limits."""
    limits = {
        k: v
        for k, v in (("max_num_seqs", args.max_num_seqs), ("max_num_batched_tokens", args.max_num_batched_tokens))
        if v
    }
    return EngineConfig(
        scheduler=scheduler,  # type: ignore[arg-type]
        adapter_cache=cache,  # type: ignore[arg-type]
        max_model_len=args.max_model_len,
        seed=args.seed,
        scheduler_options=scheduler_options(args),
        **limits,
        **{**kv_config_fields(args), **fields},
    )


def sim_factory(args: argparse.Namespace) -> EngineFactory:
    profile = CostProfile.from_json(args.profile) if args.profile else None
    cost: Any = profile
    row_bytes = profile.engine.adapter_row_bytes if profile is not None and profile.engine is not None else 0
    if profile is not None:
        assert profile.engine is not None
        max_len = args.max_model_len or profile.engine.max_model_len
        what = f"cost profile {args.profile}"
        desc: dict[str, Any] = {
            "cost_model": "profile",
            "profile": str(args.profile),
            "profile_meta": dict(profile.meta),
        }
    else:
        gpu, model = get_gpu(args.gpu), get_model(args.model or "llama-7b")
        calibration = LINKS[getattr(args, "link", "bandwidth")]
        cost = AnalyticCostModel(gpu, model, calibration)
        row_bytes = cost.adapter_row_bytes
        max_len = args.max_model_len or model.max_model_len
        what = f"{gpu.name} · {model.name} · analytic cost model"
        desc = {
            "cost_model": "analytic",
            "gpu": attrs.asdict(gpu),
            "model": attrs.asdict(model),
            "calibration": attrs.asdict(calibration),
        }

    def build(scheduler: str, cache: str, workload: Workload) -> tuple[EngineCore, Clock, Workload]:
        config = engine_config(args, scheduler, cache)
        if profile is not None and profile.engine is not None:  # the profiled engine's limits by default
            e = profile.engine
            config = attrs.evolve(
                config,
                max_num_seqs=args.max_num_seqs or e.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens or e.max_num_batched_tokens,
            )
        core, clock = build_sim_engine(
            None if profile else args.gpu,
            None if profile else (args.model or "llama-7b"),
            config,
            adapters=workload.adapters,
            profile=profile,
            calibration=A40_LLAMA7B_CALIBRATION if profile else LINKS[getattr(args, "link", "bandwidth")],
        )
        return core, clock, workload

    return EngineFactory(True, f"{SIM_LABEL} · {what}", build, max_len, desc, cost, row_bytes)


def real_factory(args: argparse.Namespace) -> EngineFactory:
    from chameleon.engine.factory import build_core
    from chameleon.lora.peft_config import read_adapter_config

    if args.model is None:
        raise ValueError("--executor real needs --model DIR (a local Hugging Face model directory)")
    real_adapters: list[tuple[AdapterSpec, Path]] = []
    if args.adapter_dir is not None:
        for sub in sorted(p for p in Path(args.adapter_dir).iterdir() if (p / "adapter_config.json").is_file()):
            cfg = read_adapter_config(sub, name=sub.name)
            rank = max([cfg.r, *(r for _, r in cfg.rank_pattern)])
            real_adapters.append((AdapterSpec(sub.name, rank), sub))
        if not real_adapters:
            raise ValueError(f"{args.adapter_dir}: no PEFT adapter subdirectories (with adapter_config.json)")
    max_rank = max([64] + [a.rank for a, _ in real_adapters])

    def config(scheduler: str, cache: str) -> EngineConfig:
        return engine_config(args, scheduler, cache, max_lora_rank=max_rank, num_threads=args.num_threads)

    def build(scheduler: str, cache: str, workload: Workload) -> tuple[EngineCore, Clock, Workload]:
        if workload.adapters and not real_adapters:
            raise ValueError(
                "--executor real runs base-model workloads only (--adapters 0) unless --adapter-dir gives PEFT adapters"
            )
        clock = MonotonicClock()
        core = build_core(args.model, config(scheduler, cache), clock=clock)
        if workload.adapters:
            workload = bind_adapters(workload, [a for a, _ in real_adapters])
            paths = {a.name: p for a, p in real_adapters}
            for spec in workload.adapters:
                core.add_adapter(spec.name, str(paths[spec.name]))
        warm_up(core)
        return core, clock, workload

    probe = build_core(args.model, config("fifo", "lru"))
    max_len = probe.limits.max_model_len
    del probe
    desc = {"cost_model": None, "model_dir": str(args.model), "adapter_dir": str(args.adapter_dir or "")}
    return EngineFactory(False, f"{REAL_LABEL} · {args.model}", build, max_len, desc)


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


@attrs.frozen
class RunResult:
    policy: str
    rate: float
    summary: RunSummary
    records: tuple[RequestRecord, ...]
    extra: Mapping[str, Any]
    memory: tuple[tuple[float, int, int, int], ...] = ()  # (t, KV, adapter, idle bytes), with --plots


class Bench:
    def __init__(self, args: argparse.Namespace, factory: EngineFactory, table: Mapping[str, tuple[str, str]]) -> None:
        self.args, self.factory, self.table = args, factory, table
        self.results: dict[tuple[str, float], RunResult] = {}
        self._workloads: dict[float, Workload] = {}
        self.bar: Any = None
        self.length_scale = self._length_scale()

    def _length_scale(self) -> float:
        """`--length-scale` as a number (`paper`: derived on the factory's cost model, printed)."""
        value = getattr(self.args, "length_scale", 1.0)
        if value != PAPER:
            return float(value)
        if self.factory.cost is None:
            raise ValueError("--length-scale paper needs a simulated run (it derives C on the cost model)")
        prompts, outputs, ranks = length_population(self.args)
        derived = paper_length_scale(
            self.factory.cost, prompts, outputs, ranks=ranks, adapter_row_bytes=self.factory.adapter_row_bytes,
            max_model_len=self.factory.max_model_len, slo_ttft_s=self.args.slo_ttft,
        )  # fmt: skip
        print(
            f"length scale (paper rule: {derived.target_s * 1e3:.0f} ms mean unloaded latency): C = {derived.scale:.4f}",
            file=sys.stderr,
        )
        return derived.scale

    def workload(self, rate: float) -> Workload:
        if rate not in self._workloads:
            w = scale_lengths(make_workload(self.args, rate), self.length_scale)
            limit = self.factory.max_model_len - 1
            max_prompt = min(self.args.max_prompt_len or limit, limit)
            w = clip_lengths(w, max_prompt, self.args.max_output_len)
            self._workloads[rate] = with_system_prompts(w, getattr(self.args, "system_prompt_len", 0))
        return self._workloads[rate]

    def run(self, policy: str, rate: float) -> RunResult:
        key = (policy, rate)
        if key in self.results:
            return self.results[key]
        scheduler, cache = self.table[policy]
        workload = self.workload(rate)
        if self.bar is not None:
            self.bar.set_description(f"{policy} @ {rate:g} rps")
        core, clock, workload = self.factory.build(scheduler, cache, workload)
        start = time.perf_counter()
        memory: list[tuple[float, int, int, int]] = []
        sample = None
        if getattr(self.args, "plots", None) is not None:

            def sample(t: float) -> None:
                if not memory or t - memory[-1][0] >= MEMORY_SAMPLE_S:
                    m = core.memory
                    memory.append((t, m.kv_bytes, m.adapter_bytes, m.free_bytes))

        in_flight = InFlight(core, sample)
        records = run_workload(core, workload, clock, progress=self.bar, on_step=in_flight)
        wall = time.perf_counter() - start
        stats = core.stats()
        lookups = stats.adapters.hits + stats.adapters.misses
        hit_rate = stats.adapters.hits / lookups if lookups else None
        summary = summarize(
            records, slo_ttft_s=self.args.slo_ttft, slo_tbt_s=self.args.slo_tbt, adapter_hit_rate=hit_rate
        )
        extra: dict[str, Any] = {
            "adapter_hits": stats.adapters.hits,
            "adapter_misses": stats.adapters.misses,
            "adapter_evictions": stats.adapters.evictions,
            "num_preemptions": stats.requests.preemptions,
            "wall_s": wall,
            "kv_blocks": stats.kv.blocks_total,
            "mean_running": in_flight.mean,
            "max_running": in_flight.peak,
            "prefix_hit_rate": stats.prefix.hit_rate,
            "prefix_hit_tokens": stats.prefix.hit_tokens,
        }
        sim_stats = getattr(core.executor, "stats", None)
        if sim_stats is not None and hasattr(sim_stats, "load_wait_s"):
            extra["adapter_load_critical_s"] = sim_stats.load_wait_s
            extra["iterations"] = sim_stats.iterations
        result = RunResult(policy, rate, summary, tuple(records), extra, tuple(memory))
        self.results[key] = result
        return result

    def sweep(self, policies: Sequence[str], rates: Sequence[float]) -> dict[str, float]:
        """Every policy at every rate, then throughput at SLO per policy (reusing those runs)."""
        for policy in policies:
            for rate in rates:
                self.run(policy, rate)
        tput = {}
        for policy in policies:

            def run_at(rate: float, policy: str = policy) -> RunSummary:
                if (policy, rate) not in self.results and self.bar is not None:
                    self.bar.total += len(self.workload(rate))
                    self.bar.refresh()
                return self.run(policy, rate).summary

            tput[policy] = throughput_at_slo(
                run_at, rates, slo_ttft_s=self.args.slo_ttft, refine_steps=self.args.refine_steps
            )
        return tput


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark `args` describe; 0 on success, 2 on a usage or engine error."""
    table = {**POLICIES, **dict(args.policy)}
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in table]
    if unknown:
        print(f"error: unknown policies {unknown}; known: {', '.join(table)}", file=sys.stderr)
        return 2
    rates = sorted(set(args.rates))
    if args.replicas > 1:
        from chameleon.harness.fleet import run_fleet_bench

        return run_fleet_bench(args, sim_factory, table, policies, rates)
    try:
        factory = sim_factory(args) if args.executor == "sim" else real_factory(args)
        bench = Bench(args, factory, table)
        title = (
            f"{factory.label}\n{args.workload} workload · lengths x{bench.length_scale:.4g} · {args.duration:g} s · "
            f"SLO TTFT {args.slo_ttft:g} s / TBT {args.slo_tbt * 1e3:g} ms"
        )
        tput = _sweep_with_progress(bench, policies, rates)
    except (ChameleonError, ValueError, OSError) as exc:  # bad options, unknown policies, missing files
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(title, bench, policies, rates, tput))
    if args.out is not None:
        data = results_json(args, factory, table, policies, rates, bench, tput)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        print(f"results: {args.out}")
    if args.plots is not None:
        for path in write_plots(args.plots, title, bench, policies, rates):
            print(f"plot: {path}")
    return 0


def _sweep_with_progress(bench: Bench, policies: Sequence[str], rates: Sequence[float]) -> dict[str, float]:
    from tqdm import tqdm

    total = sum(len(bench.workload(r)) for r in rates) * len(policies)
    progress: tqdm[int] = tqdm(total=total, unit="req", disable=bench.args.no_progress, dynamic_ncols=True)
    with progress as bar:
        bench.bar = bar
        try:
            return bench.sweep(policies, rates)
        finally:
            bench.bar = None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m chameleon.harness.bench ...` (the same options as `chameleon bench`)."""
    parser = argparse.ArgumentParser(prog="chameleon bench", description=__doc__.split("\n")[0])
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
