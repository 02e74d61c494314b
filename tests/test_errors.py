"""Every user mistake gets a typed error from chameleon.errors, raised before any damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from chameleon import EngineConfig, SamplingParams
from chameleon.engine.factory import build_core
from chameleon.errors import (
    ChameleonError,
    ConfigError,
    InvalidSamplingParamsError,
    ModelLoadError,
    UnsupportedModelError,
)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"max_tokens": 1.5},
        {"temperature": -0.1},
        {"temperature": float("inf")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"seed": -1},
        {"stop": [""]},
        {"stop_token_ids": [-3]},
    ],
)
def test_invalid_sampling_params(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidSamplingParamsError):
        SamplingParams(**kwargs)


def test_sampling_params_accept_vllm_conventions() -> None:
    p = SamplingParams(stop="###", top_k=-1, temperature=0)
    assert p.stop == ("###",) and p.greedy


@pytest.mark.parametrize(
    "kwargs", [{"block_size": 0}, {"dtype": "float64"}, {"device": "tpu"}, {"max_model_len": -1}, {"scheduler": "lifo"}]
)
def test_invalid_engine_config(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        EngineConfig(**kwargs)


def test_max_model_len_beyond_the_model(tiny_llama: Path) -> None:
    with pytest.raises(ConfigError, match="max_model_len"):
        build_core(tiny_llama, EngineConfig(max_model_len=100_000))


def test_kv_cache_smaller_than_max_model_len(tiny_llama: Path) -> None:
    with pytest.raises(ConfigError, match="KV cache"):
        build_core(tiny_llama, EngineConfig(max_model_len=256, num_kv_blocks=4, block_size=16))


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        build_core(tmp_path, EngineConfig())


def test_unsupported_rope_type(tmp_path: Path, tiny_llama: Path) -> None:
    shutil.copytree(tiny_llama, tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        build_core(tmp_path / "m", EngineConfig())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}  # malformed: factors missing
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="invalid config.json"):
        build_core(tmp_path / "m", EngineConfig())


def test_missing_weights_and_pickle_only(tmp_path: Path, tiny_llama: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a directory"):
        build_core(tmp_path / "nowhere", EngineConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        build_core(tmp_path / "empty", EngineConfig())
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_llama / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ModelLoadError, match="pickle formats are never loaded"):
        build_core(pickled, EngineConfig())


def test_truncated_checkpoint(tmp_path: Path, tiny_llama: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_llama, tmp_path / "m")
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="down_proj"):
        build_core(tmp_path / "m", EngineConfig())
    weights["model.layers.1.mlp.down_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"].clone()  # wrong shape
    save_file(weights, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="shape"):
        build_core(tmp_path / "m", EngineConfig())
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot read"):
        build_core(tmp_path / "m", EngineConfig())


def test_every_error_is_a_chameleon_error() -> None:
    import inspect

    import chameleon.errors as errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) > 10 and all(issubclass(c, ChameleonError) for c in classes)
