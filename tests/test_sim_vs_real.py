"""Is the simulator honest? Calibrate it on the real engine here, then compare both on one workload.

The check (issue 6): on this machine, with the tiny model, simulated (with the calibrated profile)
and real P50/P99 TTFT on the same small workload agree within 25%. The workload is open-loop
Poisson at 60% of the capacity that calibration measured, so it loads the machine moderately on
any hardware; its seeds differ from the calibration workload's. To tame the noise of a P99 over a
few hundred requests, the records of two real runs (two workload seeds) are pooled, and compared
with the pooled records of four simulated runs of each workload (different step-time draws).

Wall-clock measurements are only meaningful on a quiet machine: while another process competes
for the CPU, real P99 TTFT triples. So each attempt (calibration + real run) also measures the CPU
time *other* processes used meanwhile (/proc/stat minus our own); an attempt during which they
used more than `MAX_FOREIGN_CORES` is discarded and retried, up to `ATTEMPTS` times, and the test
is skipped (not passed) if the machine never was quiet. Every attempt's numbers are printed
(`pytest -s` shows them).

Being a wall-clock measurement it is not part of the default suite (speed lives in benchmarks, not
in timed tests): run it on a quiet machine with `pytest -m timing -s tests/test_sim_vs_real.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import attrs
import pytest

from chameleon.clock import MonotonicClock
from chameleon.config import EngineConfig
from chameleon.engine.factory import build_core
from chameleon.harness.calibrate import calibrate
from chameleon.harness.driver import run_workload, warm_up
from chameleon.harness.metrics import RunSummary, summarize
from chameleon.harness.workload import Workload, slora_workload
from chameleon.sim.engine import build_sim_engine
from chameleon.sim.profile import CostProfile

TOLERANCE = 0.25
LOAD = 0.6  # of the measured capacity
NUM_REQUESTS = 240
CONFIG = EngineConfig(num_threads=1, scheduler="fifo", adapter_cache="lru")
ATTEMPTS = 2
REAL_RUNS = 2  # workloads (seeds), each run once on the real engine ...
SIM_SEEDS = 4  # ... and this many times on the simulator
MAX_FOREIGN_CORES = 0.25

_T = TypeVar("_T")


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes spent busy since boot (Linux /proc/stat); None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _with_foreign_load(fn: Callable[[], _T]) -> tuple[_T, float]:
    """Run `fn`; also return the cores other processes kept busy meanwhile (0.0 if unknown)."""
    busy0, own0, wall0 = _busy_cpu_s(), sum(os.times()[:4]), time.perf_counter()
    result = fn()
    busy1, own1, wall1 = _busy_cpu_s(), sum(os.times()[:4]), time.perf_counter()
    if busy0 is None or busy1 is None:
        return result, 0.0
    return result, max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)


def _workload(rate: float, seed: int, tag: str) -> Workload:
    w = slora_workload(
        num_adapters=0, alpha=1.0, rate=rate, cv=1.0, duration_s=NUM_REQUESTS / rate,
        input_range=(16, 256), output_range=(8, 48), seed=seed,
    )  # fmt: skip
    return attrs.evolve(w, requests=[attrs.evolve(r, request_id=f"{tag}-{r.request_id}") for r in w.requests])


def _summary(records: list) -> RunSummary:
    return summarize(records, slo_ttft_s=1.0, slo_tbt_s=1.0)


def _compare(model: Path, profile_path: Path, tag: str) -> tuple[RunSummary, RunSummary, float]:
    """Pool the records of `REAL_RUNS` real runs (one workload seed each) and of `SIM_SEEDS`
    simulated runs of each of those workloads (different step-time draws) with the profile."""
    profile = CostProfile.from_json(profile_path)
    rate = LOAD * profile.meta["capacity_rps"]
    workloads = [_workload(rate, seed, f"{tag}s{seed}") for seed in range(REAL_RUNS)]
    core = build_core(model, CONFIG, clock=MonotonicClock())
    warm_up(core)
    real = [rec for w in workloads for rec in run_workload(core, w, core.clock)]
    sim = []
    for w in workloads:
        for seed in range(SIM_SEEDS):
            sim_core, clock = build_sim_engine(
                None, None, _sim_config(profile, seed), profile=profile
            )
            sim += run_workload(sim_core, w, clock)
    return _summary(real), _summary(sim), rate


@pytest.mark.timing
@pytest.mark.slow
def test_simulated_and_real_ttft_agree(tiny_llama: Path, tmp_path: Path) -> None:
    report = []
    for attempt in range(ATTEMPTS):
        path, tag = tmp_path / f"profile{attempt}.json", f"t{attempt}"
        profile, foreign = _with_foreign_load(
            lambda path=path: calibrate(tiny_llama, out_path=path, config=CONFIG, lora_rank=8)  # type: ignore[misc]
        )
        if foreign > MAX_FOREIGN_CORES:  # a busy machine says nothing about the simulator: measure again
            report.append(f"attempt {attempt}: other processes kept {foreign:.2f} cores busy during calibration")
            print(report[-1])
            continue
        (real, sim, rate), foreign = _with_foreign_load(
            lambda path=path, tag=tag: _compare(tiny_llama, path, tag)  # type: ignore[misc]
        )
        ratios = {q: getattr(sim, f"ttft_{q}_s") / getattr(real, f"ttft_{q}_s") for q in ("p50", "p99")}
        report.append(
            f"attempt {attempt} (other processes: {foreign:.2f} cores): "
            f"{rate:.1f} req/s ({LOAD:.0%} of {profile.meta['capacity_rps']:.1f}), "
            f"{REAL_RUNS} x {NUM_REQUESTS} requests | "
            f"TTFT P50 real {real.ttft_p50_s * 1e3:.2f} ms, sim {sim.ttft_p50_s * 1e3:.2f} ms "
            f"({ratios['p50'] - 1:+.0%}) | P99 real {real.ttft_p99_s * 1e3:.2f} ms, sim {sim.ttft_p99_s * 1e3:.2f} ms "
            f"({ratios['p99'] - 1:+.0%}) | step fit median error {profile.meta['step_fit_abs_rel_error_p50']:.0%}"
        )
        print(report[-1])
        assert real.num_finished == REAL_RUNS * NUM_REQUESTS and sim.num_finished == SIM_SEEDS * real.num_finished
        if foreign > MAX_FOREIGN_CORES:
            continue
        assert all(abs(r - 1) <= TOLERANCE for r in ratios.values()), (
            "simulator and real engine disagree by more than 25% on a quiet machine:\n" + "\n".join(report)
        )
        return
    pytest.skip("the machine was never quiet enough to compare wall-clock latencies:\n" + "\n".join(report))


@pytest.mark.slow
def test_calibrate_cli_writes_a_profile_the_bench_accepts(tiny_llama: Path, tmp_path: Path) -> None:
    from chameleon.harness.bench import add_bench_arguments, run_bench
    from chameleon.harness.calibrate import add_calibrate_arguments, run_calibrate

    parser = argparse.ArgumentParser()
    add_calibrate_arguments(parser)
    profile = tmp_path / "profile.json"
    argv = [str(tiny_llama), "--out", str(profile), "--num-threads", "1", "--requests-per-run", "12", "--variability"]
    args = parser.parse_args(argv)
    assert run_calibrate(args) == 0
    data = json.loads(profile.read_text())
    assert data["kind"] == "chameleon.cost_profile" and data["engine"]["max_model_len"] == 512
    assert data["lora_s_per_token_rank"] >= 0 and data["load_Bps"] > 0
    assert data["step_time_ratios"] == sorted(data["step_time_ratios"]) and len(data["step_time_ratios"]) > 10

    bench = argparse.ArgumentParser()
    add_bench_arguments(bench)
    out = tmp_path / "r.json"
    argv = [
        "--executor", "real", "--model", str(tiny_llama), "--policies", "slora", "--rates", "30",
        "--duration", "0.5", "--workload", "slora", "--adapters", "0", "--input-range", "8,64",
        "--output-range", "4,16", "--refine-steps", "0", "--num-threads", "1", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert run_bench(bench.parse_args(argv)) == 0
    real = json.loads(out.read_text())
    assert real["simulated"] is False and real["results"]["slora"]["30"]["num_finished"] == 15


def _sim_config(profile: CostProfile, seed: int) -> EngineConfig:
    """FIFO over an LRU cache with the profiled engine's limits (what this check always ran)."""
    e = profile.engine
    assert e is not None
    return EngineConfig(
        scheduler="fifo",
        adapter_cache="lru",
        seed=seed,
        max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens,
    )
