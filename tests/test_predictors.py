"""Output-length predictors: clamping, the history predictor's levels, the oracles' error model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from chameleon.errors import ConfigError
from chameleon.sched.predictors import (
    HistoryPredictor,
    MissingTrueLengthError,
    NoisyOraclePredictor,
    OraclePredictor,
    OutputLengthPredictor,
    PredictionInput,
    make_predictor,
    prompt_bucket,
    within_tolerance,
)


def item(
    rid: str = "r",
    adapter: str | None = "a",
    prompt_len: int = 100,
    true: int | None = None,
    max_tokens: int | None = None,
) -> PredictionInput:
    return PredictionInput(rid, adapter, prompt_len, true_output_len=true, max_tokens=max_tokens)


# --- shared rules ----------------------------------------------------------------------------


def test_prediction_input_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        item(prompt_len=-1)
    with pytest.raises(ValueError):
        item(max_tokens=0)
    with pytest.raises(ValueError):
        item(true=-3)


def test_prompt_buckets_are_log2() -> None:
    assert [prompt_bucket(n) for n in (0, 1, 2, 3, 4, 7, 8, 1023, 1024)] == [0, 1, 2, 2, 3, 3, 4, 10, 11]


def test_every_predictor_meets_the_protocol() -> None:
    for name, kw in (("history", {}), ("oracle", {}), ("noisy-oracle", {"accuracy": 0.8})):
        assert isinstance(make_predictor(name, **kw), OutputLengthPredictor)


def test_make_predictor_rejects_unknown_names_and_arguments() -> None:
    with pytest.raises(ConfigError):
        make_predictor("bert")
    with pytest.raises(ConfigError):
        make_predictor("history", windw=3)
    with pytest.raises(ConfigError):
        make_predictor("noisy-oracle", accuracy=1.5)
    with pytest.raises(ConfigError):
        make_predictor("history", min_samples=100, window=10)


# --- oracle ----------------------------------------------------------------------------------


def test_oracle_returns_the_truth_clamped() -> None:
    oracle = OraclePredictor()
    assert oracle.predict(item(true=77)) == 77
    assert oracle.predict(item(true=77, max_tokens=50)) == 50
    assert oracle.predict(item(true=0)) == 1  # predictions are >= 1


def test_oracle_needs_the_truth() -> None:
    with pytest.raises(MissingTrueLengthError):
        OraclePredictor().predict(item())


# --- history ---------------------------------------------------------------------------------


def test_history_starts_from_the_prior_clamped() -> None:
    h = HistoryPredictor(prior=128)
    assert h.predict(item()) == 128
    assert h.predict(item(max_tokens=50)) == 50


def test_history_learns_per_adapter_lengths() -> None:
    h = HistoryPredictor(min_samples=3)
    for i in range(5):
        h.observe(item(adapter="sql", prompt_len=100), 10 + i)  # 10..14, median 12
        h.observe(item(adapter="chat", prompt_len=100), 300 + i)  # 300..304, median 302
    assert h.predict(item(adapter="sql", prompt_len=120)) == 12  # same bucket (64..127)
    assert h.predict(item(adapter="chat", prompt_len=70)) == 302
    assert h.predict(item(adapter="chat", prompt_len=70, max_tokens=100)) == 100


def test_history_quantile_is_lower_nearest_rank() -> None:
    values = [9, 1, 8, 2, 7, 3, 6, 4, 5]
    for q, expected in ((0.5, 5), (0.9, 9), (0.0, 1), (1.0, 9), (0.25, 3)):
        h = HistoryPredictor(min_samples=1, quantile=q)
        for v in values:
            h.observe(item(), v)
        assert h.predict(item()) == expected, q
    h = HistoryPredictor(min_samples=1)
    for v in (10, 20, 30, 40):
        h.observe(item(), v)
    assert h.predict(item()) == 20  # even count: the lower median


def test_history_falls_back_level_by_level() -> None:
    h = HistoryPredictor(min_samples=2, prior=999)
    # (adapter a, bucket of 100) gets 2 samples -> its own level is used
    h.observe(item(adapter="a", prompt_len=100), 10)
    h.observe(item(adapter="a", prompt_len=100), 10)
    assert h.predict(item(adapter="a", prompt_len=100)) == 10
    # adapter a, another bucket: (a, b') empty -> adapter level (samples 10, 10)
    h.observe(item(adapter="a", prompt_len=5000), 40)
    assert h.predict(item(adapter="a", prompt_len=5000)) == 10  # adapter a: [10, 10, 40] -> 10
    # unseen adapter in bucket of 100 -> bucket level: [10, 10]
    h.observe(item(adapter="b", prompt_len=3), 500)
    assert h.predict(item(adapter="c", prompt_len=100)) == 10
    # unseen adapter, unseen bucket -> global [10, 10, 40, 500] -> lower median 10
    assert h.predict(item(adapter="c", prompt_len=40)) == 10
    # the base model (adapter None) is an adapter of its own
    h.observe(item(adapter=None, prompt_len=40), 700)
    h.observe(item(adapter=None, prompt_len=40), 700)
    assert h.predict(item(adapter=None, prompt_len=40)) == 700


def test_history_prior_until_min_samples() -> None:
    h = HistoryPredictor(min_samples=3, prior=64)
    h.observe(item(), 5)
    h.observe(item(), 5)
    assert h.predict(item()) == 64  # 2 < 3 samples on every level
    h.observe(item(), 5)
    assert h.predict(item()) == 5


def test_history_window_forgets_old_lengths() -> None:
    h = HistoryPredictor(window=4, min_samples=4)
    for v in [1000] * 10 + [7, 7, 7, 7]:
        h.observe(item(), v)
    assert h.predict(item()) == 7
    assert h.samples("a", 100) == 4


def test_history_window_handles_duplicates_on_eviction() -> None:
    h = HistoryPredictor(window=3, min_samples=1, quantile=1.0)
    for v in (5, 5, 9, 1, 1, 1):
        h.observe(item(), v)
    assert h.predict(item()) == 1  # the 5s and the 9 are gone


def test_history_is_deterministic() -> None:
    seq = [(f"r{i}", "ab"[i % 2], (i * 37) % 3000, (i * 53) % 700) for i in range(300)]
    runs = []
    for _ in range(2):
        h = HistoryPredictor(min_samples=3)
        preds = []
        for rid, ad, plen, out in seq:
            preds.append(h.predict(item(rid, ad, plen)))
            h.observe(item(rid, ad, plen), out)
        runs.append(preds)
    assert runs[0] == runs[1]


# --- noisy oracle ----------------------------------------------------------------------------


def lengths(n: int) -> list[int]:
    return [1 + (i * 7919) % 2000 for i in range(n)]  # 1..2000, spread out deterministically


@pytest.mark.parametrize("accuracy", [0.8, 0.5, 0.95])
def test_noisy_oracle_accuracy_is_the_fraction_within_tolerance(accuracy: float) -> None:
    p = NoisyOraclePredictor(accuracy, seed=3)
    trues = lengths(10_000)
    hits = sum(within_tolerance(p.predict(item(f"r{i}", true=t)), t, 0.10) for i, t in enumerate(trues))
    assert abs(hits / len(trues) - accuracy) <= 0.02


def test_noisy_oracle_wrong_answers_leave_the_band() -> None:
    p = NoisyOraclePredictor(0.0, seed=1)
    for i, t in enumerate(lengths(2000)):
        pred = p.predict(item(f"r{i}", true=t))
        assert pred >= 1
        if t > 1:  # true 1: only 'over' exists, still outside the band
            assert not within_tolerance(pred, t, 0.10)
        assert pred <= 2 * t + 1  # max_over_error 1.0


def test_noisy_oracle_extremes_and_clamping() -> None:
    exact = NoisyOraclePredictor(1.0)
    assert all(exact.predict(item(f"r{i}", true=t)) == t for i, t in enumerate(lengths(200)))
    never = NoisyOraclePredictor(0.0)
    for i in range(500):
        pred = never.predict(item(f"r{i}", true=100, max_tokens=100))
        assert pred < 90  # over is impossible at the cap, so every wrong answer is under
    assert never.predict(item("x", true=1, max_tokens=1)) == 1  # no wrong answer exists
    assert never.predict(item("y", true=1)) >= 2


def test_noisy_oracle_is_deterministic_per_request() -> None:
    a = NoisyOraclePredictor(0.5, seed=7)
    b = NoisyOraclePredictor(0.5, seed=7)
    ids = [f"r{i}" for i in range(100)]
    forward = [a.predict(item(r, true=300)) for r in ids]
    backward = [b.predict(item(r, true=300)) for r in reversed(ids)][::-1]
    assert forward == backward
    other = [NoisyOraclePredictor(0.5, seed=8).predict(item(r, true=300)) for r in ids]
    assert other != forward


def test_noisy_oracle_validates() -> None:
    for kw in ({"accuracy": -0.1}, {"accuracy": 0.5, "tolerance": 0.0}, {"accuracy": 0.5, "max_under_error": 1.0}):
        with pytest.raises(ConfigError):
            NoisyOraclePredictor(**kw)
    with pytest.raises(MissingTrueLengthError):
        NoisyOraclePredictor(0.5).predict(item())


# --- purity ----------------------------------------------------------------------------------

ALLOWED = {"__future__", "attrs", "numpy", "chameleon.errors", "chameleon.sched.mlq.quotas"}
STDLIB = {"bisect", "math", "random", "collections", "collections.abc", "typing", "fractions", "types"}


@pytest.mark.parametrize(
    "module",
    ["sched/predictors.py", "sched/mlq/sizing.py", "sched/mlq/clustering.py", "sched/mlq/quotas.py", "sched/mlq/estimators.py"],
)
def test_policy_modules_import_nothing_heavy(module: str) -> None:
    """Policy code runs under the simulator: no torch, no model, no executors, nothing async."""
    tree = ast.parse((Path(__file__).parents[1] / "chameleon" / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported <= ALLOWED | STDLIB, imported - ALLOWED - STDLIB
