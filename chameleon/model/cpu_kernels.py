"""The CPU paged decode-attention kernel (csrc/paged_decode.c): built on first use, loaded with ctypes.

Decode attention through torch gathers every sequence's keys into a padded copy per layer, masks
the padding and runs SDPA on B·KVH problems of G query rows: at SmolLM2's decode shapes that was
~20% of a step, nearly all of it overhead. The C kernel reads K/V in place through the block
tables, scores each loaded key row against every query head, and parallelises over sequences with
torch's own OpenMP runtime. It has no torch headers, so the system C compiler (`$CC`, else `cc`)
builds it in about a second (`-O3 -march=native`) into `kernels/` of chameleon's cache
(`$CHAMELEON_CACHE`, else ~/.cache/chameleon), keyed by the source, the flags and the CPU. With no
compiler, a failed build or `CHAMELEON_CPU_KERNELS=0`, `available()` is False and attention takes
the torch path; the two agree to fp32 rounding (tests/test_cpu_kernels.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from chameleon.assets import cache_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")
LIBS = ("-lmvec", "-lm")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# chameleon_paged_decode's parameters, in order (csrc/paged_decode.c)
_ARGTYPES: list[type[ctypes._SimpleCData[Any]]] = [
    _PTR, _I64, _PTR,  # q, q_row_stride, q_rows
    _PTR, _PTR,  # k_cache, v_cache
    _PTR, _I64, _PTR, _I64,  # block_tables, table_stride, context_lens, block_size
    _I64, _I64, _I64, _I64, ctypes.c_float,  # num_seqs, num_heads, num_kv_heads, head_dim, scale
    _PTR, ctypes.c_int, ctypes.c_int,  # out, bf16, num_threads
]


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and flags (a cache shared across machines)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return "\n".join([platform.machine(), *lines])


def _build(compiler: str) -> Path:
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *FLAGS, *LIBS, _cpu_key()]).encode())
    target = cache_dir() / "kernels" / f"paged_decode-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # built aside, then renamed: atomic
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, *LIBS], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("CHAMELEON_CPU_KERNELS", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        logger.warning("no C compiler (%s): CPU decode attention takes the torch path", os.environ.get("CC", "cc"))
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("the CPU decode-attention kernel did not build (%s): the torch path is used", detail)
        return None
    fn = lib.chameleon_paged_decode
    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    return lib


def available(dtype: torch.dtype) -> bool:
    """Whether `paged_decode` runs for a cache of this dtype on the CPU (the kernel built and loaded)."""
    return dtype in DTYPES and _library() is not None


def paged_decode(
    q: torch.Tensor,  # [T, H, D] (rows may be strided: a view of the fused qkv)
    q_rows: torch.Tensor,  # [B] int64 rows of q, one per sequence
    k_cache: torch.Tensor,  # [slots, KVH, D], q's dtype
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, blocks] int64
    context_lens: torch.Tensor,  # [B] int64, each >= 1
    block_size: int,
    scale: float,
) -> torch.Tensor:  # [B, H * D]
    lib = _library()
    assert lib is not None and q.dtype in DTYPES and k_cache.dtype == v_cache.dtype == q.dtype
    _, h, d = q.shape
    b, kvh = q_rows.shape[0], k_cache.shape[1]
    assert q.stride(2) == 1 and q.stride(1) == d and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.dtype == context_lens.dtype == q_rows.dtype == torch.int64 and block_tables.is_contiguous()
    out = torch.empty(b, h * d, dtype=q.dtype)
    rc = lib.chameleon_paged_decode(
        q.data_ptr(), q.stride(0), q_rows.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        block_tables.data_ptr(), block_tables.stride(0), context_lens.data_ptr(), block_size,
        b, h, kvh, d, scale, out.data_ptr(), DTYPES[q.dtype], torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("paged_decode: a thread could not allocate its scratch")
    return out
