"""The CPU paged decode-attention kernel (model/cpu_kernels.py) against a float64 reference, how
attention picks it, and its fallbacks: no compiler, a failed build, switched off, a quantized cache.

The engine-level exactness (greedy tokens identical to transformers with the kernel on) is pinned
by the parity suites (test_model_parity, test_smollm2, test_lora_engine, test_kv_window).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from chameleon.model import attention, cpu_kernels
from chameleon.model.attention import build_attention_metadata, paged_attention
from chameleon.model.kv_quant import QuantizedKVCache

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(torch.float32), reason="no C compiler here")


@pytest.fixture
def fresh_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """An empty kernel cache and no loaded library, before and after (the loader is memoised)."""
    monkeypatch.setenv("CHAMELEON_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    yield
    cpu_kernels._library.cache_clear()


def _case(rng: random.Random, dtype: torch.dtype, heads: int, kv_heads: int, dim: int, block: int):  # type: ignore[no-untyped-def]
    """A decode batch: random contexts and block tables, q a strided view of a fused qkv."""
    b = rng.randint(1, 12)
    ctx = torch.tensor([rng.randint(1, 70) for _ in range(b)])
    nblk = -(-int(ctx.max()) // block)
    free = list(range(900))
    rng.shuffle(free)
    tables = torch.tensor([[free.pop() for _ in range(nblk)] for _ in range(b)])
    k_cache = torch.randn(900 * block, kv_heads, dim).to(dtype)
    v_cache = torch.randn(900 * block, kv_heads, dim).to(dtype)
    t = b + rng.randint(0, 3)  # more rows than sequences: q_rows pick some, in any order
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim).to(dtype)
    q = qkv[:, : heads * dim].view(t, heads, dim)
    rows = torch.tensor(rng.sample(range(t), b))
    return q, rows, k_cache, v_cache, tables, ctx


def _reference(q, rows, k_cache, v_cache, tables, ctx, block, scale):  # type: ignore[no-untyped-def]
    out = []
    group = q.shape[1] // k_cache.shape[1]
    for i in range(len(rows)):
        slots = torch.tensor([int(tables[i, p // block]) * block + p % block for p in range(int(ctx[i]))])
        keys = k_cache[slots].double().repeat_interleave(group, dim=1)  # [ctx, H, D]
        vals = v_cache[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", q[rows[i]].double(), keys) * scale
        out.append(torch.einsum("hk,khd->hd", scores.softmax(-1), vals).reshape(-1))
    return torch.stack(out)


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(9, 3, 64), (8, 2, 32), (4, 4, 80), (6, 2, 48), (8, 1, 128)])
def test_kernel_matches_float64_reference(dtype: torch.dtype, tol: float, shape: tuple[int, int, int]) -> None:
    rng = random.Random(hash(shape) % 1000)
    torch.manual_seed(0)
    heads, kv_heads, dim = shape
    for block in (1, 16):
        for _ in range(4):
            q, rows, kc, vc, tables, ctx = _case(rng, dtype, heads, kv_heads, dim, block)
            got = cpu_kernels.paged_decode(q, rows, kc, vc, tables, ctx, block, dim**-0.5)
            assert got.dtype == dtype and got.shape == (len(rows), heads * dim)
            want = _reference(q, rows, kc, vc, tables, ctx, block, dim**-0.5)
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@needs_kernel
def test_decode_attention_takes_the_kernel_and_agrees_with_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    heads, kv_heads, dim, block = 9, 3, 64, 16
    ctx = [5, 40, 17, 1]
    tables = [[3 + 4 * i + j for j in range(-(-c // block))] for i, c in enumerate(ctx)]
    meta = build_attention_metadata([1] * 4, ctx, tables, block, torch.device("cpu"))
    q, k, v = torch.randn(4, heads, dim), torch.randn(4, kv_heads, dim), torch.randn(4, kv_heads, dim)
    kc, vc = torch.randn(40 * block, kv_heads, dim), torch.randn(40 * block, kv_heads, dim)
    calls = []
    real = cpu_kernels.paged_decode
    monkeypatch.setattr(cpu_kernels, "paged_decode", lambda *a: calls.append(1) or real(*a))
    fast = paged_attention(q, k, v, kc, vc, meta, dim**-0.5)
    assert calls == [1]
    monkeypatch.setattr(attention, "_kernel_reads", lambda *a: False)
    slow = paged_attention(q, k, v, kc.clone(), vc.clone(), meta, dim**-0.5)
    assert calls == [1]
    torch.testing.assert_close(fast, slow, atol=2e-6, rtol=2e-6)


def test_quantized_or_mismatched_caches_take_the_torch_path() -> None:
    q = torch.randn(2, 4, 8)
    quant = QuantizedKVCache(16, 2, 8, "int8", torch.device("cpu"))
    assert not attention._kernel_reads(quant, quant, q)
    plain = torch.zeros(16, 2, 8, dtype=torch.bfloat16)
    assert not attention._kernel_reads(plain, plain, q)  # a bf16 cache under fp32 queries
    assert not cpu_kernels.available(torch.float16)  # no fp16 build: the torch path


def test_no_compiler_means_the_torch_path_with_a_warning(
    fresh_library: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.WARNING, logger="chameleon.model.cpu_kernels"):
        assert not cpu_kernels.available(torch.float32)
    assert "no C compiler" in caplog.text


def test_a_failed_build_means_the_torch_path_with_the_compiler_error(
    fresh_library: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: unsupported flag' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with caplog.at_level(logging.WARNING, logger="chameleon.model.cpu_kernels"):
        assert not cpu_kernels.available(torch.float32)
    assert "unsupported flag" in caplog.text
    assert not list((tmp_path / "kernels").glob("*"))  # no half-written library left behind


def test_switched_off_by_the_environment(fresh_library: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAMELEON_CPU_KERNELS", "0")
    assert not cpu_kernels.available(torch.float32)


@needs_kernel
def test_a_built_library_is_reused_without_the_compiler(
    fresh_library: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert cpu_kernels.available(torch.float32)  # builds into the fresh cache
    (built,) = (tmp_path / "kernels").glob("paged_decode-*.so")
    cpu_kernels._library.cache_clear()

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(cpu_kernels.subprocess, "run", no_compiler)
    assert cpu_kernels.available(torch.float32)
    assert list((tmp_path / "kernels").glob("paged_decode-*.so")) == [built]


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_long_and_short_contexts_in_one_batch(dtype: torch.dtype, tol: float) -> None:
    """Scratch is sized by the longest context; a 1-key sequence beside a 3,000-key one."""
    torch.manual_seed(1)
    heads, kv_heads, dim, block = 8, 2, 64, 16
    ctx = torch.tensor([3000, 1, 777])
    tables = torch.arange(3 * 188).view(3, 188)
    kc = torch.randn(3 * 188 * block, kv_heads, dim).to(dtype)
    vc = torch.randn(3 * 188 * block, kv_heads, dim).to(dtype)
    q = torch.randn(3, heads, dim).to(dtype)
    rows = torch.arange(3)
    got = cpu_kernels.paged_decode(q, rows, kc, vc, tables, ctx, block, 0.125)
    torch.testing.assert_close(got.double(), _reference(q, rows, kc, vc, tables, ctx, block, 0.125), atol=tol, rtol=tol)
