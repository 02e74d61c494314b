"""Time per scheduling decision with 256 running and 2,000 waiting requests, for every policy.

    python benchmarks/bench_scheduler.py [--running 256] [--waiting 2000] [--iterations 300]

The real mechanism (KV block manager, adapter cache over one memory budget, the policy) with no
model: after each `schedule()` the requests advance as if the batch had run, finished requests
leave and new ones arrive, so the queue stays at the stated depth. Only `schedule()` is timed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_line  # noqa: E402

from chameleon.memory.adapter_cache import AdapterCache  # noqa: E402
from chameleon.memory.budget import MemoryBudget  # noqa: E402
from chameleon.memory.kv_blocks import KVBlockManager  # noqa: E402
from chameleon.sampling_params import SamplingParams  # noqa: E402
from chameleon.sched import SCHEDULERS, SchedulerOptions, make_policy  # noqa: E402
from chameleon.sched.request import Request  # noqa: E402
from chameleon.sched.scheduler import Scheduler  # noqa: E402


def new_request(i: int, rng: random.Random, now: float, adapters: int) -> Request:
    adapter = f"a{min(int(rng.paretovariate(1.0)) - 1, adapters - 1)}" if rng.random() < 0.9 else None
    return Request(str(i), [1] * rng.randint(8, 512), SamplingParams(max_tokens=rng.randint(8, 256), ignore_eos=True),
                   arrival_time=now, adapter=adapter)


def bench(policy_name: str, running: int, waiting: int, iterations: int, adapters: int) -> list[float]:
    rng = random.Random(0)
    block_size, blocks = 16, (running + 64) * 64
    budget = MemoryBudget(total_bytes=blocks * 1024 + adapters * 64 * 512, reserve_bytes=0,
                          kv_block_bytes=1024, adapter_row_bytes=512)
    cache = AdapterCache(adapters * 64, budget, "chameleon")
    for a in range(adapters):
        cache.register(f"a{a}", [8, 16, 32, 64][a % 4])
    options = SchedulerOptions(predictor="oracle", refresh_period_s=5.0)
    sched = Scheduler(make_policy(policy_name, options), KVBlockManager(blocks, block_size, budget), cache,
                      max_num_seqs=running, max_num_batched_tokens=running + 2048, max_model_len=1024)
    now, next_id = 0.0, 0
    for _ in range(running + waiting):
        sched.add(new_request(next_id, rng, now, adapters), now)
        next_id += 1
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        out = sched.schedule(now)
        times.append(time.perf_counter() - start)
        now += 0.02
        for item in out.scheduled:  # advance as if the batch ran
            r = item.request
            r.num_computed_tokens += item.num_new_tokens
            if item.samples:
                r.output_token_ids.append(0)
                if len(r.output_token_ids) >= r.sampling.max_tokens:
                    sched.finish(r, now, completed=True)
                    sched.add(new_request(next_id, rng, now, adapters), now)
                    next_id += 1
        sched.iteration_done(out.scheduled, 0.02, now)
    return times[iterations // 10 :]  # skip the warm-up (initial admissions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--running", type=int, default=256)
    parser.add_argument("--waiting", type=int, default=2000)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--adapters", type=int, default=100)
    args = parser.parse_args()
    print(f"machine: {machine_line()}")
    print(f"{args.running} running, {args.waiting} waiting, {args.adapters} adapters, {args.iterations} decisions")
    print(f"{'policy':<10} {'median ms':>10} {'p99 ms':>8}")
    for name in SCHEDULERS:
        t = sorted(bench(name, args.running, args.waiting, args.iterations, args.adapters))
        print(f"{name:<10} {statistics.median(t) * 1e3:>10.3f} {t[int(len(t) * 0.99) - 1] * 1e3:>8.3f}")


if __name__ == "__main__":
    main()
