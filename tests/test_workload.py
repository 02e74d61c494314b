"""Workload generators: reproducible, and they have the distributions they claim."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from chameleon.harness.traces import bundled_trace_path, load_trace, parse_timestamp
from chameleon.harness.workload import (
    PAPER_RANKS,
    AdapterSpec,
    Workload,
    WorkloadRequest,
    paper_workload,
    slora_adapter_pmf,
    slora_workload,
    trace_workload,
    zipf_pmf,
)


def _gaps(w: Workload) -> np.ndarray:
    return np.diff([0.0] + [r.arrival_s for r in w.requests])


def _csv_rows(name: str) -> list[tuple[str, int, int]]:
    with open(bundled_trace_path(name), newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        return [(ts, int(c), int(g)) for ts, c, g in reader]


def _chi2(counts: np.ndarray, pmf: np.ndarray) -> float:
    expected = pmf * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _loglog_slope(freqs: np.ndarray) -> float:
    ranks = np.arange(1, len(freqs) + 1)
    return float(np.polyfit(np.log(ranks), np.log(freqs), 1)[0])


# ----------------------------------------------------------------------------- S-LoRA generator


def _slora(**kw: object) -> Workload:
    args: dict[str, object] = dict(num_adapters=50, alpha=0.5, rate=10.0, cv=1.0, duration_s=2000.0, seed=7)
    args.update(kw)
    return slora_workload(**args)  # type: ignore[arg-type]


def test_slora_reproducible() -> None:
    assert _slora(duration_s=100.0) == _slora(duration_s=100.0)
    assert _slora(duration_s=100.0).requests != _slora(duration_s=100.0, seed=8).requests


def test_slora_fixed_count_like_slora() -> None:
    w = _slora(rate=2.5, duration_s=300.0)
    assert len(w) == int(2.5 * 300)  # S-LoRA generates exactly int(rate * duration) requests
    assert w.requests[0].arrival_s > 0  # first arrival after one gap


@pytest.mark.parametrize("cv", [1.0, 2.0])
def test_slora_gaps_mean_and_cv(cv: float) -> None:
    gaps = _gaps(_slora(cv=cv))
    assert len(gaps) == 20000
    assert gaps.mean() == pytest.approx(1 / 10.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.07)


def test_slora_adapter_law_matches_pmf() -> None:
    w = _slora()
    names = [a.name for a in w.adapters]
    c = Counter(r.adapter for r in w.requests)
    counts = np.array([c[n] for n in names], dtype=float)
    pmf = slora_adapter_pmf(50, 0.5)
    assert pmf.sum() == pytest.approx(1.0)
    assert np.all(np.diff(pmf) < 0)  # alpha < 1: adapter 0 most popular
    df = len(names) - 1
    assert _chi2(counts, pmf) < df + 5 * np.sqrt(2 * df)  # far below what a wrong law would give
    assert _chi2(counts, np.full(50, 1 / 50)) > 10 * df  # and clearly not uniform


def test_slora_alpha_one_is_uniform() -> None:
    np.testing.assert_allclose(slora_adapter_pmf(10, 1.0), np.full(10, 0.1))
    w = _slora(alpha=1.0, num_adapters=10, duration_s=1000.0)
    c = Counter(r.adapter for r in w.requests)
    assert _chi2(np.array([c[a.name] for a in w.adapters], dtype=float), np.full(10, 0.1)) < 9 + 5 * np.sqrt(18)


def test_slora_lengths_uniform_in_half_open_range() -> None:
    w = _slora(input_range=(8, 512), output_range=(16, 128))
    p = np.array([r.prompt_len for r in w.requests])
    o = np.array([r.output_len for r in w.requests])
    assert p.min() >= 8 and p.max() <= 511 and o.min() >= 16 and o.max() <= 127
    assert p.mean() == pytest.approx((8 + 511) / 2, rel=0.02)
    assert o.mean() == pytest.approx((16 + 127) / 2, rel=0.02)
    hist, _ = np.histogram(p, bins=4, range=(8, 512))
    np.testing.assert_allclose(hist / len(p), 0.25, rtol=0.08)


def test_slora_ranks_cycle_and_base_model_case() -> None:
    w = _slora(num_adapters=6, ranks=(64, 8), duration_s=10.0)
    assert [a.rank for a in w.adapters] == [64, 8, 64, 8, 64, 8]
    base = _slora(num_adapters=0, duration_s=10.0)
    assert base.adapters == () and all(r.adapter is None for r in base.requests)


# ----------------------------------------------------------------------------- paper setup


@pytest.fixture(scope="module")
def paper() -> Workload:
    return paper_workload(rate=10.0, duration_s=2500.0, seed=3)


def test_paper_adapters(paper: Workload) -> None:
    assert len(paper.adapters) == 100
    assert Counter(a.rank for a in paper.adapters) == {r: 20 for r in PAPER_RANKS}


def test_paper_reproducible() -> None:
    a = paper_workload(rate=5.0, duration_s=60.0, seed=11)
    assert a == paper_workload(rate=5.0, duration_s=60.0, seed=11)
    assert a.requests != paper_workload(rate=5.0, duration_s=60.0, seed=12).requests


def test_paper_poisson_arrivals(paper: Workload) -> None:
    gaps = _gaps(paper)
    assert len(paper) == pytest.approx(25000, rel=0.03)
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    assert 0 < paper.requests[0].arrival_s and paper.duration_s() < 2500.0


def test_paper_rank_uniform_zipf_within_rank(paper: Workload) -> None:
    ranks = paper.adapter_ranks()
    per_rank = Counter(ranks[r.adapter] for r in paper.requests if r.adapter)
    for rank in PAPER_RANKS:
        assert per_rank[rank] / len(paper) == pytest.approx(0.2, abs=0.015)
    within = Counter(int(r.adapter.split("-")[1]) for r in paper.requests if r.adapter)
    freqs = np.array([within[j] for j in range(20)], dtype=float) / len(paper)
    assert _loglog_slope(freqs) == pytest.approx(-1.0, abs=0.1)
    assert _chi2(freqs * len(paper), zipf_pmf(20, 1.0)) < 19 + 5 * np.sqrt(38)


def test_paper_lengths_come_from_trace(paper: Workload) -> None:
    pairs = {(r.context_tokens, r.generated_tokens) for r in load_trace("conv")}
    assert all((r.prompt_len, r.output_len) in pairs for r in paper.requests)
    clipped = paper_workload(rate=5.0, duration_s=200.0, seed=1, max_prompt_len=1000, max_output_len=64)
    assert max(r.prompt_len for r in clipped.requests) == 1000
    assert max(r.output_len for r in clipped.requests) == 64


def test_zipf_pmf() -> None:
    p = zipf_pmf(4, 1.0)
    np.testing.assert_allclose(p, np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (25 / 12))


# ----------------------------------------------------------------------------- traces


def test_bundled_traces_load() -> None:
    assert bundled_trace_path("conv").is_file()
    assert len(load_trace("conv")) == 19366
    assert len(load_trace("code")) == 8819
    with pytest.raises(KeyError):
        bundled_trace_path("nope")


def test_parse_timestamp_seven_digits() -> None:
    a = parse_timestamp("2023-11-16 18:15:46.6805900")
    b = parse_timestamp("2023-11-16 18:15:50.9951690")
    assert b - a == pytest.approx(4.314579, abs=1e-6)
    assert parse_timestamp("2023-11-16T18:15:46Z") == pytest.approx(a - 0.68059, abs=1e-6)
    assert parse_timestamp("2023-11-16 19:15:46.68059+01:00") == pytest.approx(a, abs=1e-6)
    assert parse_timestamp("12.5") == 12.5
    with pytest.raises(ValueError):
        parse_timestamp("yesterday")


def test_trace_lengths_are_the_rows() -> None:
    rows = _csv_rows("conv")
    w = trace_workload("conv", duration_s=600.0, seed=0)
    assert 0 < len(w) < len(rows)
    for req, (_, ctx, gen) in zip(w.requests, rows, strict=False):
        assert (req.prompt_len, req.output_len) == (ctx, gen)


def test_trace_native_replay_preserves_offsets() -> None:
    rows = load_trace("code")
    w = trace_workload("code", seed=0)
    assert len(w) == len(rows) and w.requests[0].arrival_s == 0.0
    offsets = np.array([r.timestamp_s for r in rows]) - rows[0].timestamp_s
    np.testing.assert_allclose([r.arrival_s for r in w.requests], offsets, atol=1e-9)


def test_trace_rescaled_rate_preserves_order_and_burstiness() -> None:
    native = trace_workload("conv", seed=0)
    fast = trace_workload("conv", rate=20.0, seed=0)
    assert fast.rate() == pytest.approx(20.0, rel=1e-9)
    a = np.array([r.arrival_s for r in native.requests])
    b = np.array([r.arrival_s for r in fast.requests])
    assert np.all(np.diff(b) >= 0)
    np.testing.assert_allclose(b[1:] / a[1:], native.rate() / 20.0, rtol=1e-9)  # one common factor
    assert [r.prompt_len for r in fast.requests] == [r.prompt_len for r in native.requests]


def test_trace_rate_and_duration_window() -> None:
    rows = _csv_rows("conv")
    w = trace_workload("conv", rate=8.0, duration_s=600.0, seed=0)
    assert len(w) == 4800 and w.duration_s() < 600.0
    assert w.rate() == pytest.approx(8.0, rel=1e-9)
    # the first 4800 rows, their gaps stretched by one common factor
    t = np.array([parse_timestamp(ts) for ts, _, _ in rows[:4800]])
    a = np.array([r.arrival_s for r in w.requests])
    np.testing.assert_allclose(a[1:] / (t[1:] - t[0]), a[-1] / (t[-1] - t[0]), rtol=1e-6)
    assert [(r.prompt_len, r.output_len) for r in w.requests] == [(c, g) for _, c, g in rows[:4800]]


def test_trace_cycles_when_too_short() -> None:
    n = len(load_trace("code"))
    w = trace_workload("code", rate=10.0, duration_s=2 * n / 10.0, seed=0)
    assert len(w) == pytest.approx(2 * n, abs=1)
    assert w.requests[n].prompt_len == w.requests[0].prompt_len
    assert w.rate() == pytest.approx(10.0, rel=1e-9)
    native = trace_workload("code", duration_s=3 * 3600.0, seed=0)  # no rate: native timing, cycled
    assert native.duration_s() < 3 * 3600.0 and len(native) == pytest.approx(3 * n, rel=0.1)
    assert [r.output_len for r in native.requests[n : 2 * n]] == [r.output_len for r in native.requests[:n]]


def test_trace_adapters_explicit_zipf_and_base_fraction() -> None:
    specs = [AdapterSpec(f"x{i}", 8) for i in range(10)]
    w = trace_workload("conv", adapters=specs, alpha=1.2, base_fraction=0.25, seed=5)
    assert w.adapters == tuple(specs)
    c = Counter(r.adapter for r in w.requests)
    assert c[None] / len(w) == pytest.approx(0.25, abs=0.015)
    counts = np.array([c[s.name] for s in specs], dtype=float)
    assert _chi2(counts, zipf_pmf(10, 1.2)) < 9 + 5 * np.sqrt(18)
    none = trace_workload("conv", adapters=(), seed=5)
    assert none.adapters == () and all(r.adapter is None for r in none.requests)
    paper_like = trace_workload("conv", duration_s=60.0, seed=5)
    assert len(paper_like.adapters) == 100


def test_trace_reproducible() -> None:
    assert trace_workload("conv", rate=4.0, duration_s=100.0, seed=1) == trace_workload(
        "conv", rate=4.0, duration_s=100.0, seed=1
    )
    assert (
        trace_workload("conv", rate=4.0, duration_s=100.0, seed=1).requests
        != trace_workload("conv", rate=4.0, duration_s=100.0, seed=2).requests
    )


def test_trace_file_path_zero_tokens_and_clipping(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
        "2023-11-16 18:00:00.0000000,100,0\r\n"
        "2023-11-16 18:00:01.5000000,5000,40\r\n"
        "2023-11-16 18:00:02.0000000,7,900\r\n",
        encoding="utf-8",
    )
    w = trace_workload(p, adapters=(), max_prompt_len=4096, max_output_len=512)
    assert [(r.arrival_s, r.prompt_len, r.output_len) for r in w.requests] == [
        (0.0, 100, 1),  # zero generated tokens clamped to 1
        (1.5, 4096, 40),
        (2.0, 7, 512),
    ]
    assert load_trace(str(p))[0].generated_tokens == 0  # load_trace itself keeps the raw values


def test_trace_rescale_needs_two_timestamps(tmp_path: Path) -> None:
    p = tmp_path / "one.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,1,1\n")
    with pytest.raises(ValueError):
        trace_workload(p, rate=1.0)


# ----------------------------------------------------------------------------- Workload value


def test_jsonl_round_trip(tmp_path: Path) -> None:
    w = paper_workload(rate=3.0, duration_s=30.0, seed=2)
    w = Workload(
        requests=w.requests + (WorkloadRequest("base", w.duration_s() + 1, 5, 6, None),),
        adapters=w.adapters,
        description=w.description,
    )
    path = tmp_path / "w.jsonl"
    w.to_jsonl(path)
    assert Workload.from_jsonl(path) == w


def test_workload_validation_and_rate() -> None:
    a = AdapterSpec("a", 8)
    r0 = WorkloadRequest("r0", 0.0, 1, 1, "a")
    r1 = WorkloadRequest("r1", 2.0, 1, 1, None)
    w = Workload(requests=[r0, r1], adapters=[a], description="")
    assert w.duration_s() == 2.0 and w.rate() == 0.5
    assert Workload(requests=(), adapters=(), description="").rate() == 0.0
    with pytest.raises(ValueError):
        Workload(requests=[r1, r0], adapters=[a])  # unsorted
    with pytest.raises(ValueError):
        Workload(requests=[r0], adapters=[])  # unknown adapter
    with pytest.raises(ValueError):
        Workload(requests=[r0, r0], adapters=[a])  # duplicate id
