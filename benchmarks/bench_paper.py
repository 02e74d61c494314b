"""The Chameleon paper's tables, reproduced on the simulated GPU (SPEC §1; issue 6).

    python benchmarks/bench_paper.py                       # A40 · Llama-7B, 3 seeds, lengths x C (paper rule)
    python benchmarks/bench_paper.py --quick               # 1 seed, 60 s runs: a smoke test

Everything here is SIMULATED: the real engine core, scheduler and adapter cache over
`SimulatedExecutor` and the analytic cost model (calibrated once, to the paper's TTFT-by-rank
figures; nothing below tunes it). The workload is the paper's: the Azure 2023 conversation trace's
lengths, Poisson arrivals, 100 adapters of ranks {8,16,32,64,128} x 20, uniform rank popularity and
power-law popularity within a rank, TTFT SLO 5 s, TBT SLO 150 ms.

Lengths are scaled by the paper's factor C (§3.2), derived on the modelled GPU from the paper's SLO
rule (`--length-scale paper`, `chameleon.sim.length_scale`). Load levels: the paper's 6 / 8 / 9
requests/s absolute, and the same fractions of capacity (0.70 / 0.93 / 1.05 of the measured `slora`
throughput at SLO; the paper's S-LoRA meets the SLO up to 8.6 requests/s).

Steps, per seed (seeds change arrivals, lengths and adapter assignment):
1. the ablation policies' throughput at SLO: a scan over a grid around `slora`'s saturated
   throughput, then bisection (`chameleon.harness.metrics.throughput_at_slo`);
2. every policy at the absolute and relative load levels; the cache policies at 8 req/s;
   C x {0.75, 1.25} at 8 req/s; Fig. 4 with both link models.
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

from _machine import machine_line

from chameleon.harness.bench import Bench, add_bench_arguments, sim_factory
from chameleon.harness.driver import POLICIES
from chameleon.harness.metrics import throughput_at_slo

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
PAPER_CACHE_P99 = {"chameleon-lru": -0.18, "chameleon-fairshare": -0.22, "chameleon": -0.26}  # at 8 req/s
DEFAULT_POLICIES = "slora,slora-exact,chameleon,chameleon-noslo,chameleon-paper,chameleon-nocache,chameleon-nosched"
TPUT_POLICIES = ("slora", "chameleon", "chameleon-noslo", "chameleon-nocache", "chameleon-nosched", "chameleon-paper")
TAIL_POLICIES = ("slora", "chameleon", "chameleon-noslo", "chameleon-nosched", "chameleon-paper")
SLORA_GEN_POLICIES = ("slora", "chameleon", "chameleon-noslo", "chameleon-nosched")
CACHE_POLICIES = ("slora", "chameleon-lru", "chameleon-fairshare", "chameleon")
LAYOUT_POLICIES = ("chameleon-static", "chameleon-k4", "chameleon", "chameleon-paper")
WHAT = {
    "slora": "FIFO, evict at RC 0, async prefetch (the paper's S-LoRA)",
    "slora-exact": "S-LoRA's source: 10-step cadence, whole prompts, full-output reservation",
    "chameleon": "MLQ (ours: knee + SLO rules) + Chameleon cache",
    "chameleon-noslo": "MLQ (ours at the knee, no SLO rules) + Chameleon cache",
    "chameleon-paper": "MLQ read literally + Chameleon cache",
    "chameleon-nocache": "MLQ only (scheduler alone)",
    "chameleon-nosched": "Chameleon cache only (FIFO)",
    "chameleon-lru": "MLQ + LRU cache",
    "chameleon-fairshare": "MLQ + equal-weight cache (Ch-FairShare)",
    "chameleon-static": "4 equal-range queues, equal quotas (Ch-Static)",
    "chameleon-k4": "K = 4 by minimal WCSS (literal)",
}


def bench_args(args: argparse.Namespace, seed: int, scale: float, duration: float | None = None, link: str = "bandwidth",
               workload: str = "paper") -> argparse.Namespace:  # fmt: skip
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p.parse_args(
        [
            "--executor", "sim", "--gpu", args.gpu, "--model", args.model, "--workload", workload,
            "--duration", str(duration or args.duration), "--seed", str(seed), "--no-progress",
            "--predictor", args.predictor, "--length-scale", repr(scale), "--link", link,
        ]
    )  # fmt: skip


def _bench(args: argparse.Namespace, seed: int, scale: float, duration: float | None = None, workload: str = "paper") -> Bench:
    a = bench_args(args, seed, scale, duration, workload=workload)
    return Bench(a, sim_factory(a), POLICIES)


def _capacity(job: tuple[argparse.Namespace, int, float, str, float]) -> float:
    """Requests/s `slora` finishes when heavily overloaded (a short run): the throughput grid's centre."""
    args, seed, scale, workload, rate = job
    return _bench(args, seed, scale, 60.0, workload).run("slora", rate).summary.throughput_rps


def _tput(job: tuple[argparse.Namespace, int, float, str, tuple[float, ...], str]) -> tuple[int, str, float]:
    args, seed, scale, policy, grid, workload = job
    b = _bench(args, seed, scale, workload=workload)
    t = throughput_at_slo(lambda r: b.run(policy, r).summary, grid, slo_ttft_s=b.args.slo_ttft, refine_steps=3)
    return seed, policy, t


def _at(job: tuple[argparse.Namespace, int, float, str, float, str]) -> tuple[tuple[float, str, float], int, dict[str, Any]]:
    args, seed, scale, policy, rate, workload = job
    r = _bench(args, seed, scale, workload=workload).run(policy, rate)
    return (scale if workload == "paper" else -1.0, policy, rate), seed, {**r.summary.as_dict(), **r.extra}


def _fig4(job: tuple[str, int, float]) -> tuple[str, int, dict[int, float]]:
    from chameleon.harness.fig4 import fig4_ratios
    from chameleon.sim.analytic import LINKS

    link, seed, scale = job
    return link, seed, fig4_ratios(LINKS[link], seed=seed, length_scale=scale, duration_s=300.0)  # type: ignore[arg-type]


def _med(v: Sequence[float]) -> float:
    return statistics.median(v)


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _spread(v: Sequence[float]) -> str:
    return f"{_med(v):.3f} ({min(v):.3f}–{max(v):.3f})"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", default="A40")
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--policies", default=DEFAULT_POLICIES)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--predictor", default="history", choices=("history", "oracle", "noisy-oracle"))
    ap.add_argument("--overload-rate", type=float, default=None, help="rate of the capacity probe (default 8 / C)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 seed, 60 s runs")
    ap.add_argument("--plots", type=Path, default=None, help="write the Fig. 6-style memory plot here")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.duration = 1, 60.0
    policies = [p.strip() for p in args.policies.split(",")]
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    probe = bench_args(args, 0, 1.0)
    probe.length_scale = "paper"
    scale = Bench(probe, sim_factory(probe), POLICIES).length_scale
    if args.overload_rate is None:
        args.overload_rate = round(8.0 / scale, 1)  # ~2x capacity on the A40 at the paper's C
    print(f"SIMULATED · {args.gpu} · {args.model} · paper workload (Azure conv trace) · lengths x C = {scale:.4f} "
          f"(paper rule) · {args.duration:g} s runs · seeds {seeds} · predictor {args.predictor}")
    print(f"host: {machine_line()}", flush=True)
    at: dict[tuple[float, str, float], dict[int, dict[str, Any]]] = {}
    with ProcessPoolExecutor(args.workers) as pool:
        caps = list(pool.map(_capacity, [(args, s, scale, "paper", args.overload_rate) for s in seeds]))
        cap = _med(caps)
        grid = tuple(round(cap * f, 2) for f in (0.5, 0.75, 1.0, 1.25))
        print(f"slora saturated throughput (60 s at {args.overload_rate:g} req/s): {cap:.2f} req/s; grid {grid}", flush=True)
        tput: dict[str, list[float]] = {}
        for seed, policy, t in pool.map(_tput, [(args, s, scale, p, grid, "paper") for p in TPUT_POLICIES for s in seeds]):
            tput.setdefault(policy, []).append(t)
        base = _med(tput["slora"])
        rel = tuple(round(base * f, 2) for f in FRACTIONS)
        print(f"slora throughput at SLO (median): {base:.2f} req/s -> relative levels {rel}", flush=True)
        jobs = [(args, s, scale, p, r, "paper") for p in policies for r in (*PAPER_RATES, *rel) for s in seeds]
        jobs += [(args, s, scale, p, 8.0, "paper") for p in (*CACHE_POLICIES, *LAYOUT_POLICIES) if p not in policies for s in seeds]
        jobs += [(args, s, scale * f, p, 8.0, "paper") for f in (0.75, 1.25) for p in ("slora", "chameleon") for s in seeds]
        jobs += [(args, s, scale, p, rel[2], "paper") for p in (*LAYOUT_POLICIES, *TAIL_POLICIES) if p not in policies for s in seeds]
        # The S-LoRA generator (lengths U[8, 512), unscaled): its own capacity and relative levels.
        sl_caps = list(pool.map(_capacity, [(args, s, 1.0, "slora", 9.0) for s in seeds]))
        sl_grid = tuple(round(_med(sl_caps) * f, 2) for f in (0.5, 0.75, 1.0, 1.25))
        sl_tput: dict[str, list[float]] = {}
        for seed, policy, t in pool.map(_tput, [(args, s, 1.0, p, sl_grid, "slora") for p in SLORA_GEN_POLICIES for s in seeds]):
            sl_tput.setdefault(policy, []).append(t)
        sl_rel = tuple(round(_med(sl_tput["slora"]) * f, 2) for f in FRACTIONS)
        print(f"S-LoRA generator: slora throughput at SLO {_med(sl_tput['slora']):.2f} req/s -> levels {sl_rel}", flush=True)
        jobs += [(args, s, 1.0, p, r, "slora") for p in SLORA_GEN_POLICIES for r in sl_rel for s in seeds]
        for key, seed, d in pool.map(_at, jobs):
            at.setdefault(key, {})[seed] = d
        fig4: dict[str, list[dict[int, float]]] = {}
        for link, seed, ratios in pool.map(_fig4, [(link, s, scale) for link in ("bandwidth", "pageable") for s in seeds]):
            fig4.setdefault(link, []).append(ratios)
    wall = time.perf_counter() - t0
    print("\n".join(_report(args, policies, seeds, scale, base, rel, tput, at, fig4)))
    print("\n".join(_slora_report(seeds, sl_rel, sl_tput, at, rel, scale)))
    print(f"\n{len(jobs)} level runs + throughput searches + Fig. 4 in {wall:.0f} s wall ({args.workers} processes).")
    if args.plots:
        b = _bench(args, 0, scale)
        b.args.plots = args.plots
        for p in ("slora", "chameleon"):
            b.run(p, rel[2])
        from chameleon.harness.report_memory import memory_plot

        args.plots.mkdir(parents=True, exist_ok=True)
        title = f"SIMULATED · {args.gpu} · {args.model} · lengths x{scale:.4f} · seed 0"
        print(f"plot: {memory_plot(args.plots / 'paper_memory_over_time.png', title, b, ['slora', 'chameleon'], [rel[2]])}")
    if args.out:
        args.out.write_text(json.dumps({
            "simulated": True, "gpu": args.gpu, "model": args.model, "seeds": seeds, "duration_s": args.duration,
            "length_scale": scale, "slora_capacity_rps": caps, "throughput_at_slo": tput, "relative_rates": rel,
            "runs": {f"{p}@{r:g}@x{c:.4f}": v for (c, p, r), v in at.items()}, "fig4": fig4,
            "slora_generator": {"throughput_at_slo": sl_tput, "relative_rates": sl_rel},
        }, indent=1, default=str))
    return 0


def _report(args: argparse.Namespace, policies: list[str], seeds: list[int], scale: float, base: float,
            rel: tuple[float, ...], tput: dict[str, list[float]], at: dict[tuple[float, str, float], dict[int, dict[str, Any]]],
            fig4: dict[str, list[dict[int, float]]]) -> list[str]:  # fmt: skip
    def vals(p: str, r: float, key: str, c: float = scale) -> list[float]:
        return [at[(c, p, r)][s][key] for s in seeds]

    def m(p: str, r: float, key: str, c: float = scale) -> float:
        return _med(vals(p, r, key, c))

    out: list[str] = []
    for title, rates in (("absolute: the paper's 6 / 8 / 9 req/s", PAPER_RATES),
                         (f"relative: 0.70 / 0.93 / 1.05 x slora's throughput at SLO ({base:.2f} req/s)", rel)):
        out.append(f"\n#### Load levels, {title}\n")
        out.append("| load | rate | policy | P50 TTFT (s) | P99 TTFT (s) [min–max] | TBT P99 (ms) | hit rate | load stall | "
                   "P50 vs slora | P99 vs slora | paper P50 | paper P99 |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for i, (level, rate) in enumerate(zip(LEVELS, rates, strict=True)):
            s50, s99 = m("slora", rate, "ttft_p50_s"), m("slora", rate, "ttft_p99_s")
            for p in policies:
                p50, p99, v99 = m(p, rate, "ttft_p50_s"), m(p, rate, "ttft_p99_s"), vals(p, rate, "ttft_p99_s")
                paper = (_pct(PAPER_P50_REDUCTION[i]), _pct(PAPER_P99_REDUCTION[i])) if p == "chameleon" else ("", "")
                r = ("", "") if p == "slora" else (_pct(p50 / s50 - 1), _pct(p99 / s99 - 1))
                stall = _med([d["adapter_load_critical_s"] / d["duration_s"] for d in at[(scale, p, rate)].values()])
                out.append(f"| {level} | {rate:g} | {p} | {p50:.3f} | {p99:.3f} [{min(v99):.2f}–{max(v99):.2f}] | "
                           f"{m(p, rate, 'tbt_p99_s') * 1e3:.0f} | {m(p, rate, 'adapter_hit_rate') * 100:.1f}% | "
                           f"{stall * 100:.1f}% | {r[0]} | {r[1]} | {paper[0]} | {paper[1]} |")
    out.append("\n#### Throughput at SLO and the ablation (P99 TTFT <= 5 s; median, min–max)\n")
    out.append("| policy | what it keeps | throughput at SLO (req/s) | vs slora | paper |")
    out.append("|---|---|---|---|---|")
    for p in TPUT_POLICIES:
        paper = {"slora": f"{PAPER_SLORA_TPUT} req/s", "chameleon": f"{PAPER_CHAMELEON_TPUT} req/s (1.5x)"}.get(
            p, f"{PAPER_ABLATION[p]}x" if p in PAPER_ABLATION else "")
        out.append(f"| {p} | {WHAT.get(p, '')} | {_spread(tput[p])} | {_med(tput[p]) / base:.3f}x | {paper} |")
    for title, group, rate, paper_col in (("Cache policy at 8 req/s (all under MLQ; slora for reference)", CACHE_POLICIES, 8.0, True),
                                          (f"Queues: static vs dynamic, at 1.05 x capacity ({rel[2]:g} req/s)", LAYOUT_POLICIES, rel[2], False)):
        out.append(f"\n#### {title}\n")
        out.append("| policy | what | P50 TTFT (s) | P99 TTFT (s) [min–max] | hit rate | P99 vs slora | paper P99 vs S-LoRA |")
        out.append("|---|---|---|---|---|---|---|")
        s99 = m("slora", rate, "ttft_p99_s") if ("slora" in group or (scale, "slora", rate) in at) else float("nan")
        for p in group:
            if (scale, p, rate) not in at:
                continue
            v = vals(p, rate, "ttft_p99_s")
            pp = _pct(PAPER_CACHE_P99[p]) if paper_col and p in PAPER_CACHE_P99 else ""
            out.append(f"| {p} | {WHAT.get(p, '')} | {m(p, rate, 'ttft_p50_s'):.3f} | {_med(v):.3f} [{min(v):.2f}–{max(v):.2f}] | "
                       f"{m(p, rate, 'adapter_hit_rate') * 100:.1f}% | {'' if p == 'slora' else _pct(_med(v) / s99 - 1)} | {pp} |")
    out.append("\n#### Sensitivity to the length factor, at 8 req/s\n")
    out.append("| C | slora P50 / P99 (s) | chameleon P50 / P99 (s) | P99 vs slora |")
    out.append("|---|---|---|---|")
    for f in (0.75, 1.0, 1.25):
        c = scale * f
        a, b = (m("slora", 8.0, "ttft_p50_s", c), m("slora", 8.0, "ttft_p99_s", c)), (m("chameleon", 8.0, "ttft_p50_s", c), m("chameleon", 8.0, "ttft_p99_s", c))
        out.append(f"| {c:.4f} ({f:g} C) | {a[0]:.3f} / {a[1]:.3f} | {b[0]:.3f} / {b[1]:.3f} | {_pct(b[1] / a[1] - 1)} |")
    out.append("\n#### Fig. 4: slora's P99 TTFT at 8 req/s with 50 / 500 adapters, relative to one adapter (300 s runs)\n")
    out.append("| link model | 50 adapters | 500 adapters |")
    out.append("|---|---|---|")
    for link, runs in fig4.items():
        out.append(f"| {link} | {_spread([r[50] for r in runs])}x | {_spread([r[500] for r in runs])}x |")
    out.append("| paper (Fig. 4) | 1.69x | 2.60x |")
    return out


def _slora_report(seeds: list[int], sl_rel: tuple[float, ...], sl_tput: dict[str, list[float]],
                  at: dict[tuple[float, str, float], dict[int, dict[str, Any]]], rel: tuple[float, ...], scale: float) -> list[str]:  # fmt: skip
    def vals(c: float, p: str, r: float, key: str) -> list[float]:
        return [at[(c, p, r)][s][key] for s in seeds]

    out = [f"\n#### The tail at 1.05 x capacity ({rel[2]:g} req/s): what the SLO rules trade (median over seeds)\n",
           "| policy | P50 | P90 | P99 | P99.9 | max | missed the SLO |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in TAIL_POLICIES:
        if (scale, p, rel[2]) in at:
            q = [_med(vals(scale, p, rel[2], k)) for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_p999_s", "ttft_max_s")]
            miss = _med(vals(scale, p, rel[2], "ttft_miss_share"))
            out.append(f"| {p} | " + " | ".join(f"{x:.2f}" for x in q) + f" | {miss * 100:.1f}% |")
    out.append("\n#### The S-LoRA generator (lengths U[8, 512), 100 adapters of ranks 64/32/16/8, alpha 1): "
               "0.70 / 0.93 / 1.05 x slora's throughput at SLO\n")  # fmt: skip
    out.append("| rate | policy | P50 TTFT (s) | P99 TTFT (s) [min–max] | P99 vs slora | throughput at SLO (req/s) |")
    out.append("|---|---|---|---|---|---|")
    for r in sl_rel:
        s99 = _med(vals(-1.0, "slora", r, "ttft_p99_s"))
        for p in SLORA_GEN_POLICIES:
            v = vals(-1.0, p, r, "ttft_p99_s")
            out.append(f"| {r:g} | {p} | {_med(vals(-1.0, p, r, 'ttft_p50_s')):.3f} | {_med(v):.3f} [{min(v):.2f}–{max(v):.2f}] | "
                       f"{'' if p == 'slora' else _pct(_med(v) / s99 - 1)} | {_spread(sl_tput[p]) if r == sl_rel[0] else ''} |")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
