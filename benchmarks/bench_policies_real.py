"""Chameleon vs S-LoRA's policies on the REAL engine, near its own capacity, on this machine (issue 13).

    python benchmarks/bench_policies_real.py                 # ~15 min on 2 cores
    python benchmarks/bench_policies_real.py --quick         # 1 repetition, short runs: a smoke test

Not simulated: `EngineCore` over the torch executor on a monotonic clock, the open-loop driver of
`chameleon bench`. The set-up, and why:

- a tiny Llama (hidden 256, 4 layers, SmolLM2's tokenizer) in fp32, so that 2 cores reach the
  engine's capacity at rates where the scheduler matters, and 32 real PEFT adapters (ranks
  8/16/32/64, 8 each, on q/k/v/o) with the paper's popularity (uniform over ranks, Zipf within);
- lengths from the Azure 2023 conversation trace, scaled by `--length-scale` (default 0.1: mean
  ~116 prompt + ~21 output tokens), Poisson arrivals;
- a device-memory budget that binds: `--memory-mib` for KV + adapters + the activation reserve,
  and an adapter pool of 8 x rank 64 rows for 960 rows of adapters, so adapters are evicted and
  reloaded, and KV and idle adapters compete for the same bytes under load;
- the rates: 0.7 / 0.9 / 1.05 x the capacity `slora` reaches when overloaded (a short probe);
- `slora` (FIFO, evict at refcount 0, async prefetch) and `chameleon` (MLQ + Chameleon cache) at
  each rate, interleaved and alternated in order (ABBA), after a warm-up, medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_line
from _peer_assets import make_online_adapters, make_tiny_model

from chameleon.clock import MonotonicClock
from chameleon.config import EngineConfig
from chameleon.engine.factory import build_core
from chameleon.harness.driver import POLICIES, run_workload, warm_up
from chameleon.harness.metrics import RunSummary, summarize
from chameleon.harness.workload import Workload, paper_workload
from chameleon.sched.options import SchedulerOptions

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANKS = (8, 16, 32, 64)
PER_RANK = 8
SLO_TTFT_S = 2.0  # the same interactive SLO as the peer benchmark (bench_peers.py online)
FRACTIONS = (0.7, 0.9, 1.05)
POLICY_NAMES = ("slora", "chameleon")


def workload(rate: float, duration: float, seed: int, scale: float) -> Workload:
    return paper_workload(rate=rate, duration_s=duration, seed=seed, ranks=RANKS, per_rank=PER_RANK,
                          length_scale=scale, max_prompt_len=1024, max_output_len=256)  # fmt: skip


def config(policy: str, args: argparse.Namespace) -> EngineConfig:
    scheduler, cache = POLICIES[policy]
    return EngineConfig(
        dtype="float32", scheduler=scheduler, adapter_cache=cache,  # type: ignore[arg-type]
        max_loras=8, max_lora_rank=64, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=512,
        device_memory_bytes=args.memory_mib << 20, num_threads=args.threads, max_model_len=2048,
        scheduler_options=SchedulerOptions(slo_ttft_s=SLO_TTFT_S),
    )  # fmt: skip


def run_once(model: Path, adapters: dict[str, Path], policy: str, w: Workload, args: argparse.Namespace) -> tuple[RunSummary, dict[str, Any]]:
    clock = MonotonicClock()
    core = build_core(model, config(policy, args), clock=clock)
    for spec in w.adapters:
        core.add_adapter(spec.name, str(adapters[spec.name]))
    warm_up(core)
    try:
        records = run_workload(core, w, clock)
        stats = core.stats()
        s = summarize(records, slo_ttft_s=SLO_TTFT_S, slo_tbt_s=0.15, adapter_hit_rate=stats.adapters.hit_rate)
        extra = {"loads": stats.adapters.loads, "evictions": stats.adapters.evictions,
                 "kv_capacity_tokens": core.scheduler.kv_capacity_tokens}  # fmt: skip
        return s, extra
    finally:
        gc.unfreeze()
        del core
        gc.collect()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per run")
    ap.add_argument("--length-scale", type=float, default=0.1)
    ap.add_argument("--memory-mib", type=int, default=48, help="device budget: KV + adapters + activation reserve")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe-rate", type=float, default=120.0, help="overload rate of the capacity probe")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.duration = 1, 8.0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chameleon-policies-") as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "model")
        specs = workload(1.0, 1.0, 0, args.length_scale).adapters
        adapters = make_online_adapters(model, root / "adapters", [(a.name, a.rank) for a in specs], TARGETS)
        print(f"REAL engine · tiny Llama fp32 · {len(adapters)} PEFT adapters (ranks {RANKS} x {PER_RANK}) · "
              f"Azure conv lengths x{args.length_scale:g} · budget {args.memory_mib} MiB · TTFT SLO {SLO_TTFT_S:g} s · "
              f"engine threads {args.threads}")  # fmt: skip
        print(f"host: {machine_line()}", flush=True)
        probe, extra = run_once(model, adapters, "slora", workload(args.probe_rate, 6.0, 99, args.length_scale), args)
        cap = probe.throughput_rps
        rates = [round(cap * f, 1) for f in FRACTIONS]
        print(f"slora capacity (6 s at {args.probe_rate:g} req/s): {cap:.1f} req/s -> rates {rates}; "
              f"KV capacity {extra['kv_capacity_tokens']} tokens", flush=True)  # fmt: skip
        runs: dict[tuple[float, str], list[tuple[RunSummary, dict[str, Any]]]] = {}
        for rep in range(args.repeats):
            for rate in rates:
                w = workload(rate, args.duration, rep, args.length_scale)
                order = POLICY_NAMES if rep % 2 == 0 else POLICY_NAMES[::-1]
                for policy in order:
                    s, e = run_once(model, adapters, policy, w, args)
                    runs.setdefault((rate, policy), []).append((s, e))
                    print(f"  rep {rep} {rate:g} req/s {policy:9s} P50 {s.ttft_p50_s:.3f} P99 {s.ttft_p99_s:.3f} "
                          f"hit {s.adapter_hit_rate:.2f} loads {e['loads']}", flush=True)  # fmt: skip
    print("\n| rate (req/s) | policy | TTFT P50 (s) | TTFT P99 (s) [min–max] | P99 vs slora | TBT P99 (ms) | "
          "hit rate | adapter loads | finished req/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for rate in rates:
        base = statistics.median(s.ttft_p99_s for s, _ in runs[(rate, "slora")])
        for policy in POLICY_NAMES:
            rs = runs[(rate, policy)]
            p99 = [s.ttft_p99_s for s, _ in rs]
            med = statistics.median
            vs = "" if policy == "slora" else f"{(med(p99) / base - 1) * 100:+.1f}%"
            print(f"| {rate:g} | {policy} | {med(s.ttft_p50_s for s, _ in rs):.3f} | {med(p99):.3f} [{min(p99):.3f}–{max(p99):.3f}] | "
                  f"{vs} | {med(s.tbt_p99_s for s, _ in rs) * 1e3:.0f} | {med(s.adapter_hit_rate or 0 for s, _ in rs) * 100:.1f}% | "
                  f"{med(e['loads'] for _, e in rs):.0f} | {med(s.throughput_rps for s, _ in rs):.1f} |")  # fmt: skip
    print(f"\n{args.repeats} repetition(s) x {len(rates)} rates x 2 policies, {args.duration:g} s each, in "
          f"{time.perf_counter() - t0:.0f} s wall")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
