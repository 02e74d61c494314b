"""Our engine's wall time against this machine's compute floor, measured in the same run.

    python benchmarks/bench_roofline.py [--quick] [--repeats 2] [--peer-python /tmp/vllm-venv/bin/python]
    python benchmarks/bench_roofline.py --profile [--dtypes float32]   # where the time goes (mixed)

Peak: the best of several large matmuls per dtype (fp32, bf16), `torch.matmul` or oneDNN's packed GEMM
(the engine's own), FLOP/s = 2·n³ / time. The GEMM ceiling: the engine's packed matmuls alone at each
phase's row count (`gemm_rate`), and the share of the floor a run with nothing else would reach.
Floor: the workload's FLOPs / that peak; FLOPs = 2·params·tokens for the layers (every prompt and
decode token), plus 2·hidden·vocab for the LM head on each sampled row (one per request in
prefill, one per decode token), plus attention (QKᵀ and PV: 4·hidden per (query, key) pair, causal),
plus LoRA's 2·r·(in+out) per adapted module on adapter rows. Prefill and decode are counted
separately; their wall time is split by step (a step is "prefill" if it gave any request its first
token). Workload: SmolLM2-135M (`chameleon.assets.smollm2_dir()`; `--model tiny`: bench_peers'
tiny random Llama, 256 x 64 by default), 64 requests x 32 new tokens,
all submitted at once, greedy, EOS ignored; base-only and mixed (round robin: base then 4 PEFT
adapters r8/r16/r8/r16 on q,v, made as bench_peers does). `--peer-python` adds vLLM-cpu's time.
`--baseline DIR` builds a second engine from the chameleon package in DIR (e.g. a `git worktree`
of an older commit) in this same process and interleaves its runs with ours: before/after numbers
from one run, with a token-equality check. `--clock cpu` measures process CPU time instead of wall
time: with one thread (OMP_NUM_THREADS=1) that is immune to a shared machine's time-slicing.
`--profile` instead times the components of one mixed run (after a warm-up) with wall-clock timers
around the functions named in `profile_ours` (their own overhead included), against the floor.
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
from _peer_assets import OFFLINE_ADAPTERS, OFFLINE_TARGETS, make_peft_adapter, make_tiny_model, offline_requests


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


CLOCK = time.perf_counter  # --clock cpu: time.process_time (with one thread: immune to time-slicing)


# --- peak and floor -------------------------------------------------------------------------------


def _best(fn: Any, tries: int) -> float:
    fn()
    best = float("inf")
    for _ in range(tries):
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return best


def matmul_peak(dtype: torch.dtype, n: int, tries: int) -> float:
    """Best FLOP/s of an n x n x n matmul over `tries` runs (after one warm-up): `torch.matmul` (MKL)
    or oneDNN's packed GEMM, the engine's own, whichever is faster on this machine."""
    from chameleon.model.llama import onednn_packing_supported
    from chameleon.model.lm_head import pack, packed_linear

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best = _best(lambda: torch.matmul(a, b), tries)
    if onednn_packing_supported(dtype, torch.device("cpu")):
        packed = pack(b)
        best = min(best, _best(lambda: packed_linear(a, packed), tries))
    return 2 * n**3 / best


def gemm_rate(d: Dims, dtype: torch.dtype, rows: int, tries: int) -> float:
    """FLOP/s of the engine's packed GEMMs alone at this row count: one pass over every layer's
    qkv, o, gate_up and down and the LM head (random weights of the model's shapes, packed as
    `pack_weights` packs them, so they stream from memory as in a real step). The ceiling a step
    could reach if nothing else took time."""
    from chameleon.model.llama import onednn_packing_supported, padded_rows
    from chameleon.model.lm_head import CHUNK_ROWS, pack, packed_linear

    h, kv, i = d.hidden, d.kv_dim, d.inter
    shapes = [(h + 2 * kv, h), (h, h), (2 * i, h), (h, i)] * d.layers
    shapes += [(min(CHUNK_ROWS, d.vocab - c), h) for c in range(0, d.vocab, CHUNK_ROWS)]
    packed = onednn_packing_supported(dtype, torch.device("cpu"))
    mm = packed_linear if packed else torch.nn.functional.linear
    weights = [pack(w) if packed else w for w in (torch.randn(o, k).to(dtype) for o, k in shapes)]
    xs = {k: torch.randn(padded_rows(rows), k).to(dtype) for _, k in shapes}

    def step() -> None:
        for (_, k), w in zip(shapes, weights, strict=True):
            mm(xs[k], w)

    with torch.inference_mode():
        t = _best(step, tries)
    return 2 * rows * sum(o * k for o, k in shapes) / t


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


@attrs.frozen
class Engine:
    """A core and the SamplingParams class of the chameleon it was built from (ours, or --baseline's)."""

    core: Any
    params: Any


def timed_generate(engine: Engine, requests: list[dict[str, Any]]) -> tuple[dict[str, float], list[list[int]]]:
    """All requests at once; time split into prefill steps (gave someone a first token) and the rest."""
    gc.collect()
    core = engine.core
    seen: set[str] = set()
    tokens: dict[str, list[int]] = {r["id"]: [] for r in requests}
    split = {"prefill": 0.0, "decode": 0.0}
    t_start = CLOCK()
    for r in requests:
        core.add_request(
            r["id"],
            r["prompt"],
            engine.params(max_tokens=r["max_tokens"], temperature=0, ignore_eos=True),
            adapter=r["adapter"],
        )
    while core.has_unfinished_requests():
        t0 = CLOCK()
        outs = core.step()
        new = {o.request_id for o in outs if o.token_ids} - seen
        split["prefill" if new else "decode"] += CLOCK() - t0
        seen |= new
        for o in outs:
            tokens[o.request_id].extend(o.token_ids)
    split["total"] = CLOCK() - t_start
    return split, [tokens[r["id"]] for r in requests]


def build_engine(model: Path, adapters: dict[str, Path], dtype: str, source: Path | None = None) -> Engine:
    """Our engine, or (source) the chameleon package of another checkout, imported beside ours."""
    saved = {k: m for k, m in sys.modules.items() if k == "chameleon" or k.startswith("chameleon.")}
    if source is not None:
        for k in saved:
            del sys.modules[k]
        sys.path.insert(0, str(source))
    try:
        import chameleon
        from chameleon.engine.factory import build_core

        config = chameleon.EngineConfig(
            dtype=dtype,  # type: ignore[arg-type]  # float32 / bfloat16, from argparse choices
            max_loras=len(adapters) + 1, max_lora_rank=16, max_num_seqs=256, max_num_batched_tokens=2048
        )
        core = build_core(model, config)
        for name, path in adapters.items():
            core.add_adapter(name, str(path))
        return Engine(core, chameleon.SamplingParams)
    finally:
        if source is not None:
            sys.path.remove(str(source))
            for k in [k for k in sys.modules if k == "chameleon" or k.startswith("chameleon.")]:
                del sys.modules[k]
            sys.modules.update(saved)


def run_ours(
    model: Path,
    adapters: dict[str, Path],
    dtype: str,
    work: dict[str, list[dict[str, Any]]],
    repeats: int,
    baseline: Path | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per engine ("ours", and "baseline" when given) and workload: median (over repeats) prefill /
    decode / total seconds after a warm-up round, and the last run's tokens. With a baseline the
    runs interleave (the order alternates every round), so drift in machine speed hits both alike."""
    engines = {"ours": build_engine(model, adapters, dtype)}
    if baseline is not None:
        engines["baseline"] = build_engine(model, adapters, dtype, baseline)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {e: {k: [] for k in work} for e in engines}
    tokens: dict[str, dict[str, list[list[int]]]] = {e: {} for e in engines}
    for rnd in range(repeats + 1):
        for k, reqs in work.items():
            for e in list(engines)[:: 1 if rnd % 2 == 0 else -1]:
                split, tokens[e][k] = timed_generate(engines[e], reqs)
                if rnd:
                    runs[e][k].append(split)
    return {
        e: {
            k: {**{p: statistics.median(s[p] for s in v) for p in ("prefill", "decode", "total")}, "tokens": tokens[e][k]}
            for k, v in per.items()
        }
        for e, per in runs.items()
    }


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


def profile_ours(
    model: Path, adapters: dict[str, Path], dtype: str, reqs: list[dict[str, Any]], floor_s: float
) -> None:
    """Accumulated wall time per component over one run of `reqs` (bench_peers' timers)."""
    import bench_peers as bp

    import chameleon.executor.torch_executor as te
    from chameleon.lora import pool
    from chameleon.model import attention, llama, lm_head

    engine = build_engine(model, adapters, dtype)
    core = engine.core
    for _ in range(2):
        timed_generate(engine, reqs)
    timer = bp._Timer()
    labels = [
        (core, "step", "step (all)"),
        (core.scheduler, "schedule", "scheduler"),
        (core, "_process", "outputs: stop checks, detokenize"),
        (core.executor, "execute", "executor.execute"),
        (te, "build_attention_metadata", "  attention metadata"),
        (core.executor.lora_pool, "batch", "  LoRA batch layout"),
        (core.executor.model.__class__, "__call__", "  model: layers"),
        (llama, "linear", "    linear(): qkv, gate_up (+ o, down unfused)"),
        (llama.DecoderLayer, "_residual", "    o, down (+ residual)"),
        (llama, "paged_attention", "    attention (cache write + attend)"),
        (attention, "read_kv", "      of which: KV gather"),
        (pool.LoRABatch, "apply_group", "    LoRA deltas (q/k/v, gate/up)"),
        (llama, "rms_norm", "    RMSNorm"),
        (llama, "apply_rope", "    RoPE"),
        (lm_head, "packed_linear", "  LM head matmuls"),
        (core.executor.model, "greedy_tokens", "  LM head + greedy argmax (all)"),
    ]
    for owner, attr, label in labels:
        timer.wrap(owner, attr, label)
    try:
        split, _ = timed_generate(engine, reqs)
    finally:
        timer.restore()
    step = timer.total["step (all)"]
    print(f"profile, ours, {dtype}, mixed: {split['total']:.3f} s ({CLOCK.__name__}) with timers;"
          f" floor {floor_s:.3f} s; components below: wall-clock timers")
    for _, _, label in labels:
        v = timer.total.get(label, 0.0)
        print(f"  {label:46} {v:8.3f} s {v / step:7.1%}")


# --- report -------------------------------------------------------------------------------------


def report(
    peaks: dict[str, float],
    floors: dict[str, dict[str, float]],
    ours: dict[str, dict[str, dict[str, dict[str, Any]]]],
    vllm: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    print(f"machine: {machine_line()}")
    print(
        f"matmul peak (best of {args.tries} at the start and {args.tries} at the end, n={args.n}): "
        + ", ".join(f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items())
    )
    print(
        f"{'dtype':9} {'engine':9} {'workload':8} {'phase':8} {'GFLOP':>8} {'floor s':>9} {'time s':>8}"
        f" {'x floor':>8} {'of peak':>8}"
    )
    for dtype, engines in ours.items():
        for e, per in engines.items():
            for k, split in per.items():
                for phase in ("prefill", "decode", "total"):
                    fl = floors[k][phase]
                    floor_s = fl / peaks[dtype]
                    print(
                        f"{dtype:9} {e:9} {k:8} {phase:8} {fl / 1e9:8.1f} {floor_s:9.3f} {split[phase]:8.3f}"
                        f" {split[phase] / floor_s:7.2f}x {100 * floor_s / split[phase]:7.1f}%"
                    )
    for dtype, engines in ours.items():
        for e, per in engines.items():
            print(f"LoRA overhead ({dtype}, {e}; mixed / base total time): "
                  f"{per['mixed']['total'] / per['base']['total']:.3f}")
        if "baseline" in engines:
            b, o = engines["baseline"], engines["ours"]
            print(f"speed-up over the baseline ({dtype}, total time): "
                  + ", ".join(f"{k} {b[k]['total'] / o[k]['total']:.2f}x" for k in o)
                  + "; tokens identical: "
                  + ", ".join(f"{k} {sum(x == y for x, y in zip(o[k]['tokens'], b[k]['tokens'], strict=True))}"
                              f"/{len(o[k]['tokens'])}" for k in o))
    for dtype, v in vllm.items():
        if isinstance(v, str):
            print(f"vLLM ({dtype}): not run: {v}")
        else:
            print(
                f"vLLM ({dtype}): "
                + ", ".join(
                    f"{k} {t:.3f} s ({t / (floors[k]['total'] / peaks[dtype]):.1f}x floor,"
                    f" ours {t / ours[dtype]['ours'][k]['total']:.2f}x faster)"
                    for k, t in v.items()
                )
            )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fp32 only, 16 requests x 8 tokens, 1 repeat")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2",
                   help="tiny: bench_peers' random Llama (hidden 256, 49k vocabulary), 256 x 64 by default")
    p.add_argument("--requests", type=int, help="default 64 (smollm2) / 256 (tiny)")
    p.add_argument("--max-tokens", type=int, help="default 32 (smollm2) / 64 (tiny)")
    p.add_argument("--n", type=int, default=2048, help="matmul size for the peak")
    p.add_argument("--tries", type=int, default=5)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--peer-python", help="a python with vllm (CPU build) to run beside ours")
    p.add_argument("--profile", action="store_true", help="time the components of one mixed run instead")
    p.add_argument("--baseline", type=Path, help="a checkout of an earlier chameleon, run interleaved with ours")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time (use with OMP_NUM_THREADS=1 on a shared machine)")
    args = p.parse_args(argv)
    tiny = args.model == "tiny"
    args.requests = args.requests or (256 if tiny else 64)
    args.max_tokens = args.max_tokens or (64 if tiny else 32)
    if args.quick:
        args.requests, args.max_tokens, args.repeats, args.n, args.tries = 16, 8, 1, 1024, 3
    return args


def main(argv: Sequence[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from chameleon.assets import smollm2_dir

    global CLOCK
    args = parse_args(argv)
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    dtypes = ["float32"] if args.quick else args.dtypes
    with torch.inference_mode():
        peaks = {d: matmul_peak(getattr(torch, d), args.n, args.tries) for d in dtypes}
    with tempfile.TemporaryDirectory(prefix="bench-roofline-") as tmp:
        model = make_tiny_model(Path(tmp) / "model") if args.model == "tiny" else smollm2_dir()
        dims = Dims.from_config(model)
        tok = AutoTokenizer.from_pretrained(model)
        adapters = {
            name: make_peft_adapter(model, Path(tmp) / name, r, OFFLINE_TARGETS, seed=10 + i)
            for i, (name, r) in enumerate(OFFLINE_ADAPTERS.items())
        }
        mixes: dict[str, list[str | None]] = {"base": [None], "mixed": [None, *adapters]}
        work = {k: offline_requests(tok, args.requests, args.max_tokens, ads) for k, ads in mixes.items()}
        floors = {k: workload_flops(dims, reqs, OFFLINE_ADAPTERS) for k, reqs in work.items()}
        if args.profile:
            print(f"machine: {machine_line()}")
            for d in dtypes:
                profile_ours(model, adapters, d, work["mixed"], floors["mixed"]["total"] / peaks[d])
            return
        ours = {d: run_ours(model, adapters, d, work, args.repeats, args.baseline) for d in dtypes}
        vllm = (
            {d: run_vllm(args.peer_python, model, adapters, d, work, args.repeats) for d in dtypes}
            if args.peer_python
            else {}
        )
    with torch.inference_mode():  # the best of both measurements: the peak the machine gave at all
        peaks = {d: max(p, matmul_peak(getattr(torch, d), args.n, args.tries)) for d, p in peaks.items()}
    prompt_rows = min(sum(len(r["prompt"]) for r in work["base"]), 2048)  # the engine's max_num_batched_tokens
    shapes = {"prefill": prompt_rows, "decode": args.requests}
    ceilings = {d: {ph: (rows, gemm_rate(dims, getattr(torch, d), rows, args.tries)) for ph, rows in shapes.items()}
                for d in dtypes}
    name = "tiny Llama (bench_peers)" if args.model == "tiny" else "SmolLM2-135M"
    print(f"{name}, {args.requests} requests x {args.max_tokens} new tokens, greedy, median of {args.repeats}"
          f", {args.clock} clock")
    report(peaks, floors, ours, vllm, args)
    report_ceilings(peaks, floors, ceilings)


def report_ceilings(
    peaks: dict[str, float], floors: dict[str, dict[str, float]], ceilings: dict[str, dict[str, tuple[int, float]]]
) -> None:
    """What the GEMMs alone allow: their rate at each phase's row count, and the share of the floor a
    run would reach if everything but them took no time (the phases' floors at those rates)."""
    for dtype, per in ceilings.items():
        f = floors["mixed"]
        bound = f["total"] / sum(f[ph] * peaks[dtype] / rate for ph, (_, rate) in per.items())
        print(f"GEMM ceiling ({dtype}, the engine's packed matmuls alone, one pass over the model): "
              + ", ".join(f"{ph} at {rows} rows {rate / 1e9:.1f} GFLOP/s = {rate / peaks[dtype]:.1%} of peak"
                          for ph, (rows, rate) in per.items())
              + f"; a mixed run with nothing else would be at {bound:.1%} of peak")


if __name__ == "__main__":
    main()
