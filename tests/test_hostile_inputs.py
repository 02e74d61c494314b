"""Hostile inputs get typed errors (issue 12): sampling values, engine config, adapter weights, and a
sampler that fails only the rows it cannot sample."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chameleon import EngineConfig, SamplingParams
from chameleon.errors import (
    AdapterError,
    AdapterQuarantinedError,
    AdapterValidationError,
    ChameleonError,
    ConfigError,
    EngineOverloadedError,
    InvalidSamplingParamsError,
    SamplingError,
    UnsafeAdapterPatternError,
)
from chameleon.executor.sampler import sample, sample_from_hidden, sample_rows, sample_rows_from_hidden
from chameleon.lora.peft_adapter import MAX_ABS_WEIGHT, BaseModelSpec, load_peft_adapter

# --- SamplingParams -------------------------------------------------------------------------------

REFUSED: list[dict[str, Any]] = [
    {"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1e5}, {"temperature": float("nan")},
    {"temperature": True}, {"temperature": "1"}, {"temperature": 1j},
    {"top_p": 1e-320}, {"top_p": 1e-9}, {"top_p": float("nan")}, {"top_p": True}, {"top_p": "0.5"},
    {"max_tokens": True}, {"max_tokens": 2.0}, {"max_tokens": None},
    {"top_k": True}, {"top_k": 1.0}, {"seed": True}, {"seed": 1.0}, {"seed": 2**63},
    {"stop": b"x"}, {"stop": {"a": 1}}, {"stop": {"a"}}, {"stop": 5}, {"stop": [b"x"]}, {"stop": iter(["a"])},
    {"stop_token_ids": [True]}, {"stop_token_ids": [1.0]}, {"stop_token_ids": "abc"}, {"stop_token_ids": b"ab"},
    {"stop_token_ids": {1, 2}}, {"stop_token_ids": 5}, {"stop_token_ids": [2**40]}, {"stop_token_ids": {1: 2}},
    {"ignore_eos": 1}, {"include_stop_str_in_output": "yes"}, {"output_kind": "stream"}, {"output_kind": 1},
    {"output_kind": ["delta"]},
]


@pytest.mark.parametrize("kwargs", REFUSED, ids=repr)
def test_degenerate_sampling_values_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidSamplingParamsError):
        SamplingParams(**kwargs)


def test_bounds_and_output_kind_are_accepted() -> None:
    for kind in ("delta", "cumulative", "final"):
        assert SamplingParams(output_kind=kind).output_kind == kind
    assert SamplingParams().output_kind == "delta"
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=1e-3).greedy
    p = SamplingParams(temperature=1e4, top_p=1e-6, stop=["a", "b"], stop_token_ids=(0, 2**31 - 1), seed=2**63 - 1)
    assert p.stop == ("a", "b") and p.stop_token_ids == (0, 2**31 - 1)


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    st.complex_numbers(), st.text(max_size=5), st.binary(max_size=5),
    st.lists(st.one_of(st.integers(), st.text(max_size=3), st.booleans(), st.floats()), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.frozensets(st.integers(), max_size=2),
    st.sampled_from(["delta", "final", "cumulative"]),
)
FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
          "include_stop_str_in_output", "output_kind")


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), JUNK, max_size=4))
def test_random_junk_constructs_or_raises_the_typed_error(kwargs: dict[str, Any]) -> None:
    try:
        p = SamplingParams(**kwargs)
    except InvalidSamplingParamsError:
        return
    assert isinstance(p.max_tokens, int) and not isinstance(p.max_tokens, bool) and p.max_tokens >= 1
    assert not isinstance(p.temperature, bool) and (p.temperature == 0 or 1e-3 <= p.temperature <= 1e4)
    assert not isinstance(p.top_p, bool) and 1e-6 <= p.top_p <= 1
    assert all(isinstance(s, str) for s in p.stop)
    assert all(type(t) is int for t in p.stop_token_ids)


# --- EngineConfig -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_queued_requests": 0}, {"max_queued_requests": True}, {"max_queued_requests": 1.5},
        {"adapter_prefetch_depth": -1}, {"adapter_prefetch_depth": True}, {"adapter_prefetch_depth": "8"},
        {"adapter_arrival_prefetch": 1}, {"adapter_arrival_prefetch": "yes"},
        {"seed": True}, {"seed": -1}, {"seed": 1.5}, {"seed": None},
        {"scheduler_options": "fast"}, {"max_loras": True}, {"num_threads": False}, {"dtype": ["float32"]},
    ],
    ids=repr,
)
def test_every_engine_config_field_is_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        EngineConfig(**kwargs)


def test_engine_config_defaults() -> None:
    c = EngineConfig()
    assert c.max_queued_requests == 4096 and c.adapter_prefetch_depth == 8 and c.seed == 0
    c = EngineConfig(adapter_prefetch_depth=0, max_queued_requests=1, adapter_arrival_prefetch=True)
    assert c.max_queued_requests == 1


def test_new_error_types() -> None:
    assert issubclass(EngineOverloadedError, ChameleonError)
    assert issubclass(AdapterQuarantinedError, AdapterError)
    assert issubclass(UnsafeAdapterPatternError, AdapterValidationError)
    e = SamplingError("x", rows=(1,), tokens=(3, None))
    assert isinstance(e, ChameleonError) and e.rows == (1,) and e.tokens == (3, None)


# --- sampler: a bad row fails alone ---------------------------------------------------------------

VOCAB = 50


def _batch() -> tuple[torch.Tensor, list[SamplingParams]]:
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    logits[1, 7] = float("nan")  # sampled row with a NaN
    logits[2, 3] = float("inf")  # sampled row with +inf
    logits[3] = float("-inf")  # nothing left to sample
    logits[4, 0] = float("nan")  # greedy row: argmax of NaN is garbage
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=20)] * 4 + [SamplingParams(temperature=0)] * 2
    return logits, params


def _gens(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 + i) for i in range(n)]


def test_non_finite_rows_fail_alone_and_the_rest_are_unchanged() -> None:
    logits, params = _batch()
    tokens = sample_rows(logits, params, _gens(6))
    assert [t is None for t in tokens] == [False, True, True, True, True, False]
    gens = _gens(6)  # each good row alone, with the same generator: same token
    assert tokens[0] == sample_rows(logits[[0]], params[:1], gens[:1])[0]
    assert tokens[5] == int(logits[5].argmax())
    assert tokens == sample_rows(logits, params, _gens(6))  # deterministic


def test_sample_raises_typed_with_the_failed_rows() -> None:
    logits, params = _batch()
    with pytest.raises(SamplingError) as info:
        sample(logits, params, _gens(6))
    assert info.value.rows == (1, 2, 3, 4)
    assert info.value.tokens == tuple(sample_rows(logits, params, _gens(6)))
    good = [0, 5]
    assert sample(logits[good], [params[i] for i in good], [_gens(6)[i] for i in good]) == [
        info.value.tokens[0], info.value.tokens[5]]


def test_sample_from_hidden_fails_non_finite_hidden_rows_greedy_included() -> None:
    head = torch.randn(VOCAB, 8, generator=torch.Generator().manual_seed(2))
    hidden = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    hidden[1, 0] = float("nan")  # greedy
    hidden[2, 5] = float("inf")  # sampled
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.0, seed=1)]
    kw: dict[str, Any] = {"logits": lambda h: h @ head.T, "greedy": lambda h: (h @ head.T).argmax(-1)}
    tokens = sample_rows_from_hidden(hidden, params, _gens(4), **kw)
    assert [t is None for t in tokens] == [False, True, True, False]
    assert tokens[0] == int((hidden[0] @ head.T).argmax())
    assert tokens[3] == sample_rows(hidden[[3]] @ head.T, params[3:], _gens(4)[3:])[0]
    with pytest.raises(SamplingError, match=r"rows \[1, 2\]"):
        sample_from_hidden(hidden, params, _gens(4), **kw)


def test_extreme_accepted_values_still_sample() -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(4)) * 30
    params = [SamplingParams(temperature=1e-3), SamplingParams(temperature=1e4), SamplingParams(top_p=1e-6)]
    tokens = sample(logits, params, _gens(3))
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    assert 0 <= tokens[1] < VOCAB


# --- adapter weights ------------------------------------------------------------------------------

BASE = BaseModelSpec(
    num_layers=1,
    module_shapes={"q_proj": (16, 16), "k_proj": (16, 8), "v_proj": (16, 8), "o_proj": (16, 16),
                   "gate_proj": (16, 32), "up_proj": (16, 32), "down_proj": (32, 16)},
    dtype=torch.float32,
)
CONFIG = '{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}'
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def write_adapter(path: Path, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(CONFIG)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(2, 16, generator=g) if a is None else a
    b = torch.randn(16, 2, generator=g) if b is None else b
    safetensors.torch.save_file({A_KEY: a, B_KEY: b}, str(path / "adapter_model.safetensors"))
    return path


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.int8, torch.float64, torch.uint8])
def test_non_float_weights_are_refused_not_cast(tmp_path: Path, dtype: torch.dtype) -> None:
    path = write_adapter(tmp_path / "ad", a=torch.ones(2, 16).to(dtype))
    with pytest.raises(AdapterValidationError, match="dtype"):
        load_peft_adapter("ad", path, BASE, max_lora_rank=8)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), MAX_ABS_WEIGHT * 2, 1e30])
def test_non_finite_and_huge_weights_are_refused(tmp_path: Path, value: float) -> None:
    b = torch.zeros(16, 2)
    b[3, 1] = value
    with pytest.raises(AdapterValidationError, match="non-finite|magnitude"):
        load_peft_adapter("ad", write_adapter(tmp_path / "ad", b=b), BASE, max_lora_rank=8)


def test_large_but_plausible_weights_load(tmp_path: Path) -> None:
    a = torch.full((2, 16), MAX_ABS_WEIGHT / 2)
    adapter = load_peft_adapter("ad", write_adapter(tmp_path / "ad", a=a), BASE, max_lora_rank=8)
    assert math.isclose(float(adapter.weights[(0, "q_proj")].a.max()), MAX_ABS_WEIGHT / 2)
