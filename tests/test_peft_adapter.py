"""PEFT LoRA adapter loading: real adapters saved by peft on a tiny Llama, and every refusal."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import peft
import pytest
import safetensors.torch
import torch
import transformers

from chameleon.errors import (
    AdapterLoadError,
    AdapterValidationError,
    UnsafeAdapterFormatError,
    UnsupportedAdapterError,
)
from chameleon.lora import peft_adapter
from chameleon.lora.peft_adapter import BaseModelSpec, LoRAAdapter, load_peft_adapter
from chameleon.lora.peft_config import read_adapter_config
from chameleon.model.geometry import TARGET_MODULES

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB = 64, 128, 4, 2, 2, 128
KV_OUT = KV_HEADS * HIDDEN // HEADS


def _llama_config(hidden: int = HIDDEN) -> Any:
    return transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        num_hidden_layers=LAYERS, vocab_size=VOCAB,
    )


BASE = BaseModelSpec.from_hf_config(_llama_config(), torch.float32)


def _peft_model(**lora_kwargs: Any) -> Any:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config())
    lora_kwargs.setdefault("init_lora_weights", False)  # else lora_B is zero and nothing is checked
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**lora_kwargs))


def _save(tmp_path: Path, **lora_kwargs: Any) -> Path:
    out = tmp_path / "adapter"
    model = _peft_model(**lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embedding / lora_bias refusal cases make peft warn while saving
        model.save_pretrained(str(out))
    return out


def _reload(path: Path) -> Any:
    """What PEFT itself serves from the saved directory: the reference for our loader."""
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM(_llama_config()), str(path)).eval()


def _lora_layers(model: Any) -> dict[tuple[int, str], Any]:
    out = {}
    for i, layer in enumerate(model.base_model.model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGET_MODULES:
                mod = getattr(parent, name, None)
                if mod is not None and hasattr(mod, "lora_A"):
                    out[(i, name)] = mod
    return out


def _write(path: Path, config: Mapping[str, Any] | str | None, tensors: Mapping[str, torch.Tensor] | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (path / "adapter_config.json").write_text(text)
    if tensors is not None:
        safetensors.torch.save_file(dict(tensors), str(path / "adapter_model.safetensors"))
    return path


def _key(layer: int, module: str, ab: str) -> str:
    parent = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_{ab}.weight"


def _q_tensors(rank: int = 4, layers: int = LAYERS, out: int = HIDDEN) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {}
    for i in range(layers):
        t[_key(i, "q_proj", "A")] = torch.randn(rank, HIDDEN, generator=g)
        t[_key(i, "q_proj", "B")] = torch.randn(out, rank, generator=g)
    return t


Q_CONFIG: dict[str, Any] = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


def _load(path: Path, base: BaseModelSpec = BASE, max_lora_rank: int = 64, **kw: Any) -> LoRAAdapter:
    return load_peft_adapter("ad", path, base, max_lora_rank=max_lora_rank, **kw)


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusals must happen from JSON + header alone: reading tensor data (or unpickling) fails the test."""

    def boom(*_: Any, **__: Any) -> Any:
        raise AssertionError("tensor data read before validation finished")

    monkeypatch.setattr(peft_adapter, "_read_module_tensors", boom)
    monkeypatch.setattr(safetensors.torch, "load_file", boom)
    monkeypatch.setattr(torch, "load", boom)


# --- loading real PEFT adapters -------------------------------------------------------------------

CASES: dict[str, dict[str, Any]] = {
    "r8_qv": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "r16_all_list": {"r": 16, "lora_alpha": 8, "target_modules": list(TARGET_MODULES)},
    "r64_all_linear": {"r": 64, "lora_alpha": 32, "target_modules": "all-linear"},
    "rslora": {"r": 16, "lora_alpha": 32, "use_rslora": True, "target_modules": ["k_proj", "down_proj"]},
    "patterns": {
        "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"v_proj": 4, "layers.1.mlp.down_proj": 12},
        "alpha_pattern": {"q_proj": 3, "model.layers.0.mlp.down_proj": 40},
    },
    "rslora_patterns": {
        "r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["o_proj"], "rank_pattern": {"o_proj": 32}
    },
    "regex": {"r": 8, "lora_alpha": 16, "target_modules": r"model\.layers\.1\.(self_attn\.(q|k)|mlp\.up)_proj"},
    "layers_list": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "gate_proj"], "layers_to_transform": [1]},
    "layers_int_pattern": {
        "r": 8, "lora_alpha": 16, "target_modules": ["v_proj"], "layers_to_transform": 0, "layers_pattern": "layers"
    },
    "exclude": {
        "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "up_proj"], "exclude_modules": ["layers.0.mlp.up_proj"]
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_loaded_weights_match_peft(tmp_path: Path, case: str) -> None:
    path = _save(tmp_path, **CASES[case])
    ref = _lora_layers(_reload(path))
    adapter = _load(path)

    assert set(adapter.weights) == set(ref)
    assert adapter.target_modules == tuple(sorted({m for _, m in ref}))
    assert adapter.rank == CASES[case]["r"]
    assert adapter.max_rank == max(layer.r["default"] for layer in ref.values())
    for key, layer in ref.items():
        w = adapter.weights[key]
        scale = layer.scaling["default"]
        assert (w.layer, w.module, w.rank) == (*key, layer.r["default"])
        assert w.scale == pytest.approx(scale, rel=1e-12)
        torch.testing.assert_close(w.a, layer.lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(w.b_t, layer.lora_B["default"].weight.T * scale)
        assert w.b_t.is_contiguous() and w.a.is_contiguous()
    assert adapter.nbytes == sum(w.a.nbytes + w.b_t.nbytes for w in adapter.weights.values())


def test_patterns_resolve_per_module(tmp_path: Path) -> None:
    adapter = _load(_save(tmp_path, **CASES["patterns"]))
    w = adapter.weights
    assert w[(0, "v_proj")].rank == 4 and w[(0, "v_proj")].scale == 16 / 4
    assert w[(1, "down_proj")].rank == 12 and w[(1, "down_proj")].scale == 16 / 12
    assert w[(0, "down_proj")].rank == 8 and w[(0, "down_proj")].scale == 40 / 8
    assert w[(1, "q_proj")].scale == 3 / 8
    assert adapter.max_rank == 12


def test_delta_matches_peft_forward(tmp_path: Path) -> None:
    path = _save(tmp_path, **CASES["patterns"])
    ref = _lora_layers(_reload(path))
    adapter = _load(path)
    torch.manual_seed(2)
    for key in [(0, "q_proj"), (1, "down_proj"), (0, "v_proj")]:
        layer, w = ref[key], adapter.weights[key]
        x = torch.randn(5, w.a.shape[1])
        with torch.no_grad():
            expected = layer(x) - layer.base_layer(x)  # PEFT's own forward, dropout is identity in eval
        torch.testing.assert_close(x @ w.a.T @ w.b_t, expected, rtol=1e-4, atol=1e-5)


def test_casts_to_requested_dtype(tmp_path: Path) -> None:
    path = _save(tmp_path, **CASES["r8_qv"])
    ref = _lora_layers(_reload(path))
    adapter = _load(path, dtype=torch.bfloat16)
    assert adapter.dtype == torch.bfloat16
    w, layer = adapter.weights[(1, "v_proj")], ref[(1, "v_proj")]
    assert w.a.dtype == w.b_t.dtype == torch.bfloat16
    expected = (layer.lora_B["default"].weight.T * layer.scaling["default"]).to(torch.bfloat16)
    assert torch.equal(w.b_t, expected)  # folded in fp32, rounded once
    default = _load(path, base=BaseModelSpec.from_hf_config(_llama_config(), torch.float16))
    assert default.dtype == torch.float16 and default.weights[(0, "q_proj")].a.dtype == torch.float16


def test_tensors_read_only_through_the_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The no_tensor_reads fixture patches `_read_module_tensors`; prove it is the path data takes."""
    calls: list[int] = []
    real = peft_adapter._read_module_tensors

    def spy(path: Path, plans: Any, who: str) -> Any:
        calls.append(len(plans))
        return real(path, plans, who)

    monkeypatch.setattr(peft_adapter, "_read_module_tensors", spy)
    adapter = _load(_save(tmp_path, **CASES["r8_qv"]))
    assert calls == [len(adapter.weights)] == [4]


def test_content_hash(tmp_path: Path) -> None:
    a = _save(tmp_path / "a", **CASES["r8_qv"])
    b = tmp_path / "copy"
    shutil.copytree(a, b)
    assert _load(a).content_hash == _load(b).content_hash  # content, not location
    cfg = json.loads((b / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 17
    (b / "adapter_config.json").write_text(json.dumps(cfg))
    assert _load(a).content_hash != _load(b).content_hash


def test_read_adapter_config(tmp_path: Path) -> None:
    path = _save(tmp_path, **CASES["patterns"])
    cfg = read_adapter_config(path)
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (8, 16.0, False)
    assert cfg.target_modules == ("down_proj", "q_proj", "v_proj")
    # save_pretrained writes JSON with sort_keys, and PEFT matches patterns in file order.
    assert cfg.rank_pattern == (("layers.1.mlp.down_proj", 12), ("v_proj", 4))
    assert cfg.rank_for("model.layers.1.mlp.down_proj") == 12
    assert cfg.rank_for("model.layers.0.mlp.down_proj") == 8
    assert read_adapter_config(path / "adapter_config.json") == cfg


def test_pattern_order_follows_file(tmp_path: Path, no_tensor_reads: None) -> None:
    # PEFT trains with the user's dict order but reloads in the file's sorted order; "layers.0..." now wins
    # over "q_proj" for layer 0, so PEFT itself cannot reload this adapter. We refuse it the same way.
    path = _save(tmp_path, r=8, lora_alpha=16, target_modules=["q_proj"],
                 rank_pattern={"q_proj": 4, "layers.0.self_attn.q_proj": 12})
    with pytest.raises(AdapterValidationError, match=r"rank 4 .*gives rank 12"):
        _load(path)


def test_base_spec_from_hf_configs() -> None:
    llama = _llama_config()
    spec = BaseModelSpec.from_hf_config(llama, torch.bfloat16)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama)
    layer = model.model.layers[0]
    for name in TARGET_MODULES:
        lin = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
        assert spec.module_shapes[name] == (lin.in_features, lin.out_features)
    assert (spec.num_layers, spec.dtype) == (LAYERS, torch.bfloat16)
    qwen = transformers.Qwen2Config(hidden_size=96, intermediate_size=160, num_attention_heads=6,
                                    num_key_value_heads=2, num_hidden_layers=3)
    qspec = BaseModelSpec.from_hf_config(qwen, torch.float16)
    assert qspec.module_shapes["k_proj"] == (96, 32) and qspec.module_shapes["o_proj"] == (96, 96)
    mistral = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                         num_key_value_heads=1, head_dim=32, num_hidden_layers=1)
    mspec = BaseModelSpec.from_hf_config(mistral, torch.float32)
    assert mspec.module_shapes["q_proj"] == (64, 128) and mspec.module_shapes["v_proj"] == (64, 32)


def test_hand_written_adapter_loads(tmp_path: Path) -> None:
    tensors = _q_tensors()
    adapter = _load(_write(tmp_path / "ok", Q_CONFIG, tensors))
    w = adapter.weights[(1, "q_proj")]
    assert torch.equal(w.a, tensors[_key(1, "q_proj", "A")])
    torch.testing.assert_close(w.b_t, tensors[_key(1, "q_proj", "B")].T * 2.0)


# --- refusals -----------------------------------------------------------------------------------------


def test_bin_only_is_unsafe(tmp_path: Path, no_tensor_reads: None) -> None:
    path = _write(tmp_path / "bin", Q_CONFIG, None)
    (path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeAdapterFormatError, match=r"'ad'.*adapter_model\.bin.*never unpickle.*safetensors"):
        _load(path)


def test_missing_files(tmp_path: Path, no_tensor_reads: None) -> None:
    with pytest.raises(AdapterLoadError, match="does not exist"):
        _load(tmp_path / "nope")
    no_weights = _write(tmp_path / "no_weights", Q_CONFIG, None)
    with pytest.raises(AdapterLoadError, match="missing adapter_model.safetensors") as e:
        _load(no_weights)
    assert not isinstance(e.value, UnsafeAdapterFormatError)
    with pytest.raises(AdapterLoadError, match="missing adapter_config.json"):
        _load(_write(tmp_path / "no_config", None, _q_tensors()))
    with pytest.raises(AdapterLoadError, match="missing adapter_config.json"):
        read_adapter_config(tmp_path / "no_config")


def test_corrupt_files(tmp_path: Path, no_tensor_reads: None) -> None:
    with pytest.raises(AdapterLoadError, match="cannot parse adapter_config.json"):
        _load(_write(tmp_path / "json", '{"peft_type": "LORA", "r": ', _q_tensors()))
    with pytest.raises(AdapterLoadError, match="JSON object"):
        _load(_write(tmp_path / "list", "[1, 2]", _q_tensors()))
    bad = _write(tmp_path / "st", Q_CONFIG, None)
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(AdapterLoadError, match="cannot read adapter_model.safetensors"):
        _load(bad)


@pytest.mark.parametrize(
    ("lora_kwargs", "error", "pattern"),
    [
        ({"use_dora": True}, UnsupportedAdapterError, r"DoRA"),
        ({"modules_to_save": ["lm_head"]}, UnsupportedAdapterError, r"modules_to_save"),
        ({"target_modules": ["embed_tokens", "q_proj"]}, UnsupportedAdapterError, r"embedding.*embed_tokens"),
        ({"target_modules": r".*(embed_tokens|q_proj)"}, UnsupportedAdapterError, r"embedding.*model\.embed_tokens"),
        ({"target_modules": ["lm_head"]}, UnsupportedAdapterError, r"embedding.*lm_head"),
        ({"bias": "lora_only"}, UnsupportedAdapterError, r"bias='lora_only'.*expected 'none'"),
        ({"lora_bias": True}, UnsupportedAdapterError, r"lora_bias"),
        ({"init_lora_weights": "pissa"}, UnsupportedAdapterError, r"init_lora_weights='pissa'.*residual"),
    ],
)
def test_peft_features_refused(
    tmp_path: Path, no_tensor_reads: None, lora_kwargs: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    kwargs: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    kwargs.update(lora_kwargs)
    path = _save(tmp_path, **kwargs)
    with pytest.raises(error, match=r"'ad'.*" + pattern):
        _load(path)


@pytest.mark.parametrize(
    ("extra", "error", "pattern"),
    [
        ({"peft_type": "ADALORA"}, UnsupportedAdapterError, r"peft_type is 'ADALORA', expected 'LORA'"),
        ({"fan_in_fan_out": True}, UnsupportedAdapterError, r"fan_in_fan_out"),
        ({"use_qalora": True}, UnsupportedAdapterError, r"QA-LoRA"),
        ({"target_parameters": ["mlp.experts.down_proj"]}, UnsupportedAdapterError, r"target_parameters"),
        ({"megatron_config": {"tp": 2}}, UnsupportedAdapterError, r"megatron_config"),
        ({"layer_replication": [[0, 2]]}, UnsupportedAdapterError, r"layer_replication"),
        ({"trainable_token_indices": [3]}, UnsupportedAdapterError, r"trainable_token_indices"),
        ({"some_future_option": "on"}, UnsupportedAdapterError, r"unknown adapter_config fields.*some_future_option"),
        ({"target_modules": ["q_proj", "qkv_proj", "fc1"]}, AdapterValidationError,
         r"unknown target modules \['fc1', 'qkv_proj'\]"),
        ({"target_modules": r".*layers\.0"}, AdapterValidationError, r"non-linear modules \['model\.layers\.0'\]"),
        ({"target_modules": "nothing_matches"}, AdapterValidationError, r"matches no module"),
        ({"r": 0}, AdapterLoadError, r"r must be a positive int, got 0"),
        ({"rank_pattern": {"q_proj(": 4}}, AdapterLoadError, r"rank_pattern key 'q_proj\(' is not a valid regex"),
        ({"target_modules": "q_proj", "layers_to_transform": [0]}, AdapterLoadError, r"cannot be used with a regex"),
    ],
)
def test_config_refusals(
    tmp_path: Path, no_tensor_reads: None, extra: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    path = _write(tmp_path / "cfg", {**Q_CONFIG, **extra}, _q_tensors())
    with pytest.raises(error, match=r"'ad'.*" + pattern):
        _load(path)


def test_harmless_fields_ignored(tmp_path: Path) -> None:
    extra = {"task_type": "CAUSAL_LM", "lora_dropout": 0.1, "enable_lora": None, "merge_weights": False,
             "init_lora_weights": "gaussian", "inference_mode": True, "megatron_core": "megatron.core"}
    assert len(_load(_write(tmp_path / "ok", {**Q_CONFIG, **extra}, _q_tensors())).weights) == LAYERS


def test_rank_above_limit(tmp_path: Path, no_tensor_reads: None) -> None:
    path = _save(tmp_path, r=16, lora_alpha=16, target_modules=["q_proj"])
    with pytest.raises(AdapterValidationError, match=r"'ad'.*q_proj has rank 16, above the engine's max_lora_rank 8"):
        _load(path, max_lora_rank=8)


def test_shape_mismatch_vs_base(tmp_path: Path, no_tensor_reads: None) -> None:
    path = _save(tmp_path, r=8, lora_alpha=16, target_modules=["q_proj"])
    base96 = BaseModelSpec.from_hf_config(_llama_config(hidden=96), torch.float32)
    with pytest.raises(AdapterValidationError, match=r"'ad'.*q_proj\.lora_A\.weight' has shape \(8, 64\), "
                                                     r"expected \(8, 96\) = \(rank, in_features\)"):
        _load(path, base=base96)


def test_layer_out_of_range(tmp_path: Path, no_tensor_reads: None) -> None:
    path = _save(tmp_path, r=8, lora_alpha=16, target_modules=["q_proj"])
    one_layer = BaseModelSpec(num_layers=1, module_shapes=BASE.module_shapes, dtype=torch.float32)
    with pytest.raises(AdapterValidationError, match=r"'ad'.*layers\.1\..*layer 1, but the base model has 1 layers"):
        _load(path, base=one_layer)


def test_unknown_module_key(tmp_path: Path, no_tensor_reads: None) -> None:
    tensors = {**_q_tensors(), "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight": torch.zeros(4, 64)}
    with pytest.raises(AdapterValidationError, match=r"'ad'.*qkv_proj.*unknown module self_attn\.qkv_proj"):
        _load(_write(tmp_path / "bogus", Q_CONFIG, tensors))


@pytest.mark.parametrize(
    ("key", "error", "pattern"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", AdapterValidationError,
         r"unexpected key .*lora_A\.default\.weight"),
        ("base_model.model.model.embed_tokens.lora_embedding_A", UnsupportedAdapterError, r"embedding"),
        ("base_model.model.lm_head.weight", UnsupportedAdapterError, r"embedding / lm_head"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", UnsupportedAdapterError, r"DoRA"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", UnsupportedAdapterError, r"biases"),
        ("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight", AdapterValidationError,
         r"unknown module mlp\.q_proj"),
    ],
)
def test_unexpected_keys(
    tmp_path: Path, no_tensor_reads: None, key: str, error: type[Exception], pattern: str
) -> None:
    tensors = {**_q_tensors(), key: torch.zeros(4, 64)}
    with pytest.raises(error, match=r"'ad'.*" + pattern):
        _load(_write(tmp_path / "extra", Q_CONFIG, tensors))


def test_wrong_dtype(tmp_path: Path, no_tensor_reads: None) -> None:
    tensors = _q_tensors()
    tensors[_key(0, "q_proj", "B")] = torch.ones(HIDDEN, 4, dtype=torch.int32)
    with pytest.raises(AdapterValidationError, match=r"'ad'.*layers\.0\.self_attn\.q_proj\.lora_B.*dtype I32, "
                                                     r"expected one of \['BF16', 'F16', 'F32'\]"):
        _load(_write(tmp_path / "int", Q_CONFIG, tensors))


def test_unpaired_a(tmp_path: Path, no_tensor_reads: None) -> None:
    tensors = _q_tensors()
    del tensors[_key(1, "q_proj", "B")]
    with pytest.raises(AdapterValidationError, match=r"'ad'.*layers\.1\.self_attn\.q_proj has .*lora_A.* no matching "
                                                     r"lora_B\.weight"):
        _load(_write(tmp_path / "unpaired", Q_CONFIG, tensors))


def test_rank_disagrees_with_config(tmp_path: Path, no_tensor_reads: None) -> None:
    path = _write(tmp_path / "rank", {**Q_CONFIG, "r": 8}, _q_tensors(rank=4))
    with pytest.raises(AdapterValidationError, match=r"'ad'.*has rank 4 \(shape \(4, 64\)\).*gives rank 8"):
        _load(path)


def test_weights_not_targeted_by_config(tmp_path: Path, no_tensor_reads: None) -> None:
    path = _write(tmp_path / "untargeted", {**Q_CONFIG, "layers_to_transform": [0]}, _q_tensors())
    with pytest.raises(AdapterValidationError, match=r"'ad'.*model\.layers\.1\.self_attn\.q_proj, which the adapter "
                                                     r"config does not target"):
        _load(path)


def test_targeted_weights_missing(tmp_path: Path, no_tensor_reads: None) -> None:
    path = _write(tmp_path / "missing", {**Q_CONFIG, "target_modules": ["q_proj", "v_proj"]}, _q_tensors())
    with pytest.raises(AdapterValidationError, match=r"'ad'.*targets 4 modules but .* lacks weights for 2 .*v_proj"):
        _load(path)


def test_non_finite_after_cast(tmp_path: Path) -> None:
    tensors = _q_tensors()
    tensors[_key(0, "q_proj", "B")] = torch.full((HIDDEN, 4), 60000.0)  # x scale 2 overflows fp16
    path = _write(tmp_path / "inf", Q_CONFIG, tensors)
    with pytest.raises(AdapterValidationError, match=r"'ad'.*magnitude 120000 .*above the limit 10000"):
        _load(path)  # finite in fp32, but far beyond any trained LoRA (peft_adapter.MAX_ABS_WEIGHT)
    with pytest.raises(AdapterValidationError, match=r"'ad'.*non-finite values in torch.float16"):
        _load(path, dtype=torch.float16)


def test_bad_arguments(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok", Q_CONFIG, _q_tensors())
    with pytest.raises(ValueError, match="max_lora_rank"):
        _load(path, max_lora_rank=0)
    with pytest.raises(ValueError, match="dtype"):
        _load(path, dtype=torch.float64)
    with pytest.raises(ValueError, match="module_shapes"):
        BaseModelSpec(num_layers=2, module_shapes={"q_proj": (1, 1)}, dtype=torch.float32)

