"""KV cache techniques on SmolLM2-135M (real engine, CPU) and on the simulated GPU. Four parts:

    python benchmarks/bench_kv.py quant  [--max-tokens 32]          int8/fp8 KV quality
    python benchmarks/bench_kv.py window [--max-tokens 512]         bounded-window quality and memory
    python benchmarks/bench_kv.py prefix [--reps 3]                 prefix caching TTFT / throughput
    python benchmarks/bench_kv.py inflight                          int8 KV: requests in flight, adapter hits

quant: the same prompts (benchmarks/_peer_assets.PROMPT_TEXTS) through the engine with
`kv_cache_dtype=auto` and each quantized dtype (fp32 model): the share of requests whose whole
output is identical, the mean share of tokens before the first divergence, and perplexity on a
fixed text fed in 16-token chunks through the paged model (each chunk reads the earlier tokens from
the cache, i.e. quantized, or windowed).

window: the same greedy comparison against full KV for `kv_window` = 4 sinks + R recent tokens over
a long generation (>= 10x the window), and perplexity over the first 1,024 tokens of Python's own
LICENSE.txt (a fixed text that ships with the interpreter); the blocks a sequence holds at most.

prefix: the real engine, a chat-style workload (`with_system_prompts`: every adapter has its own
system prompt, each request adds a user turn). A fresh engine per run (adapters resident, a
warm-up request), then two phases: every request alone (TTFT without queueing: the prefill), then
other user turns as one burst through the harness driver (throughput; TTFT with queueing).
Prefix caching off / on interleaved, the order alternating, `--reps` times each; medians.

inflight: what int8 KV does to requests in flight and the adapter hit rate, SIMULATED (A40,
Llama-13B: weights leave ~17 GiB for KV and adapters, so memory binds): the paper's workload,
chameleon policy, kv auto vs int8 at the same rates and seeds.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import attrs
import torch
from _machine import machine_line
from _peer_assets import PROMPT_TEXTS

from chameleon import EngineConfig, SamplingParams
from chameleon.clock import MonotonicClock
from chameleon.config import KVWindow
from chameleon.engine.core import EngineCore
from chameleon.engine.factory import build_core
from chameleon.engine.sequence import sequence_input
from chameleon.executor.base import StepInput
from chameleon.harness.driver import run_workload, warm_up
from chameleon.harness.metrics import summarize
from chameleon.harness.workload import AdapterSpec, Workload, WorkloadRequest, paper_workload, with_system_prompts
from chameleon.memory.kv_blocks import KVBlockManager
from chameleon.model.attention import build_attention_metadata
from chameleon.sched.request import Request
from chameleon.sched.scheduler import ScheduledRequest

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a screw press adapted from wine making. "
    "Before that, books were copied by hand, a slow and expensive process that kept literacy rare. "
    "Within fifty years printing shops had spread to more than two hundred cities across Europe, "
    "and millions of volumes had been produced. Cheaper books changed education, religion and "
    "science: ideas could be shared quickly, checked by many readers and improved in new editions. "
    "Historians often describe the press as one of the inventions that made the modern world, "
    "because it turned knowledge from a scarce possession into a common resource."
)


def greedy(core: EngineCore, prompts: list[list[int]], n: int) -> tuple[list[list[int]], int]:
    """Greedy outputs, and the most KV blocks one sequence held when its step ran."""
    held = [0]

    def observe(step: StepInput) -> None:
        held[0] = max([held[0], *(len(s.block_table) for s in step.sequences)])

    core.observe_steps(observe)
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(str(i), p, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while core.has_unfinished_requests():
        for o in core.step():
            out[o.request_id].extend(o.token_ids)
    core.observe_steps(None)
    return [out[str(i)] for i in range(len(prompts))], held[0]


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[int, float, float]:
    """(outputs identical, mean share before the first divergence, share of tokens agreeing)."""
    same = sum(a == b for a, b in zip(ref, got, strict=True))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) / len(a) for a, b in zip(ref, got)]
    tokens = sum(x == y for a, b in zip(ref, got) for x, y in zip(a, b)) / sum(len(a) for a in ref)
    return same, sum(prefix) / len(prefix), tokens


@torch.inference_mode()
def perplexity(core: EngineCore, ids: list[int], chunk: int = 16) -> float:
    """Next-token perplexity of `ids` through the engine's model and KV cache, `chunk` tokens a
    step, with the engine's own block bookkeeping (so a window slides exactly as in serving)."""
    ex: Any = core.executor
    model, bs = ex.model, ex.block_size
    blocks = KVBlockManager(ex.num_kv_blocks, bs, window=core.config.kv_window)  # the engine is idle
    r = Request("ppl", list(ids), SamplingParams(), 0.0)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start : min(start + chunk, len(ids) - 1)]
        n = len(piece)
        assert blocks.allocate(r, start + n)
        seq = sequence_input(ScheduledRequest(r, n), blocks.window_edges)
        meta = build_attention_metadata(
            [n], [seq.cached_tokens + n], [r.block_table], bs, torch.device("cpu"), [seq.window]
        )
        h = model(torch.tensor(piece), torch.arange(start, start + n), meta, ex.kv_caches, torch.arange(n), None)
        logp = model.logits(h).float().log_softmax(-1)
        target = torch.tensor(ids[start + 1 : start + n + 1])
        nll -= logp[torch.arange(n), target].sum().item()
        count += n
        r.num_computed_tokens += n
        blocks.commit(r)
    return math.exp(nll / count)


def _model(args: argparse.Namespace) -> Path:
    from chameleon.assets import smollm2_dir

    return Path(args.model) if args.model else smollm2_dir()


def part_quant(args: argparse.Namespace) -> None:
    path = _model(args)
    base = build_core(path, EngineConfig(dtype="float32"))
    tok = base.tokenizer
    prompts = [tok(t)["input_ids"] for t in PROMPT_TEXTS]
    ids = tok(TEXT)["input_ids"]
    ref, _ = greedy(base, prompts, args.max_tokens)
    print(f"{'kv dtype':10} {'blocks':>7} {'identical':>10} {'prefix agree':>13} {'tokens agree':>13} {'ppl':>8}")
    print(f"{'auto fp32':10} {base.blocks.num_blocks:7d} {'-':>10} {'-':>13} {'-':>13} {perplexity(base, ids):8.3f}")
    for kv in args.kv:
        core = build_core(path, EngineConfig(dtype="float32", kv_cache_dtype=kv))
        got, _ = greedy(core, prompts, args.max_tokens)
        same, prefix, tokens = agreement(ref, got)
        print(
            f"{kv:10} {core.blocks.num_blocks:7d} {same:4d}/{len(ref):<5d} {prefix:13.3f} {tokens:13.3f} "
            f"{perplexity(core, ids):8.3f}"
        )


def part_window(args: argparse.Namespace) -> None:
    path = _model(args)
    license_text = Path(sysconfig.get_paths()["stdlib"], "LICENSE.txt").read_text(encoding="utf-8")
    full = build_core(path, EngineConfig(dtype="float32"))
    tok = full.tokenizer
    prompts = [tok(t)["input_ids"] for t in PROMPT_TEXTS]
    ids = tok(license_text)["input_ids"][: args.ppl_tokens]
    t0 = time.perf_counter()
    ref, held_full = greedy(full, prompts, args.max_tokens)
    print(
        f"{len(prompts)} prompts x {args.max_tokens} greedy tokens; perplexity over {len(ids)} tokens of "
        f"{Path(sysconfig.get_paths()['stdlib'], 'LICENSE.txt')}; block size 16; full KV took "
        f"{time.perf_counter() - t0:.0f} s"
    )
    head = f"{'kv_window':22} {'blocks/seq':>10} {'identical':>10} {'prefix agree':>13} {'tokens agree':>13} {'ppl':>8}"
    print(head)
    print(f"{'full KV':22} {held_full:10d} {'-':>10} {'-':>13} {'-':>13} {perplexity(full, ids):8.3f}")
    for spec in args.windows:
        recent, _, sink = spec.partition("+")
        window = KVWindow(recent_tokens=int(recent), sink_tokens=int(sink or 4))
        core = build_core(path, EngineConfig(dtype="float32", kv_window=window))
        got, held = greedy(core, prompts, args.max_tokens)
        same, prefix, tokens = agreement(ref, got)
        name = f"{window.sink_tokens} sinks + {window.recent_tokens}"
        print(
            f"{name:22} {held:10d} {same:4d}/{len(ref):<5d} {prefix:13.3f} {tokens:13.3f} {perplexity(core, ids):8.3f}"
        )


# --- prefix caching on the real engine ----------------------------------------------------------------


def chat_workload(args: argparse.Namespace, adapters: list[AdapterSpec], tag: str, seed: int) -> Workload:
    """Adapters round robin, a user turn of 32-96 tokens after each adapter's system prompt; all
    requests arrive at once (the burst phase; the one-at-a-time phase ignores arrivals)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    requests = [
        WorkloadRequest(
            f"{tag}-{i:03d}",
            0.0,
            args.system_len + int(rng.integers(32, 97)),
            args.output_len,
            adapters[i % len(adapters)].name,
        )
        for i in range(args.requests)
    ]
    return with_system_prompts(Workload(requests, adapters, "chat"), args.system_len)


def make_adapters(path: Path, root: Path, n: int, rank: int) -> dict[str, Path]:
    from chameleon.harness.calibrate import write_synthetic_peft_adapter
    from chameleon.model.loader import load_hf_config
    from chameleon.model.spec import model_spec_from_config

    spec = model_spec_from_config(load_hf_config(path))
    shapes = spec.geometry.module_shapes()
    return {
        f"chat{i}-r{rank}": write_synthetic_peft_adapter(
            root / f"chat{i}",
            rank=rank,
            num_layers=spec.num_layers,
            module_shapes=shapes,
            targets=("q_proj", "v_proj"),
            seed=i,
        )
        for i in range(n)
    }


def one_prefix_run(
    path: Path, adapters: dict[str, Path], phases: tuple[Workload, Workload], on: bool, args: argparse.Namespace
) -> dict[str, float]:
    """A fresh engine (adapters resident, warmed up), then: every request of `phases[0]` alone
    (TTFT = its prefill, no queueing), then `phases[1]` (other user turns, same system prompts)
    as one burst (throughput = output tokens / makespan)."""
    from chameleon.harness.driver import prompt_tokens

    clock = MonotonicClock()
    config = EngineConfig(enable_prefix_caching=on, max_num_batched_tokens=args.chunk, num_threads=args.threads)
    core = build_core(path, config, clock=clock)
    for name, p in adapters.items():
        core.add_adapter(name, str(p))
        core.add_request(f"warm-{name}", [5] * 8, SamplingParams(max_tokens=2), adapter=name)  # adapters resident
    while core.has_unfinished_requests():
        core.step()
    warm_up(core, prompt_len=args.system_len)
    alone = []
    for r in phases[0].requests:
        core.add_request(
            r.request_id,
            prompt_tokens(r, core.limits.vocab_size),
            SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0),
            adapter=r.adapter,
        )
        start, first = clock.now(), None
        while core.has_unfinished_requests():
            if any(o.token_ids for o in core.step()) and first is None:
                first = clock.now() - start
        alone.append(first or 0.0)
    start = clock.now()
    records = run_workload(core, phases[1], clock)
    span = clock.now() - start
    burst = summarize(records, slo_ttft_s=5.0, slo_tbt_s=0.15)
    return {
        "alone_p50": statistics.median(alone),
        "alone_p90": sorted(alone)[int(0.9 * (len(alone) - 1))],
        "burst_p50": burst.ttft_p50_s,
        "tok_s": sum(r.output_len for r in records) / span,
        "req_s": len(records) / span,
        "hit": core.stats().prefix.hit_rate or 0.0,
    }


def part_prefix(args: argparse.Namespace) -> None:
    path = _model(args)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(path, Path(tmp), args.adapters, args.rank)
        specs = [AdapterSpec(n, args.rank) for n in adapters]
        phases = (chat_workload(args, specs, "alone", args.seed), chat_workload(args, specs, "burst", args.seed + 1))
        mean_prompt = statistics.mean(r.prompt_len for w in phases for r in w.requests)
        print(
            f"{args.requests} requests alone, then {args.requests} others in one burst; {len(adapters)} adapters "
            f"(rank {args.rank}, q/v), round robin; system prompt {args.system_len} tokens per adapter + a 32-96 "
            f"token user turn (mean prompt {mean_prompt:.0f}); {args.output_len} output tokens; "
            f"max_num_batched_tokens {args.chunk}; fp32; torch threads {args.threads or 'default'}"
        )
        runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for rep in range(args.reps):
            for on in (False, True) if rep % 2 == 0 else (True, False):  # interleaved, order alternating
                r = one_prefix_run(path, adapters, phases, on, args)
                runs[on].append(r)
                print(
                    f"  rep {rep} prefix {'on ' if on else 'off'}: alone TTFT p50 {r['alone_p50'] * 1e3:.0f} ms, "
                    f"burst TTFT p50 {r['burst_p50']:.2f} s, {r['tok_s']:.1f} tok/s, hit {r['hit']:.1%}",
                    flush=True,
                )
    med = {on: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for on, rs in runs.items()}
    print(
        f"{'prefix caching':15} {'alone TTFT p50':>15} {'p90':>8} {'burst TTFT p50':>15} {'tok/s':>7} {'req/s':>6} "
        f"{'prompt hit':>10}"
    )
    for on in (False, True):
        m = med[on]
        print(
            f"{'on' if on else 'off':15} {m['alone_p50'] * 1e3:13.0f}ms {m['alone_p90'] * 1e3:6.0f}ms "
            f"{m['burst_p50']:14.2f}s {m['tok_s']:7.1f} {m['req_s']:6.2f} {m['hit']:10.1%}"
        )
    off, on_ = med[False], med[True]
    print(
        f"on/off, medians of {args.reps}: alone TTFT p50 {on_['alone_p50'] / off['alone_p50']:.2f}x, "
        f"p90 {on_['alone_p90'] / off['alone_p90']:.2f}x; burst TTFT p50 {on_['burst_p50'] / off['burst_p50']:.2f}x; "
        f"throughput {on_['tok_s'] / off['tok_s']:.2f}x"
    )


# --- int8 KV: requests in flight and adapter hits, simulated ----------------------------------------


def part_inflight(args: argparse.Namespace) -> None:
    from chameleon.harness.bench_workload import InFlight
    from chameleon.sim.engine import build_sim_engine

    print(
        f"SIMULATED · {args.gpu} · {args.sim_model} · paper workload (length scale {args.length_scale:g}, "
        f"{args.duration:g} s, seeds {args.seeds}) · chameleon scheduler and cache"
    )
    head = f"{'rate':>5} {'kv':>5} {'KV blocks':>10} {'run mean':>9} {'run max':>8} {'adapter hit':>12} {'P99 TTFT':>9}"
    print(head)
    for rate in args.rates:
        for kv in ("auto", "int8"):
            rows = []
            for seed in range(args.seeds):
                w = paper_workload(rate=rate, duration_s=args.duration, seed=seed)
                w = attrs.evolve(
                    w,
                    requests=[
                        attrs.evolve(
                            r,
                            prompt_len=max(1, round(r.prompt_len * args.length_scale)),
                            output_len=max(1, round(r.output_len * args.length_scale)),
                        )
                        for r in w.requests
                    ],
                )
                config = EngineConfig(kv_cache_dtype=kv, seed=seed)  # type: ignore[arg-type]
                core, clock = build_sim_engine(args.gpu, args.sim_model, config, adapters=w.adapters)
                limit = core.limits.max_model_len
                w = attrs.evolve(
                    w, requests=[attrs.evolve(r, prompt_len=min(r.prompt_len, limit - 1)) for r in w.requests]
                )
                flight = InFlight(core)
                records = run_workload(core, w, clock, on_step=flight)
                st = core.stats()
                s = summarize(records, slo_ttft_s=5.0, slo_tbt_s=0.15)
                rows.append(
                    (st.kv.blocks_total, flight.mean or 0.0, flight.peak, st.adapters.hit_rate or 0.0, s.ttft_p99_s)
                )
            med = [statistics.median(col) for col in zip(*rows, strict=True)]
            print(f"{rate:5g} {kv:>5} {int(med[0]):10d} {med[1]:9.1f} {int(med[2]):8d} {med[3]:12.3f} {med[4]:8.2f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    q = sub.add_parser("quant")
    q.add_argument("--max-tokens", type=int, default=48)
    q.add_argument("--kv", nargs="+", default=["int8", "fp8_e4m3"])
    w = sub.add_parser("window")
    w.add_argument("--max-tokens", type=int, default=512)
    w.add_argument("--windows", nargs="+", default=["32", "64", "128", "64+0"], help="RECENT[+SINKS] (sinks default 4)")
    w.add_argument("--ppl-tokens", type=int, default=1024)
    p = sub.add_parser("prefix")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--system-len", type=int, default=384)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    f = sub.add_parser("inflight")
    f.add_argument("--gpu", default="A40")
    f.add_argument("--sim-model", default="llama-13b")
    f.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0])
    f.add_argument("--duration", type=float, default=120.0)
    f.add_argument("--length-scale", type=float, default=1.0)
    f.add_argument("--seeds", type=int, default=3)
    for s in (q, w, p):
        s.add_argument("--model", type=Path, default=None, help="a model directory (default: SmolLM2-135M)")
    args = ap.parse_args()
    print(machine_line())
    {"quant": part_quant, "window": part_window, "prefix": part_prefix, "inflight": part_inflight}[args.part](args)


if __name__ == "__main__":
    main()
