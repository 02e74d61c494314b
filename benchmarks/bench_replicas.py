"""Routers for a 2-replica fleet, simulated: adapter hit rate and P99 TTFT, medians of 3 seeds.

Each replica is the real engine core (Chameleon scheduler and cache) over the simulated A40 /
Llama-7B executor; the fleet driver (`chameleon.harness.fleet`) routes with the same code as
`chameleon.serve.ray`. Workload: S-LoRA's generator, `--adapters` adapters (ranks 8-128) with
power-law popularity (`--alpha`), Poisson arrivals (cv 1). Routers: `affinity` (ours),
`lru` (Ray Serve's default multiplexing: per-replica LRU of model ids, power of two choices) and
`round-robin`. Run: `python benchmarks/bench_replicas.py [--rate R] [--duration S]`.
"""

from __future__ import annotations

import argparse
import statistics

from chameleon.config import EngineConfig
from chameleon.harness.fleet import SimReplica, run_fleet
from chameleon.harness.metrics import summarize
from chameleon.harness.workload import slora_workload
from chameleon.sim.engine import build_sim_engine

ROUTERS = ("affinity", "lru", "round-robin")


def fleet(n: int, workload, seed: int) -> list[SimReplica]:  # type: ignore[no-untyped-def]
    out = []
    for i in range(n):
        config = EngineConfig(scheduler="chameleon", adapter_cache="chameleon", seed=seed)
        core, clock = build_sim_engine("A40", "llama-7b", config, adapters=workload.adapters)
        out.append(SimReplica(f"r{i}", core, clock))
    return out


def one(router: str, seed: int, args: argparse.Namespace) -> tuple[float, float]:
    w = slora_workload(
        num_adapters=args.adapters, alpha=args.alpha, rate=args.rate, cv=1.0, duration_s=args.duration, seed=seed
    )
    result = run_fleet(fleet(args.replicas, w, seed), w, router)
    s = summarize(result.records, slo_ttft_s=args.slo, slo_tbt_s=1.0)
    return result.hit_rate, s.ttft_p99_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of adapter popularity")
    p.add_argument("--rate", type=float, default=12.0, help="requests/s for the whole fleet")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--slo", type=float, default=2.0)
    args = p.parse_args()
    print(
        f"{args.replicas} replicas · {args.adapters} adapters · alpha {args.alpha} · {args.rate} req/s Poisson · "
        f"{args.duration:.0f} s · SIMULATED A40 / Llama-7B · medians of 3 seeds"
    )
    print(f"{'router':<12} {'hit rate':>9} {'P99 TTFT (s)':>13}")
    for router in ROUTERS:
        runs = [one(router, seed, args) for seed in (0, 1, 2)]
        hit = statistics.median(r[0] for r in runs)
        p99 = statistics.median(r[1] for r in runs)
        print(f"{router:<12} {hit:>9.3f} {p99:>13.3f}")


if __name__ == "__main__":
    main()
