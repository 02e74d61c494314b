"""The run's mode (GPU or dry run), tolerances and timing for `python -m chameleon.check_gpu`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
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
