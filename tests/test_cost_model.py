"""The GPU cost model: calibrated to the paper's figures, monotone, and its memory arithmetic."""

from __future__ import annotations

import math

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chameleon.errors import ConfigError
from chameleon.sim.analytic import (
    A40_LLAMA7B_CALIBRATION,
    PAPER_CALIBRATION_PROMPT_LEN,
    PAPER_LOAD_SHARE_AT_MAX_RANK,
    PAPER_TTFT_BY_RANK_S,
    AnalyticCostModel,
    derive_paper_calibration,
)
from chameleon.sim.hardware import A40_48GB, A100_80GB, LLAMA_7B, LLAMA_13B, LLAMA_30B, get_gpu, get_model, memory_plan
from chameleon.sim.profile import CostProfile, ProfileEngine, fit_nonnegative
from chameleon.sim.shape import BatchShape, BatchShapeBuilder

MiB, GiB = 1 << 20, 1 << 30
A40_7B = AnalyticCostModel(A40_48GB, LLAMA_7B)


# --- calibration to the paper ----------------------------------------------------------------------


@pytest.mark.parametrize(("rank", "paper_s"), sorted(PAPER_TTFT_BY_RANK_S.items()))
def test_unloaded_ttft_by_rank_reproduces_the_paper(rank: int, paper_s: float) -> None:
    # SPEC §1: Llama-7B on an A40, unloaded: TTFT 74/78/88/107/144 ms at rank 8/16/32/64/128.
    model_s = A40_7B.unloaded_ttft_s(PAPER_CALIBRATION_PROMPT_LEN, rank)
    assert model_s == pytest.approx(paper_s, rel=0.15)
    assert model_s == pytest.approx(paper_s, rel=0.02)  # in fact: the five points are nearly collinear


def test_loading_is_the_papers_share_of_ttft_at_rank_128() -> None:
    load = A40_7B.load_s(128 * A40_7B.adapter_row_bytes)
    ttft = A40_7B.unloaded_ttft_s(PAPER_CALIBRATION_PROMPT_LEN, 128)
    assert load / ttft == pytest.approx(PAPER_LOAD_SHARE_AT_MAX_RANK, abs=0.01)


def test_effective_host_to_device_bandwidth_is_about_10_GBps() -> None:
    # SPEC §5: the TTFT-by-rank figures imply ≈10 GB/s effective host→GPU.
    assert 9e9 < A40_7B.h2d_Bps < 12e9


def test_the_constants_are_the_derivation_rounded() -> None:
    derived = attrs.asdict(derive_paper_calibration())
    for field, value in attrs.asdict(A40_LLAMA7B_CALIBRATION).items():
        assert value == pytest.approx(derived[field], rel=5e-3), field


def test_calibrated_efficiencies_are_physically_plausible() -> None:
    c = A40_LLAMA7B_CALIBRATION
    assert 0.3 < c.compute_efficiency < 0.9
    assert 0.0 < c.lora_efficiency < c.compute_efficiency  # gather-based LoRA kernels are slower
    assert 0.0 < c.h2d_efficiency <= 1.0


# --- model and adapter sizes -------------------------------------------------------------------------


def test_llama_7b_sizes() -> None:
    assert LLAMA_7B.params == pytest.approx(6.74e9, rel=0.01)
    assert LLAMA_7B.weight_bytes == pytest.approx(13.5e9, rel=0.01)  # SPEC §5: 13.5 GB fp16
    assert LLAMA_7B.kv_bytes_per_token == 2 * 32 * 4096 * 2 == 512 * 1024  # SPEC §5: 512 KiB/token


def test_larger_llamas_from_their_configs() -> None:
    assert LLAMA_13B.params == pytest.approx(13.0e9, rel=0.01)
    assert LLAMA_13B.kv_bytes_per_token == 2 * 40 * 5120 * 2
    assert LLAMA_30B.params == pytest.approx(32.5e9, rel=0.01)
    assert LLAMA_30B.kv_bytes_per_token == 2 * 60 * 6656 * 2


def test_rank_32_adapter_on_qkvo_of_llama_7b_is_64_MiB() -> None:
    # SPEC §1: "A rank-32 adapter on q,k,v,o of Llama-7B is 64 MiB (2 MiB × rank)".
    assert LLAMA_7B.adapter_row_bytes() == 2 * MiB
    assert 32 * LLAMA_7B.adapter_row_bytes(("q_proj", "k_proj", "v_proj", "o_proj")) == 64 * MiB
    # All seven projections: the MLP's rows are longer (4096 + 11008 each).
    assert LLAMA_7B.adapter_row_bytes(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) > (
        2 * MiB
    )


# --- memory ----------------------------------------------------------------------------------------


def test_kv_memory_is_gpu_minus_weights_minus_reserve() -> None:
    plan = memory_plan(A40_48GB, LLAMA_7B)
    assert plan.free_bytes == 48 * GiB - int(48 * GiB * 0.10) - LLAMA_7B.weight_bytes
    kv_tokens = plan.free_bytes // LLAMA_7B.kv_bytes_per_token
    assert 60_000 < kv_tokens < 65_000  # ~30.6 GiB of KV at 512 KiB per token


def test_a_model_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ConfigError, match="does not fit"):
        memory_plan(A40_48GB, LLAMA_30B)  # 65 GB of weights on a 48 GB card
    assert memory_plan(A100_80GB, LLAMA_30B).free_bytes > 0


def test_presets_by_name() -> None:
    assert get_gpu("A40") is A40_48GB and get_gpu("a100") is A100_80GB and get_gpu("A100-80GB") is A100_80GB
    assert get_model("llama-13b") is LLAMA_13B
    with pytest.raises(ValueError, match="unknown GPU"):
        get_gpu("H100")


# --- the roofline -------------------------------------------------------------------------------------


def test_prefill_is_compute_bound_and_decode_memory_bound() -> None:
    c, g = A40_LLAMA7B_CALIBRATION, A40_48GB
    prefill, decode = BatchShape.single_prefill(512), BatchShape.decode(8, 512)
    compute = lambda s: A40_7B.base_flops(s) / (g.fp16_flops * c.compute_efficiency)  # noqa: E731
    memory = lambda s: A40_7B.base_bytes(s) / (g.hbm_bandwidth_Bps * c.memory_efficiency)  # noqa: E731
    assert compute(prefill) > memory(prefill)
    assert memory(decode) > compute(decode)


def test_decode_step_of_llama_7b_on_an_a40_is_plausible() -> None:
    # 13.5 GB of weights at 80% of 696 GB/s ≈ 24 ms, plus 4.2 ms of overhead.
    assert 0.025 < A40_7B.iteration_s(BatchShape.decode(1, 128)) < 0.035


def test_a100_is_faster_than_a40() -> None:
    a100 = AnalyticCostModel(A100_80GB, LLAMA_7B)
    for shape in (BatchShape.single_prefill(1024, 32), BatchShape.decode(32, 1000, 16)):
        assert a100.iteration_s(shape) < A40_7B.iteration_s(shape)


_seq = st.tuples(
    st.integers(1, 512),  # new tokens
    st.integers(0, 1500),  # computed
    st.sampled_from([0, 8, 16, 32, 64, 128]),  # rank
    st.integers(0, 5),  # adapter id
    st.booleans(),  # samples
)


def _shape(seqs: list[tuple[int, int, int, int, bool]]) -> BatchShape:
    b = BatchShapeBuilder()
    for new, computed, rank, adapter, samples in seqs:
        b.add(new, computed, rank, (adapter, rank) if rank else None, samples=samples, decode=new == 1 and computed > 0)
    return b.build()


@settings(max_examples=60, deadline=None)
@given(st.lists(_seq, min_size=1, max_size=12), _seq)
def test_more_work_never_takes_less_time(seqs: list, extra: tuple) -> None:
    before = A40_7B.iteration_s(_shape(seqs))
    assert A40_7B.iteration_s(_shape([*seqs, extra])) >= before
    bigger = [(new + 1, computed + 7, rank, a, s) for new, computed, rank, a, s in seqs]
    assert A40_7B.iteration_s(_shape(bigger)) >= before


@pytest.mark.parametrize("rank", [8, 16, 32, 64])
def test_higher_rank_costs_more(rank: int) -> None:
    for tokens in (1, 128, 1024):
        low = A40_7B.iteration_s(BatchShape.single_prefill(tokens, rank))
        high = A40_7B.iteration_s(BatchShape.single_prefill(tokens, 2 * rank))
        assert high > low > A40_7B.iteration_s(BatchShape.single_prefill(tokens))
    assert A40_7B.load_s(2 * rank * 2 * MiB) == pytest.approx(2 * A40_7B.load_s(rank * 2 * MiB))


def test_longer_contexts_make_decode_slower() -> None:
    times = [A40_7B.iteration_s(BatchShape.decode(16, ctx)) for ctx in (16, 256, 1024, 2048)]
    assert times == sorted(times) and times[-1] > times[0]


# --- measured profiles --------------------------------------------------------------------------------


def _profile(**kw: object) -> CostProfile:
    base = dict(
        prefill_a_s=1e-3,
        prefill_b_s_per_token=2e-6,
        prefill_q_s_per_pair=1e-9,
        decode_c_s=8e-4,
        decode_d_s_per_seq=1.5e-4,
        decode_e_s_per_ctx_token=3e-8,
        lora_s_per_token_rank=1e-8,
        lora_s_per_adapter=2e-4,
        load_Bps=2e9,
        engine=ProfileEngine(100, 16, 4096, 1024, 512, 512, 1000, 64, 2048),
        meta={"model_dir": "x", "list": [1, 2]},
    )
    base.update(kw)
    return CostProfile(**base)  # type: ignore[arg-type]


def test_profile_json_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for profile in (_profile(), _profile(load_Bps=math.inf, engine=None, meta={})):
        path = tmp_path / "p.json"
        profile.to_json(path)
        assert CostProfile.from_json(path) == profile


def test_profile_rejects_other_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "x.json"
    path.write_text('{"kind": "something else"}')
    with pytest.raises(ValueError, match="not a chameleon cost profile"):
        CostProfile.from_json(path)


def test_profile_reproduces_its_fitted_forms() -> None:
    p = _profile()
    for t in (1, 100, 500):
        assert p.iteration_s(BatchShape.single_prefill(t)) == pytest.approx(p.prefill_s(t))
    for seqs, ctx in ((1, 10), (8, 300)):
        assert p.iteration_s(BatchShape.decode(seqs, ctx)) == pytest.approx(p.decode_s(seqs, seqs * ctx))
    # LoRA: per token·rank plus per adapter segment.
    with_lora = p.iteration_s(BatchShape.single_prefill(100, 16))
    assert with_lora == pytest.approx(p.prefill_s(100) + 100 * 16 * 1e-8 + 2e-4)
    assert p.load_s(2_000_000) == pytest.approx(1e-3)


def test_profile_time_factor_draws_from_the_measured_spread() -> None:
    assert _profile().time_factor(0.7) == 1.0  # no spread recorded: deterministic
    p = _profile(step_time_ratios=(0.5, 1.0, 2.0))
    assert [p.time_factor(u) for u in (0.0, 0.34, 0.5, 0.999)] == [0.5, 1.0, 1.0, 2.0]
    assert A40_7B.time_factor(0.999) == 1.0


def test_profile_mixed_batch_charges_each_extra_sequence() -> None:
    p = _profile()
    b = BatchShapeBuilder()
    b.add(100, 0, 0, None, samples=True, decode=False)
    for _ in range(3):
        b.add(1, 50, 0, None, samples=True, decode=True)
    expected = p.prefill_s(100) + 3 * p.decode_d_s_per_seq + 3 * 51 * p.decode_e_s_per_ctx_token
    assert p.iteration_s(b.build()) == pytest.approx(expected)


def test_fit_nonnegative() -> None:
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    ys = [2.0 + 0.5 * x for x in xs]
    assert fit_nonnegative([[1.0] * 5, xs], ys) == pytest.approx([2.0, 0.5])
    # A falling line cannot have a negative slope: the slope is dropped, the mean is kept.
    falling = [5.0 - x for x in xs]
    assert fit_nonnegative([[1.0] * 5, xs], falling) == pytest.approx([2.0, 0.0])


def test_relative_fit_is_not_decided_by_the_largest_observations() -> None:
    # Many small steps at 1.0 and one huge one: the absolute fit of a constant chases the big one.
    ys = [1.0] * 9 + [100.0]
    (absolute,) = fit_nonnegative([[1.0] * 10], ys)
    (relative,) = fit_nonnegative([[1.0] * 10], ys, relative=True)
    assert absolute == pytest.approx(10.9)
    assert relative < 1.2
    exact = [2.0 + 0.5 * x for x in (1.0, 10.0, 100.0)]
    assert fit_nonnegative([[1.0] * 3, [1.0, 10.0, 100.0]], exact, relative=True) == pytest.approx([2.0, 0.5])
