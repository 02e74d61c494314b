"""SIMULATED: how MLQ's `urgent_fraction` trades P50 for P99 on the paper workload (issue 13).

    python benchmarks/bench_urgency.py            # 3 seeds, 120 s runs, the relative load levels

Each run overrides `MLQ_VARIANTS["chameleon"]` (the policy `chameleon` with one `urgent_fraction`)
and runs beside `slora` and `chameleon-nosched` (FIFO + Chameleon cache), the A40 · Llama-7B cost
model, lengths x 0.1606 (the paper rule's C, rounded). Medians over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_paper import bench_args

from chameleon import sched
from chameleon.harness.bench import Bench, sim_factory
from chameleon.harness.driver import POLICIES

FRACTIONS = ("slora", "nosched", 0.05, 0.1, 0.2, 0.4)
RATES = (18.85, 25.13, 28.28)  # 0.70 / 0.93 / 1.05 x slora's throughput at SLO (docs/benchmarks.md)


def run(job: tuple[object, int, float, float]) -> tuple[object, int, float, float, float]:
    fraction, seed, rate, duration = job
    sched.MLQ_VARIANTS["chameleon"] = {} if not isinstance(fraction, float) else {"urgent_fraction": fraction}
    ns = argparse.Namespace(gpu="A40", model="llama-7b", duration=duration, predictor="history")
    a = bench_args(ns, seed, 0.1606)
    policy = {"slora": "slora", "nosched": "chameleon-nosched"}.get(str(fraction), "chameleon")
    s = Bench(a, sim_factory(a), POLICIES).run(policy, rate).summary
    return fraction, seed, rate, s.ttft_p50_s, s.ttft_p99_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=120.0)
    args = ap.parse_args()
    jobs = [(f, s, r, args.duration) for f in FRACTIONS for r in RATES for s in range(args.seeds)]
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(run, jobs))
    cells: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for f, _, r, p50, p99 in results:
        cells.setdefault((str(f), r), []).append((p50, p99))
    print("| urgent_fraction | " + " | ".join(f"P99 at {r:g}" for r in RATES) + f" | P50 at {RATES[1]:g} |")
    print("|---" * (len(RATES) + 2) + "|")
    for f in map(str, FRACTIONS):
        p99 = [statistics.median(x[1] for x in cells[(f, r)]) for r in RATES]
        p50 = statistics.median(x[0] for x in cells[(f, RATES[1])])
        print(f"| {f} | " + " | ".join(f"{v:.3f}" for v in p99) + f" | {p50:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
