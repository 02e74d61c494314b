"""GPU readiness check (SPEC §8): kernels vs reference, kernel roofline, engine parity, throughput.

    python -m chameleon.check_gpu [--dry-run] [--json OUT] [--quick]

On a CUDA machine it (a) checks the Triton SGMV shrink/expand kernels against the float64
reference and the torch path in fp16 and bf16 on mixed-rank segment batches, (b) times them with
`triton.testing.do_bench` (median) against the HBM roofline, the bandwidth being measured in the
same run by a large device-to-device copy, (c) runs the real engine on CUDA (Triton LoRA backend)
and compares its greedy tokens with transformers' `generate` on a tiny random Llama built in a
temp dir (LoRA adapters merged into transformers' weights), and (d) measures engine tokens/s.
`--dry-run` runs the same code on CPU, Triton interpreted, fp32, tiny shapes, perf_counter timing;
every number it prints is marked as a dry run. Needs only torch, triton, transformers,
safetensors, attrs. Exit 1 if a correctness check fails, 2 if there is no CUDA (without --dry-run).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

# Max abs error allowed, relative to the reference's largest magnitude (as in tests/test_lora_kernels).
RTOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# Nominal HBM bandwidth (GB/s) by device-name substring; the measured copy bandwidth comes first.
NOMINAL_GBPS: dict[str, float] = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100": 1555.0,
    "L40S": 864.0,
    "L4": 300.0,
    "A10": 600.0,
    "4090": 1008.0,
    "V100": 900.0,
}
TARGETS = ("q_proj", "v_proj")


@attrs.frozen
class Mode:
    """Everything that differs between a CUDA run and a dry run, decided once in `make_mode`."""

    dry_run: bool
    quick: bool
    device: torch.device
    kernel_dtypes: tuple[torch.dtype, ...]
    # (tokens, in_features, out_features) of each kernel batch.
    kernel_shapes: tuple[tuple[int, int, int], ...]
    ranks: tuple[int, ...]
    copy_mib: int
    parity_model: dict[str, int]
    parity_requests: int
    parity_tokens: int
    tput_model: dict[str, int]
    tput_dtype: str
    tput_requests: int
    tput_tokens: int


TINY_LLAMA: dict[str, int] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
GPU_LLAMA: dict[str, int] = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
}


def make_mode(dry_run: bool, quick: bool) -> Mode:
    """Shapes and sizes: tiny and fp32 for the CPU dry run, realistic on CUDA (smaller with --quick)."""
    if dry_run:
        return Mode(
            dry_run=True,
            quick=quick,
            device=torch.device("cpu"),
            kernel_dtypes=(torch.float32,),
            kernel_shapes=((40, 64, 96),),
            ranks=(8, 16, 4, 32),
            copy_mib=16,
            parity_model=TINY_LLAMA,
            parity_requests=3,
            parity_tokens=5,
            tput_model=TINY_LLAMA,
            tput_dtype="float32",
            tput_requests=4,
            tput_tokens=4,
        )
    shapes = ((256, 2048, 2048),) if quick else ((64, 2048, 2048), (512, 4096, 4096), (2048, 4096, 1024))
    return Mode(
        dry_run=False,
        quick=quick,
        device=torch.device("cuda"),
        kernel_dtypes=(torch.float16, torch.bfloat16),
        kernel_shapes=shapes,
        ranks=(8, 16, 32, 64, 128, 8, 16),
        copy_mib=1024,
        parity_model=TINY_LLAMA,
        parity_requests=8,
        parity_tokens=16,
        tput_model=GPU_LLAMA,
        tput_dtype="bfloat16",
        tput_requests=32 if quick else 128,
        tput_tokens=32 if quick else 128,
    )


# --- timing -------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], mode: Mode) -> float:
    """Median milliseconds: `triton.testing.do_bench` on CUDA, perf_counter medians in a dry run."""
    if not mode.dry_run:
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def nominal_gbps(mode: Mode) -> float | None:
    """The datasheet HBM bandwidth of this GPU, when its name is in `NOMINAL_GBPS`."""
    if mode.dry_run:
        return None
    name = torch.cuda.get_device_name(mode.device)
    return next((v for k, v in NOMINAL_GBPS.items() if k in name), None)


def measure_bandwidth(mode: Mode) -> dict[str, Any]:
    """Device bandwidth from a large device-to-device copy (bytes read + written / median time)."""
    n = mode.copy_mib * (1 << 20) // 4
    src = torch.randn(n, device=mode.device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), mode)
    gbps = 2 * n * 4 / ms / 1e6
    return {"copy_mib": mode.copy_mib, "copy_ms": ms, "measured_gbps": gbps, "nominal_gbps": nominal_gbps(mode)}


# --- (a) + (b) kernels ------------------------------------------------------------------------


@attrs.frozen
class KernelBatch:
    """A mixed batch: base-only rows between segments of adapters of different ranks."""

    x: torch.Tensor
    a_pool: torch.Tensor
    b_pool: torch.Tensor
    segs: Any  # chameleon.lora.ops.LoRASegments (on the kernel device)
    cpu_segs: Any


def make_kernel_batch(
    tokens: int, d_in: int, d_out: int, ranks: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int
) -> KernelBatch:
    """Random segment lengths over ~90% of the rows, a base-only gap before each segment."""
    from chameleon.lora.ops import LoRASegments

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lora_rows = tokens - tokens // 10
    cuts = sorted(rng.sample(range(1, lora_rows), len(ranks) - 1))
    lens = [b - a for a, b in zip([0, *cuts], [*cuts, lora_rows])]
    gaps = [rng.randint(0, 1) if i else 0 for i in range(len(ranks))]
    starts, pos = [], 0
    for gap, n in zip(gaps, lens):
        starts.append(pos + gap)
        pos += gap + n
    total = max(pos, tokens)
    rows = [sum(ranks[:i]) + 2 * i for i in range(len(ranks))]  # free rows between adapters
    height = rows[-1] + ranks[-1] + 3
    x = torch.randn(total, d_in, generator=gen).to(dtype)
    a_pool = (torch.randn(height, d_in, generator=gen) / d_in**0.5).to(dtype)
    b_pool = (torch.randn(height, d_out, generator=gen) * 0.5).to(dtype)
    args = (starts, lens, rows, list(ranks), total)
    return KernelBatch(
        x.to(device),
        a_pool.to(device),
        b_pool.to(device),
        LoRASegments.build(*args, device),
        LoRASegments.build(*args, "cpu"),
    )


def rel_err(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max(|want|, 1)) in float64 on the CPU."""
    if want.numel() == 0:
        return 0.0, 0.0
    err = (got.double().cpu() - want.double().cpu()).abs().max().item()
    return err, err / max(want.double().abs().max().item(), 1.0)


def reference_shrink(b: KernelBatch) -> torch.Tensor:
    """Float64 v[T, max_rank] by a loop over segments."""
    s = b.cpu_segs
    x, a = b.x.double().cpu(), b.a_pool.double().cpu()
    v = torch.zeros(s.num_tokens, s.max_rank, dtype=torch.float64)
    for st, n, r, k in zip(s.starts, s.lens, s.rows, s.ranks):
        v[st : st + n, :k] = x[st : st + n] @ a[r : r + k].T
    return v


def kernel_errors(b: KernelBatch) -> dict[str, float]:
    """Triton shrink / apply vs float64 reference, and Triton apply vs the torch path (same dtype)."""
    from chameleon.lora.ops import lora_apply, lora_shrink, reference_lora

    out: dict[str, float] = {}
    out["shrink_abs"], out["shrink_rel"] = rel_err(
        lora_shrink(b.x, b.a_pool, b.segs, backend="triton"), reference_shrink(b)
    )
    ref = reference_lora(b.x, b.a_pool, b.b_pool, b.cpu_segs)
    ys = {}
    for backend in ("triton", "torch"):
        ys[backend] = torch.zeros(b.x.shape[0], b.b_pool.shape[1], dtype=b.x.dtype, device=b.x.device)
        lora_apply(ys[backend], b.x, b.a_pool, b.b_pool, b.segs, backend=backend)  # type: ignore[arg-type]
    out["apply_abs"], out["apply_rel"] = rel_err(ys["triton"], ref)
    out["torch_path_rel"] = rel_err(ys["torch"], ref)[1]
    out["triton_vs_torch_rel"] = rel_err(ys["triton"], ys["torch"].double())[1]
    return out


def kernel_bytes(b: KernelBatch) -> dict[str, int]:
    """Minimum DRAM traffic: each adapter row read once, x read, v written and read, y read+written."""
    s, elem = b.cpu_segs, b.x.element_size()
    d_in, d_out = b.x.shape[1], b.b_pool.shape[1]
    covered, r_sum = sum(s.lens), sum(s.ranks)
    shrink = (covered * d_in + r_sum * d_in + s.num_tokens * s.max_rank) * elem
    expand = (covered * s.max_rank + r_sum * d_out + 2 * covered * d_out) * elem
    return {"shrink": shrink, "expand": expand, "apply": shrink + expand}


def kernel_timings(b: KernelBatch, mode: Mode, bw_gbps: float) -> dict[str, Any]:
    """Median ms of shrink / expand / apply per backend; Triton's GB/s and fraction of the roofline."""
    from chameleon.lora.ops import lora_apply, lora_expand, lora_shrink

    y = torch.zeros(b.x.shape[0], b.b_pool.shape[1], dtype=b.x.dtype, device=b.x.device)
    v = lora_shrink(b.x, b.a_pool, b.segs, backend="triton")
    nbytes = kernel_bytes(b)
    out: dict[str, Any] = {}
    for backend in ("triton", "torch"):
        be: Any = backend
        fns: dict[str, Callable[[], object]] = {
            "shrink": functools.partial(lora_shrink, b.x, b.a_pool, b.segs, backend=be),
            "expand": functools.partial(lora_expand, y, v, b.b_pool, b.segs, backend=be),
            "apply": functools.partial(lora_apply, y, b.x, b.a_pool, b.b_pool, b.segs, backend=be),
        }
        for op, fn in fns.items():
            ms = time_ms(fn, mode)
            gbps = nbytes[op] / ms / 1e6
            out[f"{backend}_{op}"] = {
                "ms": ms,
                "bytes": nbytes[op],
                "gbps": gbps,
                "roofline_frac": gbps / bw_gbps,
                "floor_ms": nbytes[op] / bw_gbps / 1e6,
            }
    return out


def run_kernel_checks(mode: Mode, bw_gbps: float) -> list[dict[str, Any]]:
    """Every (dtype, shape): errors with pass/fail, then timings against the roofline."""
    results = []
    for dtype in mode.kernel_dtypes:
        for i, (t, d_in, d_out) in enumerate(mode.kernel_shapes):
            b = make_kernel_batch(t, d_in, d_out, mode.ranks, dtype, mode.device, seed=17 + i)
            errs = kernel_errors(b)
            tol = RTOL[dtype]
            passed = max(errs["shrink_rel"], errs["apply_rel"]) <= tol
            results.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "tokens": b.x.shape[0],
                    "in": d_in,
                    "out": d_out,
                    "ranks": list(mode.ranks),
                    "tol_rel": tol,
                    "passed": passed,
                    "errors": errs,
                    "timings": kernel_timings(b, mode, bw_gbps),
                }
            )
    return results


# --- (c) + (d) the engine -----------------------------------------------------------------------


def save_llama(path: Path, dims: dict[str, Any], seed: int = 0) -> Path:
    """A random Llama saved as safetensors, no tokenizer (prompts are token ids); nothing downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        max_position_embeddings=1024,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **dims,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def save_adapter(path: Path, dims: dict[str, int], rank: int, seed: int) -> Path:
    """A PEFT-format LoRA (q_proj, v_proj) written directly: adapter_config.json + safetensors."""
    from safetensors.torch import save_file

    h, heads, kv = dims["hidden_size"], dims["num_attention_heads"], dims["num_key_value_heads"]
    out_f = {"q_proj": h, "v_proj": h // heads * kv}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(dims["num_hidden_layers"]):
        for mod in TARGETS:
            key = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, h, generator=gen) / h**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f[mod], rank, generator=gen) * 0.05
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS),
        "bias": "none",
        "lora_dropout": 0.0,
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def merged_hf_model(model_dir: Path, adapter: Path | None, device: torch.device) -> torch.nn.Module:
    """transformers' Llama in fp32 with the adapter merged into its weights: W += (alpha/r)·B·A."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    if adapter is not None:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        w = load_file(str(adapter / "adapter_model.safetensors"))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key in {k.removesuffix(".lora_A.weight") for k in w if k.endswith(".lora_A.weight")}:
                name = key.removeprefix("base_model.model.") + ".weight"
                params[name] += scale * w[f"{key}.lora_B.weight"] @ w[f"{key}.lora_A.weight"]
    return model.to(device)


def hf_greedy(model: Any, prompt: list[int], n: int, device: torch.device) -> list[int]:
    """transformers' generate, one request (no padding), exactly n greedy tokens."""
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt) :].tolist()]


def make_core(model_dir: Path, adapters: dict[str, Path], mode: Mode, dtype: Any, max_seqs: int) -> Any:
    """The real engine on the mode's device, Triton LoRA backend, a 1 GiB memory budget. The test
    models have no tokenizer on purpose, so the factory's warning about that is silenced."""
    from chameleon import EngineConfig
    from chameleon.factory import build_core

    cfg = EngineConfig(
        device="cuda" if mode.device.type == "cuda" else "cpu",
        dtype=dtype,
        lora_backend="triton",
        max_loras=len(adapters) + 1,
        max_lora_rank=16,
        max_model_len=512,
        device_memory_bytes=1 << 30,
        max_num_seqs=max_seqs,
    )
    factory_log = logging.getLogger(build_core.__module__)
    level = factory_log.level
    factory_log.setLevel(logging.ERROR)
    try:
        core = build_core(model_dir, cfg)
    finally:
        factory_log.setLevel(level)
    for name, path in adapters.items():
        core.add_adapter(name, str(path))
    return core


def engine_generate(core: Any, requests: list[tuple[list[int], str | None]], n: int) -> tuple[float, list[list[int]]]:
    """All requests submitted at once, stepped to completion: (seconds, tokens per request)."""
    from chameleon import SamplingParams

    got: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    t0 = time.perf_counter()
    for i, (prompt, adapter) in enumerate(requests):
        core.add_request(str(i), prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter=adapter)
    while core.has_unfinished_requests():
        for out in core.step():
            got[out.request_id].extend(out.token_ids)
    return time.perf_counter() - t0, [got[str(i)] for i in range(len(requests))]


def make_requests(vocab: int, n: int, adapters: Sequence[str | None], seed: int) -> list[tuple[list[int], str | None]]:
    """n random-token prompts of 3..40 tokens, adapters round robin (None = base)."""
    rng = random.Random(seed)
    return [
        ([rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))], adapters[i % len(adapters)]) for i in range(n)
    ]


def run_parity(root: Path, mode: Mode) -> dict[str, Any]:
    """Greedy fp32 tokens of the engine (base rows and two LoRA adapters) vs merged transformers."""
    dims = mode.parity_model
    model_dir = save_llama(root / "parity-model", dims)
    adapters = {f"r{r}": save_adapter(root / f"parity-r{r}", dims, r, seed=r) for r in (8, 16)}
    reqs = make_requests(dims["vocab_size"], mode.parity_requests, [None, *adapters], seed=1)
    core = make_core(model_dir, adapters, mode, "float32", 64)
    _, ours = engine_generate(core, reqs, mode.parity_tokens)
    oracle: list[list[int]] = []
    for name in [None, *adapters]:
        hf = merged_hf_model(model_dir, adapters[name] if name else None, mode.device)
        oracle += [hf_greedy(hf, p, mode.parity_tokens, mode.device) for p, a in reqs if a == name]
    order = [i for name in [None, *adapters] for i, (_, a) in enumerate(reqs) if a == name]
    mismatched = [i for k, i in enumerate(order) if ours[i] != oracle[k]]
    return {
        "requests": len(reqs),
        "new_tokens": mode.parity_tokens,
        "identical": len(reqs) - len(mismatched),
        "mismatched_requests": mismatched,
        "passed": not mismatched,
    }


def run_throughput(root: Path, mode: Mode) -> dict[str, Any]:
    """Engine tokens/s, base-only and mixed (two adapters round robin with base), after a warm-up."""
    dims = mode.tput_model
    model_dir = save_llama(root / "tput-model", dims)
    adapters = {f"r{r}": save_adapter(root / f"tput-r{r}", dims, r, seed=r) for r in (8, 16)}
    core = make_core(model_dir, adapters, mode, mode.tput_dtype, mode.tput_requests)
    engine_generate(core, make_requests(dims["vocab_size"], 2, [None, *adapters], seed=9), 2)  # warm-up
    out: dict[str, Any] = {
        "dtype": mode.tput_dtype,
        "requests": mode.tput_requests,
        "new_tokens": mode.tput_tokens,
        "model": dims,
    }
    mixes: dict[str, list[str | None]] = {"base": [None], "mixed": [None, *adapters]}
    for mix, ads in mixes.items():
        reqs = make_requests(dims["vocab_size"], mode.tput_requests, ads, seed=2)
        secs, toks = engine_generate(core, reqs, mode.tput_tokens)
        out[f"{mix}_tok_s"] = sum(len(t) for t in toks) / secs
        out[f"{mix}_s"] = secs
    out["lora_overhead"] = out["base_tok_s"] / out["mixed_tok_s"]
    return out


# --- report -------------------------------------------------------------------------------------


def table_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(check, case, value, status) rows for the one printed table."""
    bw = res["bandwidth"]
    nominal = f" (nominal {bw['nominal_gbps']:.0f})" if bw["nominal_gbps"] else ""
    rows = [("bandwidth", f"D2D copy {bw['copy_mib']} MiB", f"{bw['measured_gbps']:.1f} GB/s{nominal}", "")]
    for k in res["kernels"]:
        case = f"{k['dtype']} T={k['tokens']} {k['in']}->{k['out']}"
        e = k["errors"]
        rows.append(
            (
                "kernel error",
                case,
                (
                    f"shrink {e['shrink_rel']:.1e} apply {e['apply_rel']:.1e} "
                    f"(tol {k['tol_rel']:.0e}; vs torch {e['triton_vs_torch_rel']:.1e})"
                ),
                "PASS" if k["passed"] else "FAIL",
            )
        )
        for op in ("shrink", "expand", "apply"):
            tr, to = k["timings"][f"triton_{op}"], k["timings"][f"torch_{op}"]
            rows.append(
                (
                    "kernel time",
                    f"{case} {op}",
                    (
                        f"triton {tr['ms'] * 1e3:.1f} us {tr['gbps']:.3g} GB/s "
                        f"= {100 * tr['roofline_frac']:.3g}% roofline | torch {to['ms'] * 1e3:.1f} us"
                    ),
                    "",
                )
            )
    p = res["parity"]
    rows.append(
        (
            "engine parity",
            f"fp32 {p['requests']} req x {p['new_tokens']} tok, base + r8/r16",
            f"{p['identical']}/{p['requests']} token-identical",
            "PASS" if p["passed"] else "FAIL",
        )
    )
    t = res["throughput"]
    rows.append(
        (
            "throughput",
            f"{t['dtype']} {t['requests']} req x {t['new_tokens']} tok",
            (
                f"base {t['base_tok_s']:.1f} tok/s, mixed {t['mixed_tok_s']:.1f} tok/s "
                f"(LoRA overhead {t['lora_overhead']:.2f}x)"
            ),
            "",
        )
    )
    return rows


def print_table(res: dict[str, Any]) -> None:
    """One table; every row carries DRY in its status column in a dry run."""
    rows = table_rows(res)
    dry = res["dry_run"]
    head = f"chameleon check_gpu on {res['device_name']}" + (
        " -- DRY RUN (CPU, Triton interpreted, numbers are NOT GPU numbers)" if dry else ""
    )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print(head)
    for check, case, value, status in rows:
        tag = (status + " DRY").strip() if dry else status
        print(f"{check:<{widths[0]}} | {case:<{widths[1]}} | {value:<{widths[2]}} | {tag}")
    print(f"overall: {'PASS' if res['passed'] else 'FAIL'}" + (" (dry run)" if dry else ""))


# --- main ---------------------------------------------------------------------------------------


def ensure_interpreter(dry_run: bool) -> None:
    """In a dry run the kernels must be defined under TRITON_INTERPRET=1: set it, or re-exec if
    chameleon.lora.triton_ops was already imported without it."""
    if not dry_run:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    mod = sys.modules.get("chameleon.lora.triton_ops")
    if mod is not None and not getattr(mod, "INTERPRETED", False):
        os.execv(sys.executable, [sys.executable, "-m", "chameleon.check_gpu", *sys.argv[1:]])


def quiet_transformers() -> None:
    """No progress bars or info lines from transformers: the table is the output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chameleon.check_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes, fp32")
    p.add_argument("--json", type=Path, help="write every number here")
    p.add_argument("--quick", action="store_true", help="fewer shapes and a shorter throughput run")
    return p.parse_args(argv)


def run_all(mode: Mode) -> dict[str, Any]:
    """All four checks; `passed` is the conjunction of the correctness checks."""
    clock = [time.perf_counter()]
    elapsed: dict[str, float] = {}

    def lap(name: str) -> None:
        clock.append(time.perf_counter())
        elapsed[name] = clock[-1] - clock[-2]

    bw = measure_bandwidth(mode)
    kernels = run_kernel_checks(mode, bw["measured_gbps"])
    lap("kernels_s")
    with tempfile.TemporaryDirectory(prefix="chameleon-check-gpu-") as tmp:
        parity = run_parity(Path(tmp), mode)
        lap("parity_s")
        tput = run_throughput(Path(tmp), mode)
        lap("throughput_s")
    name = "cpu (dry run)" if mode.dry_run else torch.cuda.get_device_name(mode.device)
    passed = all(k["passed"] for k in kernels) and parity["passed"]
    return {
        "dry_run": mode.dry_run,
        "quick": mode.quick,
        "device_name": name,
        "torch": torch.__version__,
        "bandwidth": bw,
        "kernels": kernels,
        "parity": parity,
        "throughput": tput,
        "elapsed": elapsed,
        "passed": passed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_interpreter(args.dry_run)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_transformers()
    if not args.dry_run and not torch.cuda.is_available():
        print("check_gpu: no CUDA device here; use --dry-run to exercise the same code on CPU", file=sys.stderr)
        return 2
    from chameleon.lora import triton_ops

    if args.dry_run != triton_ops.INTERPRETED:
        print("check_gpu: triton_ops was defined with the wrong TRITON_INTERPRET setting", file=sys.stderr)
        return 2
    with torch.inference_mode():
        res = run_all(make_mode(args.dry_run, args.quick))
    print_table(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
