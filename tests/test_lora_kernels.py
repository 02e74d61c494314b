"""Batched multi-LoRA kernels (chameleon.lora.ops / triton_ops) against a float64 reference.

Triton kernels run under the interpreter on CPU tensors: TRITON_INTERPRET must be set before the
kernels are defined, i.e. before anything imports chameleon.lora.triton_ops, hence the top line.
The interpreter is ~0.1-0.5 s a launch, so the Triton cases use small shapes.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton kernels are defined (see module docstring)

import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import attrs  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from chameleon.lora.ops import (  # noqa: E402
    LoRASegments,
    lora_apply,
    lora_expand,
    lora_shrink,
    reference_lora,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# --- helpers ----------------------------------------------------------------------------------


@attrs.frozen
class Case:
    x: torch.Tensor
    a_pool: torch.Tensor
    b_pool: torch.Tensor
    segs: LoRASegments


def _pool_rows(ranks: Sequence[int], rng: random.Random) -> tuple[list[int], int]:
    """Place distinct adapter slots in a pool in shuffled order with free rows between them."""
    order = list(range(len(ranks)))
    rng.shuffle(order)
    rows = [0] * len(ranks)
    cursor = 3  # pool row 0..2 unused: offsets must not be assumed to start at 0
    for i in order:
        rows[i] = cursor
        cursor += ranks[i] + rng.randint(0, 5)
    return rows, cursor


def make_case(
    lens: Sequence[int],
    ranks: Sequence[int],
    in_features: int,
    out_features: int,
    *,
    gaps: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    share_first_adapter: bool = False,
) -> Case:
    """Segments of `lens` tokens with `gaps[i]` base-only rows before segment i (and after the last)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    gaps = list(gaps) if gaps is not None else [0] * (len(lens) + 1)
    starts, pos = [], 0
    for gap, n in zip(gaps, lens):
        pos += gap
        starts.append(pos)
        pos += n
    num_tokens = pos + (gaps[len(lens)] if len(gaps) > len(lens) else 0)
    rows, pool_height = _pool_rows(ranks, rng)
    ranks = list(ranks)
    if share_first_adapter and len(rows) > 1:  # two segments of one adapter (same pool rows)
        rows[-1], ranks[-1] = rows[0], ranks[0]
    x = torch.randn(num_tokens, in_features, generator=gen)
    a_pool = torch.randn(pool_height, in_features, generator=gen) / in_features**0.5
    b_pool = torch.randn(pool_height, out_features, generator=gen) * 0.5
    segs = LoRASegments.build(starts, lens, rows, ranks, num_tokens, "cpu")
    return Case(x.to(dtype), a_pool.to(dtype), b_pool.to(dtype), segs)


def covered_rows(segs: LoRASegments) -> torch.Tensor:
    mask = torch.zeros(segs.num_tokens, dtype=torch.bool)
    for s, n in zip(segs.starts, segs.lens):
        mask[s : s + n] = True
    return mask


def reference_shrink(case: Case) -> torch.Tensor:
    v = torch.zeros(case.segs.num_tokens, case.segs.max_rank, dtype=torch.float64)
    segs = case.segs
    for s, n, r, k in zip(segs.starts, segs.lens, segs.rows, segs.ranks):
        v[s : s + n, :k] = case.x[s : s + n].double() @ case.a_pool[r : r + k].double().T
    return v


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """Max abs error within `rel` of the reference's magnitude (elementwise-relative is too brittle
    for sums of mixed signs)."""
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    scale = max(want.double().abs().max().item() if want.numel() else 0.0, 1.0)
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel:g} * {scale:.3g}"


def triton_ops_or_skip() -> ModuleType:
    """Import triton_ops lazily; skip if its kernels were defined without the interpreter."""
    pytest.importorskip("triton")
    from chameleon.lora import triton_ops

    if not triton_ops.INTERPRETED:
        pytest.skip("chameleon.lora.triton_ops was imported before TRITON_INTERPRET=1 was set")
    return triton_ops


# Mixed batch: leading/trailing base rows, gaps, 1/3/17/40-token segments, ranks 4..128 mixed.
MIXED_LENS = (1, 3, 17, 40, 2)
MIXED_RANKS = (8, 128, 12, 64, 4)
MIXED_GAPS = (2, 0, 5, 1, 0, 3)

RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


# --- LoRASegments ----------------------------------------------------------------------------


def test_build_fields() -> None:
    segs = LoRASegments.build([2, 5], [3, 1], [0, 8], [8, 16], 7, "cpu")
    assert segs.max_rank == 16 and segs.num_tokens == 7 and segs.num_segments == 2
    assert segs.starts == (2, 5) and segs.ranks == (8, 16) and segs.max_seg_len == 3
    assert segs.seg_row.dtype == torch.int32 and segs.seg_row.tolist() == [0, 8]
    assert segs.pool_rows_needed == 24 and not segs.is_single_full()
    empty = LoRASegments.build([], [], [], [], 5, "cpu")
    assert empty.max_rank == 0 and empty.seg_start.numel() == 0
    assert LoRASegments.build([0], [4], [3], [8], 4).is_single_full()


@pytest.mark.parametrize(
    ("starts", "lens", "rows", "ranks", "num_tokens"),
    [
        ([0, 2], [3, 2], [0, 8], [8, 8], 5),  # overlap
        ([3], [3], [0], [8], 5),  # past the end
        ([-1], [1], [0], [8], 5),  # negative start
        ([0], [1], [0], [0], 5),  # rank 0
        ([0], [1], [-2], [8], 5),  # negative pool row
        ([0, 1], [1], [0], [8], 5),  # length mismatch
    ],
)
def test_build_rejects_bad_metadata(
    starts: list[int], lens: list[int], rows: list[int], ranks: list[int], num_tokens: int
) -> None:
    with pytest.raises(ValueError):
        LoRASegments.build(starts, lens, rows, ranks, num_tokens, "cpu")


def test_argument_checks() -> None:
    case = make_case([4], [8], 16, 24, gaps=[1, 1])
    y = torch.zeros(case.segs.num_tokens, 24)
    with pytest.raises(ValueError, match="backend"):
        lora_apply(y, case.x, case.a_pool, case.b_pool, case.segs, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rows"):
        lora_shrink(case.x, case.a_pool[:5], case.segs)
    with pytest.raises(ValueError, match="y must be"):
        lora_apply(y[:-1], case.x, case.a_pool, case.b_pool, case.segs)
    with pytest.raises(ValueError):
        lora_apply(y.double(), case.x, case.a_pool, case.b_pool, case.segs)


# --- torch path -------------------------------------------------------------------------------


@pytest.mark.parametrize(("in_features", "out_features"), [(64, 64), (576, 1536), (1536, 576)])
def test_torch_apply_mixed(in_features: int, out_features: int) -> None:
    case = make_case(MIXED_LENS, MIXED_RANKS, in_features, out_features, gaps=MIXED_GAPS)
    y0 = torch.randn(case.segs.num_tokens, out_features)
    y = y0.clone()
    lora_apply(y, case.x, case.a_pool, case.b_pool, case.segs)
    want = y0.double() + reference_lora(case.x, case.a_pool, case.b_pool, case.segs)
    assert_close_rel(y, want, RTOL[torch.float32])
    base = ~covered_rows(case.segs)
    assert torch.equal(y[base], y0[base])  # base-only rows untouched


def test_torch_shrink_then_expand_with_shared_adapter() -> None:
    case = make_case(MIXED_LENS, MIXED_RANKS, 576, 96, gaps=MIXED_GAPS, share_first_adapter=True)
    v = lora_shrink(case.x, case.a_pool, case.segs)
    assert v.shape == (case.segs.num_tokens, case.segs.max_rank) and v.dtype == case.x.dtype
    assert_close_rel(v, reference_shrink(case), RTOL[torch.float32])
    y = torch.zeros(case.segs.num_tokens, 96)
    lora_expand(y, v, case.b_pool, case.segs)
    assert_close_rel(y, reference_lora(case.x, case.a_pool, case.b_pool, case.segs), RTOL[torch.float32])


def test_torch_expand_into_column_slice() -> None:
    # A fused qkv output: LoRA for k_proj writes into columns [q, q+k) only.
    q, k, vcols = 64, 32, 32
    case = make_case([3, 9], [16, 8], 48, k, gaps=[1, 2, 1])
    fused0 = torch.randn(case.segs.num_tokens, q + k + vcols)
    fused = fused0.clone()
    lora_apply(fused[:, q : q + k], case.x, case.a_pool, case.b_pool, case.segs)
    want = fused0[:, q : q + k].double() + reference_lora(case.x, case.a_pool, case.b_pool, case.segs)
    assert_close_rel(fused[:, q : q + k], want, RTOL[torch.float32])
    assert torch.equal(fused[:, :q], fused0[:, :q]) and torch.equal(fused[:, q + k :], fused0[:, q + k :])


def test_torch_single_full_segment_fast_path() -> None:
    case = make_case([11], [32], 64, 48)
    assert case.segs.is_single_full()
    y = torch.zeros(11, 48)
    lora_apply(y, case.x, case.a_pool, case.b_pool, case.segs)
    assert_close_rel(y, reference_lora(case.x, case.a_pool, case.b_pool, case.segs), RTOL[torch.float32])
    v = lora_shrink(case.x, case.a_pool, case.segs)
    assert_close_rel(v, reference_shrink(case), RTOL[torch.float32])


def test_torch_no_segments_is_noop() -> None:
    segs = LoRASegments.build([], [], [], [], 6, "cpu")
    x, y0 = torch.randn(6, 16), torch.randn(6, 8)
    y = y0.clone()
    lora_apply(y, x, torch.empty(0, 16), torch.empty(0, 8), segs)
    lora_expand(y, torch.empty(6, 0), torch.empty(0, 8), segs)
    assert torch.equal(y, y0)
    assert lora_shrink(x, torch.empty(0, 16), segs).shape == (6, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_half_dtypes(dtype: torch.dtype) -> None:
    case = make_case(MIXED_LENS, MIXED_RANKS, 64, 64, gaps=MIXED_GAPS, dtype=dtype)
    y = torch.zeros(case.segs.num_tokens, 64, dtype=dtype)
    lora_apply(y, case.x, case.a_pool, case.b_pool, case.segs)
    assert y.dtype == dtype
    assert_close_rel(y, reference_lora(case.x, case.a_pool, case.b_pool, case.segs), RTOL[dtype])


@st.composite
def _segment_layouts(draw: st.DrawFn) -> tuple[list[int], list[int], list[int], int, int]:
    num = draw(st.integers(0, 6))
    lens = draw(st.lists(st.integers(0, 12), min_size=num, max_size=num))
    ranks = draw(st.lists(st.integers(1, 40), min_size=num, max_size=num))
    gaps = draw(st.lists(st.integers(0, 4), min_size=num + 1, max_size=num + 1))
    in_features = draw(st.sampled_from([8, 24, 64]))
    out_features = draw(st.sampled_from([8, 40, 96]))
    return lens, ranks, gaps, in_features, out_features


@settings(max_examples=40, deadline=None)
@given(layout=_segment_layouts(), seed=st.integers(0, 2**16))
def test_torch_matches_reference_property(
    layout: tuple[list[int], list[int], list[int], int, int], seed: int
) -> None:
    lens, ranks, gaps, in_features, out_features = layout
    case = make_case(lens, ranks, in_features, out_features, gaps=gaps, seed=seed)
    want = reference_lora(case.x, case.a_pool, case.b_pool, case.segs)
    y = torch.zeros(case.segs.num_tokens, out_features)
    lora_apply(y, case.x, case.a_pool, case.b_pool, case.segs)
    assert_close_rel(y, want, RTOL[torch.float32])
    v = lora_shrink(case.x, case.a_pool, case.segs)
    assert_close_rel(v, reference_shrink(case), RTOL[torch.float32])
    y2 = torch.zeros_like(y)
    lora_expand(y2, v, case.b_pool, case.segs)
    assert_close_rel(y2, want, RTOL[torch.float32])


# --- triton path (interpreter, CPU tensors) ---------------------------------------------------


@pytest.mark.parametrize(("in_features", "out_features"), [(576, 64), (48, 576)])
def test_triton_apply_mixed_fp32(in_features: int, out_features: int) -> None:
    triton_ops_or_skip()
    case = make_case(MIXED_LENS, MIXED_RANKS, in_features, out_features, gaps=MIXED_GAPS)
    y0 = torch.randn(case.segs.num_tokens, out_features)
    y = y0.clone()
    lora_apply(y, case.x, case.a_pool, case.b_pool, case.segs, backend="triton")
    want = y0.double() + reference_lora(case.x, case.a_pool, case.b_pool, case.segs)
    assert_close_rel(y, want, RTOL[torch.float32])
    base = ~covered_rows(case.segs)
    assert torch.equal(y[base], y0[base])


def test_triton_shrink_1536_zero_outside_segments() -> None:
    triton_ops_or_skip()
    case = make_case([1, 3, 17], [8, 128, 12], 1536, 16, gaps=[2, 1, 0, 2], share_first_adapter=True)
    v = lora_shrink(case.x, case.a_pool, case.segs, backend="triton")
    assert v.shape == (case.segs.num_tokens, 128) and v.dtype == torch.float32
    want = reference_shrink(case)
    assert_close_rel(v, want, RTOL[torch.float32])
    assert torch.count_nonzero(v[want == 0]) == 0  # exact zeros beyond rank and on base rows


def test_triton_expand_into_column_slice() -> None:
    triton_ops_or_skip()
    q, k, vcols = 96, 80, 16  # k slice width 80: not a multiple of BLOCK_N
    case = make_case([3, 20], [16, 40], 32, k, gaps=[1, 2, 1])
    v = reference_shrink(case).float()
    fused0 = torch.randn(case.segs.num_tokens, q + k + vcols)
    fused = fused0.clone()
    lora_expand(fused[:, q : q + k], v, case.b_pool, case.segs, backend="triton")
    want = fused0[:, q : q + k].double() + reference_lora(case.x, case.a_pool, case.b_pool, case.segs)
    assert_close_rel(fused[:, q : q + k], want, RTOL[torch.float32])
    assert torch.equal(fused[:, :q], fused0[:, :q]) and torch.equal(fused[:, q + k :], fused0[:, q + k :])


def test_triton_single_full_segment_and_noop() -> None:
    triton_ops_or_skip()
    case = make_case([21], [32], 64, 64)
    y = torch.zeros(21, 64)
    lora_apply(y, case.x, case.a_pool, case.b_pool, case.segs, backend="triton")
    assert_close_rel(y, reference_lora(case.x, case.a_pool, case.b_pool, case.segs), RTOL[torch.float32])

    empty = LoRASegments.build([], [], [], [], 4, "cpu")
    y0 = torch.randn(4, 8)
    y = y0.clone()
    lora_apply(y, torch.randn(4, 16), torch.empty(0, 16), torch.empty(0, 8), empty, backend="triton")
    assert torch.equal(y, y0)
    assert lora_shrink(torch.randn(4, 16), torch.empty(0, 16), empty, backend="triton").shape == (4, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_dtypes(dtype: torch.dtype) -> None:
    # bf16 exercises the interpreter's cast-to-fp32 path (its bf16 tl.dot returns garbage).
    triton_ops_or_skip()
    case = make_case([1, 17, 5], [8, 64, 12], 96, 80, gaps=[1, 0, 2, 1], dtype=dtype)
    y = torch.zeros(case.segs.num_tokens, 80, dtype=dtype)
    lora_apply(y, case.x, case.a_pool, case.b_pool, case.segs, backend="triton")
    assert y.dtype == dtype
    assert_close_rel(y, reference_lora(case.x, case.a_pool, case.b_pool, case.segs), RTOL[dtype])


def test_triton_matches_torch_backend() -> None:
    triton_ops_or_skip()
    case = make_case([4, 2], [16, 24], 40, 24, gaps=[0, 3, 0], seed=7)
    outs = []
    for backend in ("torch", "triton"):
        y = torch.zeros(case.segs.num_tokens, 24)
        lora_apply(y, case.x, case.a_pool, case.b_pool, case.segs, backend=backend)  # type: ignore[arg-type]
        outs.append(y)
    assert_close_rel(outs[1], outs[0].double(), RTOL[torch.float32])


_AOT_COMPILE_SCRIPT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from chameleon.lora import triton_ops as ops

assert not ops.INTERPRETED
seg = {"seg_start_ptr": "*i32", "seg_len_ptr": "*i32", "seg_row_ptr": "*i32", "seg_rank_ptr": "*i32"}
target = GPUTarget("cuda", 90, 32)

def build(kernel, ptrs, dim, strides, consts):
    sig = {p: dt for p in ptrs} | seg | {dim: "i32"} | {s: "i32" for s in strides}
    sig |= {k: "constexpr" for k in consts}
    assert "cubin" in triton.compile(ASTSource(kernel, sig, consts), target=target).asm

for dt, prec in (("*bf16", "tf32"), ("*fp16", "tf32"), ("*fp32", "ieee")):
    tail = {"CAST_FP32": False, "DOT_PRECISION": prec}
    for block_r in (16, 32, 64):
        build(ops._sgmv_shrink_kernel, ("x_ptr", "a_ptr", "v_ptr"), "K",
              ("stride_xm", "stride_xk", "stride_am", "stride_ak", "stride_vm", "stride_vr"),
              {"BLOCK_M": ops.SHRINK_BLOCK_M, "BLOCK_R": block_r, "BLOCK_K": ops.SHRINK_BLOCK_K} | tail)
    build(ops._sgmv_expand_kernel, ("v_ptr", "b_ptr", "y_ptr"), "N",
          ("stride_vm", "stride_vr", "stride_bm", "stride_bn", "stride_ym", "stride_yn"),
          {"BLOCK_M": ops.EXPAND_BLOCK_M, "BLOCK_R": ops.EXPAND_BLOCK_R, "BLOCK_N": ops.EXPAND_BLOCK_N} | tail)
print("compiled")
"""


def test_triton_kernels_compile_for_sm90(tmp_path: Path) -> None:
    """No GPU here: compile both kernels ahead of time for H100 (sm_90) to catch what the
    interpreter accepts but the GPU compiler rejects (tl.dot tiles < 16, dtype mixes). Runs in a
    fresh process: under TRITON_INTERPRET=1 triton's own library functions are interpreted and
    the code generator refuses them."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cache hit would skip the compile under test
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _AOT_COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
