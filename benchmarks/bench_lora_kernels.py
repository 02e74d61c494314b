"""Benchmark the batched multi-LoRA kernels (chameleon.lora.ops).

CPU: our torch path (`lora_apply`, segment-grouped) vs what PEFT does for a mixed-adapter batch
(per adapter: gather its rows, run A then B, scatter-add back), implemented in plain torch, and
optionally the real `peft` LoraLayer forward with `adapter_names=` (includes the base matmul, so
it is compared against base + lora_apply).
CUDA (if present): triton vs torch path with `triton.testing.do_bench`, achieved GB/s vs a roofline.

Usage: python benchmarks/bench_lora_kernels.py [--hidden 576 2048] [--tokens 64 512] ...
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without install

from chameleon.lora.ops import LoRASegments, lora_apply, reference_lora  # noqa: E402

BASE = "__base__"  # PEFT's name for "no adapter" rows


@attrs.frozen
class Batch:
    """One mixed batch in both layouts: our pool + segments, and PEFT's per-adapter weights."""

    x: torch.Tensor
    a_pool: torch.Tensor
    b_pool: torch.Tensor
    segs: LoRASegments
    names: list[str]  # adapter name per token row (PEFT's adapter_names)
    lora_a: dict[str, torch.Tensor]  # [r, in]
    lora_b: dict[str, torch.Tensor]  # [out, r], unscaled
    scaling: dict[str, float]


def make_batch(
    tokens: int, hidden: int, ranks: Sequence[int], base_frac: float, dtype: torch.dtype, seed: int
) -> Batch:
    """Rows grouped by adapter (the engine sorts requests by adapter), a tail of base-only rows."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n_adapters = len(ranks)
    lora_tokens = tokens - int(tokens * base_frac)
    # Random split of lora_tokens rows over the adapters, each >= 1 row.
    cuts = sorted(rng.sample(range(1, lora_tokens), n_adapters - 1))
    lens = [b - a for a, b in zip([0, *cuts], [*cuts, lora_tokens])]
    starts = [sum(lens[:i]) for i in range(n_adapters)]
    rows = [sum(ranks[:i]) for i in range(n_adapters)]
    names = [f"a{i}" for i in range(n_adapters)]
    lora_a = {n: torch.randn(r, hidden, generator=gen, dtype=dtype) / hidden**0.5 for n, r in zip(names, ranks)}
    lora_b = {n: torch.randn(hidden, r, generator=gen, dtype=dtype) for n, r in zip(names, ranks)}
    scaling = {n: 16.0 / r for n, r in zip(names, ranks)}
    a_pool = torch.cat([lora_a[n] for n in names])
    b_pool = torch.cat([lora_b[n].T * scaling[n] for n in names]).contiguous()
    row_names = [n for n, ln in zip(names, lens) for _ in range(ln)] + [BASE] * (tokens - lora_tokens)
    segs = LoRASegments.build(starts, lens, rows, ranks, tokens, "cpu")
    x = torch.randn(tokens, hidden, generator=gen, dtype=dtype)
    return Batch(x, a_pool, b_pool, segs, row_names, lora_a, lora_b, scaling)


# --- baselines --------------------------------------------------------------------------------


def peft_style_loop(y: torch.Tensor, x: torch.Tensor, b: Batch) -> None:
    """LoraLayer._mixed_batch_forward, minus the base layer: python index lists built every call,
    fancy-index gather, lora_B(lora_A(sub)) * scaling, fancy-index += back."""
    names = b.names
    for adapter in set(names):
        if adapter == BASE:
            continue
        idx = [i for i, item in enumerate(names) if item == adapter]
        sub = x[idx]
        out = F.linear(F.linear(sub, b.lora_a[adapter]), b.lora_b[adapter]) * b.scaling[adapter]
        y[idx] += out


def mask_index_add_loop(y: torch.Tensor, x: torch.Tensor, b: Batch, ids: torch.Tensor) -> None:
    """The tensor-only variant: boolean mask -> nonzero -> index_select, run adapter, index_add_."""
    for k, adapter in enumerate(b.lora_a):
        idx = (ids == k).nonzero().squeeze(1)
        sub = x.index_select(0, idx)
        out = F.linear(F.linear(sub, b.lora_a[adapter]), b.lora_b[adapter]) * b.scaling[adapter]
        y.index_add_(0, idx, out)


def make_peft_layer(b: Batch, hidden: int, dtype: torch.dtype) -> torch.nn.Module | None:
    """A real peft lora.Linear with every adapter loaded, or None if peft is unavailable."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return None

    def config(name: str) -> LoraConfig:
        return LoraConfig(r=b.lora_a[name].shape[0], lora_alpha=16, lora_dropout=0.0, init_lora_weights=False)

    base = torch.nn.Linear(hidden, hidden, bias=False, dtype=dtype)
    first, *rest = list(b.lora_a)
    layer = LoraLinear(base, first, config(first), r=b.lora_a[first].shape[0], lora_alpha=16)
    for name in rest:
        layer.update_layer(name, r=b.lora_a[name].shape[0], lora_alpha=16, config=config(name))
    with torch.no_grad():
        for name in b.lora_a:
            layer.lora_A[name].weight.copy_(b.lora_a[name])
            layer.lora_B[name].weight.copy_(b.lora_b[name])
    return layer.to(dtype).eval()


# --- timing -----------------------------------------------------------------------------------


def interleaved_median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median wall time per function, running them round-robin so that load from other processes
    on a shared machine hits every contender alike (the ratios stay meaningful)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def check_agreement(b: Batch) -> float:
    """Max relative disagreement of our path and the PEFT-style loop vs the float64 reference."""
    ref = reference_lora(b.x, b.a_pool, b.b_pool, b.segs)
    ours, theirs = torch.zeros(b.x.shape[0], ref.shape[1], dtype=b.x.dtype), None
    lora_apply(ours, b.x, b.a_pool, b.b_pool, b.segs)
    theirs = torch.zeros_like(ours)
    peft_style_loop(theirs, b.x, b)
    scale = ref.abs().max().item()
    return max((t.double() - ref).abs().max().item() / scale for t in (ours, theirs))


def bench_cpu_config(tokens: int, hidden: int, ranks: Sequence[int], args: argparse.Namespace) -> None:
    dtype = torch.float32
    b = make_batch(tokens, hidden, ranks, args.base_frac, dtype, seed=tokens * 7 + hidden)
    err = check_agreement(b)
    y = torch.zeros(tokens, hidden, dtype=dtype)
    ids = torch.tensor([int(n[1:]) if n != BASE else -1 for n in b.names])
    fns: dict[str, Callable[[], object]] = {
        "ours": lambda: lora_apply(y, b.x, b.a_pool, b.b_pool, b.segs),
        "peft_loop": lambda: peft_style_loop(y, b.x, b),
        "mask": lambda: mask_index_add_loop(y, b.x, b, ids),
    }
    layer = make_peft_layer(b, hidden, dtype) if args.real_peft else None
    if layer is not None:
        base = layer.base_layer
        want = base(b.x)
        lora_apply(want, b.x, b.a_pool, b.b_pool, b.segs)
        got = layer(b.x, adapter_names=b.names)
        err = max(err, (got - want).abs().max().item() / want.abs().max().item())
        fns["peft_real"] = lambda: layer(b.x, adapter_names=b.names)
        fns["base_ours"] = lambda: lora_apply(base(b.x), b.x, b.a_pool, b.b_pool, b.segs)
    t = interleaved_median_ms(fns, args.repeats)
    line = (
        f"T={tokens:4d} h={hidden:5d} G={b.segs.num_segments} | "
        f"ours {t['ours']:6.3f} ms | peft-loop {t['peft_loop']:6.3f} ms ({t['peft_loop'] / t['ours']:5.2f}x) | "
        f"mask+index_add {t['mask']:6.3f} ms ({t['mask'] / t['ours']:5.2f}x)"
    )
    if layer is not None:
        line += (
            f" || incl. base matmul: peft.Linear {t['peft_real']:7.3f} ms vs base+ours "
            f"{t['base_ours']:7.3f} ms ({t['peft_real'] / t['base_ours']:5.2f}x)"
        )
    print(line + f" | max rel err vs fp64 ref / peft {err:.1e}", flush=True)


# --- CUDA -------------------------------------------------------------------------------------


def lora_bytes(b: Batch, elem: int) -> tuple[int, int]:
    """Minimum DRAM traffic of shrink and expand (each adapter row read once, v written/read)."""
    t, h = b.x.shape
    r_sum = sum(b.segs.ranks)
    covered = sum(b.segs.lens)
    shrink = (covered * h + r_sum * h + t * b.segs.max_rank) * elem
    expand = (covered * b.segs.max_rank + r_sum * h + 2 * covered * h) * elem
    return shrink, expand


def bench_cuda_config(tokens: int, hidden: int, ranks: Sequence[int], args: argparse.Namespace) -> None:
    import triton.testing

    from chameleon.lora.ops import lora_expand, lora_shrink

    dtype = torch.bfloat16
    cpu = make_batch(tokens, hidden, ranks, args.base_frac, dtype, seed=tokens * 7 + hidden)
    dev = torch.device("cuda")
    s = cpu.segs
    segs = LoRASegments.build(s.starts, s.lens, s.rows, s.ranks, s.num_tokens, dev)
    x, a_pool, b_pool = cpu.x.to(dev), cpu.a_pool.to(dev), cpu.b_pool.to(dev)
    y = torch.zeros(tokens, hidden, dtype=dtype, device=dev)
    ref = reference_lora(cpu.x, cpu.a_pool, cpu.b_pool, s)
    lora_apply(y, x, a_pool, b_pool, segs, backend="triton")
    err = (y.double().cpu() - ref).abs().max().item() / ref.abs().max().item()
    shrink_bytes, expand_bytes = lora_bytes(cpu, x.element_size())
    v = lora_shrink(x, a_pool, segs, backend="triton")
    res = {}
    for backend in ("torch", "triton"):
        res[backend] = (
            triton.testing.do_bench(lambda: lora_shrink(x, a_pool, segs, backend=backend)),
            triton.testing.do_bench(lambda: lora_expand(y, v, b_pool, segs, backend=backend)),
            triton.testing.do_bench(lambda: lora_apply(y, x, a_pool, b_pool, segs, backend=backend)),
        )
    (ts, te, ta), (ps, pe, pa) = res["torch"], res["triton"]
    gbps_s, gbps_e = shrink_bytes / ps / 1e6, expand_bytes / pe / 1e6
    print(
        f"T={tokens:4d} h={hidden:5d} G={s.num_segments} | triton shrink {ps * 1e3:7.1f} us "
        f"({gbps_s:6.0f} GB/s, {100 * gbps_s / args.peak_gbps:4.1f}% of {args.peak_gbps:.0f}) "
        f"expand {pe * 1e3:7.1f} us ({gbps_e:6.0f} GB/s, {100 * gbps_e / args.peak_gbps:4.1f}%) "
        f"apply {pa * 1e3:7.1f} us | torch shrink {ts * 1e3:7.1f} expand {te * 1e3:7.1f} "
        f"apply {ta * 1e3:7.1f} us ({ta / pa:5.2f}x) | max rel err {err:.1e}",
        flush=True,
    )


# --- main -------------------------------------------------------------------------------------


def machine_info() -> str:
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"platform {platform.platform()} | python {platform.python_version()} | torch {torch.__version__} | "
        f"threads {torch.get_num_threads()} | cpu {platform.processor() or platform.machine()} | cuda {cuda}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[576, 2048])
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 16, 32, 64, 8])
    p.add_argument("--base-frac", type=float, default=0.1, help="fraction of rows with no adapter")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--no-real-peft", dest="real_peft", action="store_false", help="skip peft.Linear")
    p.add_argument("--peak-gbps", type=float, default=3350.0, help="GPU DRAM roofline (H100 SXM)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_info())
    print(f"CPU fp32, LoRA delta only unless noted; median of {args.repeats} interleaved runs; ranks {args.ranks}")
    with torch.inference_mode():
        for hidden in args.hidden:
            for tokens in args.tokens:
                bench_cpu_config(tokens, hidden, args.ranks, args)
    if torch.cuda.is_available():
        print(f"CUDA bf16, triton.testing.do_bench (ms -> us), roofline {args.peak_gbps:.0f} GB/s")
        with torch.inference_mode():
            for hidden in args.hidden:
                for tokens in args.tokens:
                    bench_cuda_config(tokens, hidden, args.ranks, args)


if __name__ == "__main__":
    main()
