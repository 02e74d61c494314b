"""The Chameleon paper's tables, reproduced on the simulated GPU (SPEC §1; issue 6).

    python benchmarks/bench_paper.py                       # A40 · Llama-7B, 3 seeds (~12 min on 2 cores)
    python benchmarks/bench_paper.py --gpu A100 --policies chameleon,slora
    python benchmarks/bench_paper.py --quick               # 1 seed, 120 s runs: a smoke test

Everything here is SIMULATED: the real engine core, scheduler and adapter cache over
`SimulatedExecutor` and the analytic cost model (calibrated once, to the paper's TTFT-by-rank
figures; nothing below tunes it). The workload is the paper's: the Azure 2023 conversation trace's
lengths, Poisson arrivals, 100 adapters of ranks {8,16,32,64,128} x 20, uniform rank popularity and
power-law popularity within a rank, TTFT SLO 5 s, TBT SLO 150 ms.

Load levels. The paper's 6 / 8 / 9 requests/s are not reachable on the modelled A40 with these lengths
(see `chameleon.sim.cost_model`: ~1 TB/s of KV reads at 9 requests/s), so the load levels are the
paper's rates *as fractions of the baseline's capacity*: the paper's S-LoRA meets the SLO up to
8.6 requests/s, so 6 / 8 / 9 requests/s are 0.70 / 0.93 / 1.05 of it. Here they are the same
fractions of the measured `slora` throughput at SLO (median over seeds).

Steps, per seed (seeds change arrivals, lengths and adapter assignment):
1. every policy's throughput at SLO: a scan over a grid around `slora`'s saturated throughput,
   then bisection (`chameleon.harness.metrics.throughput_at_slo`);
2. every policy at the three load levels.
Medians over seeds are reported, with the spread (min-max) where it matters.
Runs go to a process pool (the simulation is deterministic, so parallel runs change nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_line  # noqa: E402

from chameleon.harness.bench import Bench, add_bench_arguments, sim_factory  # noqa: E402
from chameleon.harness.driver import POLICIES  # noqa: E402
from chameleon.harness.metrics import throughput_at_slo  # noqa: E402

# SPEC §1: Chameleon vs S-LoRA, A40, Llama-7B.
PAPER_RATES = (6.0, 8.0, 9.0)
PAPER_SLORA_TPUT = 8.6
PAPER_CHAMELEON_TPUT = 12.9
PAPER_P99_REDUCTION = (-0.147, -0.246, -0.807)
PAPER_P50_REDUCTION = (-0.139, -0.209, -0.481)
PAPER_ABLATION = {"chameleon-nosched": 1.2, "chameleon-nocache": 1.05, "chameleon": 1.5}
PAPER_HIT_RATE = 0.75
LEVELS = ("low", "medium", "high")
FRACTIONS = tuple(r / PAPER_SLORA_TPUT for r in PAPER_RATES)
DEFAULT_POLICIES = "slora,chameleon,chameleon-nocache,chameleon-nosched,chameleon-lru"


def bench_args(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p.parse_args(
        [
            "--executor", "sim", "--gpu", args.gpu, "--model", args.model, "--workload", "paper",
            "--duration", str(args.duration), "--seed", str(seed), "--no-progress",
            "--predictor", args.predictor,
        ]
    )  # fmt: skip


def _bench(args: argparse.Namespace, seed: int) -> Bench:
    a = bench_args(args, seed)
    return Bench(a, sim_factory(a), POLICIES)


def _capacity(args: argparse.Namespace, seed: int) -> float:
    """Requests/s `slora` finishes when heavily overloaded: the grid of the throughput search is built
    around it."""
    return _bench(args, seed).run("slora", args.overload_rate).summary.throughput_rps


def _tput(job: tuple[argparse.Namespace, int, str, tuple[float, ...]]) -> tuple[int, str, float, int]:
    args, seed, policy, grid = job
    b = _bench(args, seed)
    t = throughput_at_slo(lambda r: b.run(policy, r).summary, grid, slo_ttft_s=b.args.slo_ttft, refine_steps=4)
    return seed, policy, t, len(b.results)


def _at(job: tuple[argparse.Namespace, int, str, float]) -> tuple[int, str, float, dict[str, Any]]:
    args, seed, policy, rate = job
    r = _bench(args, seed).run(policy, rate)
    return seed, policy, rate, {**r.summary.as_dict(), **r.extra}


def _med(v: Sequence[float]) -> float:
    return statistics.median(v)


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", default="A40")
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--policies", default=DEFAULT_POLICIES)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--predictor", default="history", choices=("history", "oracle", "noisy-oracle"))
    ap.add_argument("--overload-rate", type=float, default=None, help="rate for the capacity probe (default 4x A40's)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 seed, 120 s runs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.duration = 1, 120.0
    if args.overload_rate is None:
        args.overload_rate = 8.0 if args.gpu.upper() == "A40" else 24.0
    policies = [p.strip() for p in args.policies.split(",")]
    if "slora" not in policies:
        policies.insert(0, "slora")
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    print(f"SIMULATED · {args.gpu} · {args.model} · paper workload (Azure conv trace) · {args.duration:g} s runs · "
          f"seeds {seeds} · predictor {args.predictor}")
    print(f"host: {machine_line()}", flush=True)

    with ProcessPoolExecutor(args.workers) as pool:
        caps = list(pool.map(_capacity, [args] * len(seeds), seeds))
        cap = _med(caps)
        grid = tuple(round(cap * f, 3) for f in (0.5, 0.75, 1.0, 1.25))
        print(f"slora saturated throughput (at {args.overload_rate:g} req/s offered): {cap:.2f} req/s; "
              f"throughput-at-SLO grid {grid}", flush=True)
        jobs = [(args, s, p, grid) for p in policies for s in seeds]
        tput: dict[str, list[float]] = {}
        runs = 0
        for seed, policy, t, n in pool.map(_tput, jobs):
            tput.setdefault(policy, []).append(t)
            runs += n
        base = _med(tput["slora"])
        rates = tuple(round(base * f, 3) for f in FRACTIONS)
        print(f"slora throughput at SLO (median): {base:.3f} req/s -> load levels {rates} req/s", flush=True)
        at: dict[tuple[str, float], list[dict[str, Any]]] = {}
        for seed, policy, rate, d in pool.map(_at, [(args, s, p, r) for p in policies for r in rates for s in seeds]):
            at.setdefault((policy, rate), []).append(d)
            runs += 1
    wall = time.perf_counter() - t0

    def m(policy: str, rate: float, key: str) -> float:
        return _med([d[key] for d in at[(policy, rate)]])

    def stall(policy: str, rate: float) -> float:
        """Share of the run the GPU waited on adapter loads (critical path): the most a cache can win."""
        return _med([d["adapter_load_critical_s"] / d["duration_s"] for d in at[(policy, rate)]])

    out: list[str] = []
    if args.gpu.upper() != "A40":
        out.append("\n(The paper columns are its A40 figures; for the A100 it reports P99 TTFT -60% and 1.4-1.9x.)")
    out.append(f"\n#### Load levels (0.70 / 0.93 / 1.05 x slora's throughput at SLO = {base:.2f} req/s)\n")
    out.append("| load | rate (req/s) | policy | P50 TTFT (s) | P99 TTFT (s) | TBT P99 (ms) | hit rate | "
               "load stall | P50 vs slora | P99 vs slora | paper P50 | paper P99 |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, (level, rate) in enumerate(zip(LEVELS, rates, strict=True)):
        s50, s99 = m("slora", rate, "ttft_p50_s"), m("slora", rate, "ttft_p99_s")
        for p in policies:
            p50, p99 = m(p, rate, "ttft_p50_s"), m(p, rate, "ttft_p99_s")
            paper = (_pct(PAPER_P50_REDUCTION[i]), _pct(PAPER_P99_REDUCTION[i])) if p == "chameleon" else ("", "")
            rel = ("", "") if p == "slora" else (_pct(p50 / s50 - 1), _pct(p99 / s99 - 1))
            out.append(f"| {level} | {rate:g} | {p} | {p50:.3f} | {p99:.3f} | {m(p, rate, 'tbt_p99_s') * 1e3:.0f} | "
                       f"{m(p, rate, 'adapter_hit_rate') * 100:.1f}% | {stall(p, rate) * 100:.1f}% | {rel[0]} | {rel[1]} | {paper[0]} | {paper[1]} |")
    out.append("\nP99 TTFT per seed (s), to show the spread:\n")
    out.append("| load | policy | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    out.append("|---|---|" + "---|" * len(seeds))
    for level, rate in zip(LEVELS, rates, strict=True):
        for p in policies:
            out.append(f"| {level} | {p} | " + " | ".join(f"{d['ttft_p99_s']:.2f}" for d in at[(p, rate)]) + " |")
    out.append("\n#### Throughput at SLO (P99 TTFT <= 5 s; median over seeds, min-max in brackets)\n")
    out.append("| policy | what it keeps | throughput at SLO (req/s) | vs slora | paper |")
    out.append("|---|---|---|---|---|")
    what = {
        "slora": "FIFO + evict at refcount 0 (baseline)",
        "chameleon": "MLQ + Chameleon cache (both)",
        "chameleon-nocache": "MLQ only (scheduler alone)",
        "chameleon-nosched": "Chameleon cache only (FIFO)",
        "chameleon-lru": "MLQ + LRU cache",
    }
    for p in policies:
        v = tput[p]
        paper = {"slora": f"{PAPER_SLORA_TPUT} req/s", "chameleon": f"{PAPER_CHAMELEON_TPUT} req/s (1.5x)"}.get(
            p, f"{PAPER_ABLATION[p]}x" if p in PAPER_ABLATION else "")
        out.append(f"| {p} | {what.get(p, POLICIES[p])} | {_med(v):.3f} ({min(v):.3f}-{max(v):.3f}) | "
                   f"{_med(v) / base:.3f}x | {paper} |")
    out.append(f"\n{runs} simulated runs in {wall:.0f} s wall ({args.workers} processes).")
    print("\n".join(out))
    if args.out:
        args.out.write_text(json.dumps({
            "simulated": True, "gpu": args.gpu, "model": args.model, "seeds": seeds, "duration_s": args.duration,
            "slora_capacity_rps": caps, "grid": grid, "throughput_at_slo": tput, "load_rates": rates,
            "runs": {f"{p}@{r:g}": v for (p, r), v in at.items()},
        }, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
