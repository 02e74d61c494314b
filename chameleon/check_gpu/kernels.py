"""(a) + (b): the Triton LoRA kernels against the float64 reference and the torch path, and their
time against the HBM-bandwidth roofline.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from chameleon.check_gpu.mode import RTOL, Mode, time_ms


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
