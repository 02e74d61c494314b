"""PEFT LoRA adapter configs (`adapter_config.json`): parsed, validated, matched to modules (no torch).

Target-module matching, `rank_pattern`/`alpha_pattern` lookup and `layers_to_transform` mirror PEFT
0.21 (`peft.tuners.tuners_utils.check_target_module_exists`, `peft.utils.other.get_pattern_key`), so
an adapter gets exactly the ranks and scales PEFT would give it. Every regex from the config is checked
and matched through `chameleon.lora.safe_regex` (complexity guard + match timeout), so a hostile
pattern gets `UnsafeAdapterPatternError` instead of freezing the process.
"""

from __future__ import annotations

import json
import math
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from chameleon.errors import (
    AdapterLoadError,
    AdapterValidationError,
    UnsafeAdapterPatternError,
    UnsupportedAdapterError,
)
from chameleon.lora import safe_regex
from chameleon.model.geometry import TARGET_MODULES

EMBEDDING_MODULES: tuple[str, ...] = ("embed_tokens", "lm_head")
CONFIG_FILE = "adapter_config.json"
# PEFT's default target_modules for llama / mistral / qwen2 when the config leaves them unset.
_DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")
# Non-projection modules of a Llama-family model (per layer / global), to catch configs targeting them.
_LAYER_AUX = ("", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm", ".post_attention_layernorm")
_GLOBAL_AUX = ("model", "model.layers", "model.norm", "model.rotary_emb")
_EMBEDDING_NAMES = ("model.embed_tokens", "lm_head")
_T = TypeVar("_T")


@attrs.frozen
class PeftLoraConfig:
    """The serving-relevant fields of a PEFT `LoraConfig`, validated. Matching mirrors PEFT 0.21."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: str | tuple[str, ...]  # regex (re.fullmatch on the full module name) or names
    exclude_modules: str | tuple[str, ...] | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    # Ordered: PEFT takes the first matching key, in the JSON file's order (save_pretrained sorts keys).
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    base_model_name_or_path: str | None = None

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scale_for(self, module_name: str) -> float:
        r = self.rank_for(module_name)
        denom = math.sqrt(r) if self.use_rslora else r
        return self.alpha_for(module_name) / denom

    def targets(self, module_name: str) -> bool:
        """PEFT's `check_target_module_exists` for this config (modules_to_save is refused earlier)."""
        if self._excluded(module_name):
            return False
        tm = self.target_modules
        if isinstance(tm, str):
            if tm.lower() == "all-linear":  # every nn.Linear except the output embedding
                return module_name.rsplit(".", 1)[-1] in TARGET_MODULES and module_name not in _EMBEDDING_NAMES
            return safe_regex.fullmatch(tm, module_name)
        if module_name in tm:  # an exact full name skips the layer filter, as in PEFT
            return True
        if not any(module_name.endswith(f".{t}") for t in tm):
            return False
        return self._layer_selected(module_name)

    def _excluded(self, module_name: str) -> bool:
        ex = self.exclude_modules
        if not ex:
            return False
        if isinstance(ex, str):
            return safe_regex.fullmatch(ex, module_name)
        return module_name in ex or any(module_name.endswith(f".{e}") for e in ex)

    def _layer_selected(self, module_name: str) -> bool:
        idx = self.layers_to_transform
        if idx is None or (isinstance(idx, tuple) and not idx):
            return True
        layer = _peft_layer_index(module_name, self.layers_pattern)
        if layer is None:
            return False
        return layer == idx if isinstance(idx, int) else layer in idx


def _layers_regex(layers_pattern: str) -> str:
    return rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\."


def _pattern_value(pattern: tuple[tuple[str, _T], ...], module_name: str, default: _T) -> _T:
    # peft.utils.other.get_pattern_key: the first key with re.match(rf"(.*\.)?({key})$", name) wins.
    for key, value in pattern:
        if safe_regex.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _peft_layer_index(module_name: str, layers_pattern: str | tuple[str, ...] | None) -> int | None:
    # Lazy `.*?` picks the first numbered segment, exactly like PEFT.
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
    else:
        patterns = (layers_pattern,) if isinstance(layers_pattern, str) else layers_pattern
        m = None
        for p in patterns:
            m = safe_regex.match(_layers_regex(p), module_name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


# Fields that change numerics or structure: refused when set to anything but their default.
_UNSUPPORTED_IF_SET: Mapping[str, str] = types.MappingProxyType({
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable embedding tokens (trainable_token_indices)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "megatron_config": "Megatron-parallel LoRA layers (megatron_config)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
})
# Fields that are metadata or training-time only; ignored.
_IGNORED_FIELDS: frozenset[str] = frozenset({
    "task_type", "auto_mapping", "peft_version", "revision", "inference_mode", "lora_dropout",
    "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core",
    "qalora_group_size", "runtime_config", "ensure_weight_tying",
})
_PARSED_FIELDS: frozenset[str] = frozenset({
    "peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "bias", "fan_in_fan_out",
    "base_model_name_or_path",
})
_KNOWN_FIELDS: frozenset[str] = _PARSED_FIELDS | _IGNORED_FIELDS | frozenset(_UNSUPPORTED_IF_SET)
# Inits that rewrite the base weights (W -= scale·B·A); unless converted at save time the adapter only
# works on that residual base, which we cannot verify.
_BASE_MUTATING_INITS: tuple[str, ...] = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _is_set(value: Any) -> bool:
    return value not in (None, False, "", 0) and not (isinstance(value, (list, dict, tuple)) and not value)


def read_adapter_config(path: str | os.PathLike[str], *, name: str | None = None) -> PeftLoraConfig:
    """Parse and validate `adapter_config.json` (a directory or the file itself); reads no tensors."""
    p = Path(path)
    cfg_file = p if p.is_file() else p / CONFIG_FILE
    who = _who(name if name is not None else (p.parent.name if p.is_file() else p.name), p)
    if not cfg_file.is_file():
        raise AdapterLoadError(f"{who}: missing {CONFIG_FILE}")
    return _parse_config(_load_json(cfg_file, who), who)


def _who(name: str, path: Path) -> str:
    return f"adapter {name!r} ({path})"


def _load_json(cfg_file: Path, who: str) -> dict[str, Any]:
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterLoadError(f"{who}: cannot parse {cfg_file.name}: {e}") from e
    if not isinstance(raw, dict):
        raise AdapterLoadError(f"{who}: {cfg_file.name} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _parse_config(raw: Mapping[str, Any], who: str) -> PeftLoraConfig:
    try:
        return _parse_config_fields(raw, who)
    except UnsafeAdapterPatternError as e:
        raise with_who(e, who) from e


def with_who(error: UnsafeAdapterPatternError, who: str) -> UnsafeAdapterPatternError:
    """The error with the adapter named in front (match-time errors do not know the adapter)."""
    text = str(error)
    return error if text.startswith(who) else UnsafeAdapterPatternError(f"{who}: {text}")


def _parse_config_fields(raw: Mapping[str, Any], who: str) -> PeftLoraConfig:
    if raw.get("peft_type") != "LORA":
        raise UnsupportedAdapterError(f"{who}: peft_type is {raw.get('peft_type')!r}, expected 'LORA'")
    _refuse_unsupported(raw, who)
    target_modules = _parse_targets(raw.get("target_modules"), who)
    config = PeftLoraConfig(
        r=_positive_int(raw.get("r", 8), "r", who),
        lora_alpha=_number(raw.get("lora_alpha", 8), "lora_alpha", who),
        use_rslora=_bool(raw.get("use_rslora", False), "use_rslora", who),
        target_modules=target_modules,
        exclude_modules=_str_or_strs(raw.get("exclude_modules"), "exclude_modules", who),
        layers_to_transform=_layer_indices(raw.get("layers_to_transform"), who),
        layers_pattern=_str_or_strs(raw.get("layers_pattern"), "layers_pattern", who),
        rank_pattern=_pattern(raw.get("rank_pattern"), "rank_pattern", who, _positive_int),
        alpha_pattern=_pattern(raw.get("alpha_pattern"), "alpha_pattern", who, _number),
        base_model_name_or_path=_optional_str(raw.get("base_model_name_or_path")),
    )
    _check_peft_invariants(config, who)
    return config


def _refuse_unsupported(raw: Mapping[str, Any], who: str) -> None:
    for field, what in _UNSUPPORTED_IF_SET.items():
        if _is_set(raw.get(field)):
            raise UnsupportedAdapterError(f"{who}: {what} is not supported, got {field}={raw[field]!r}")
    if raw.get("bias", "none") != "none":
        raise UnsupportedAdapterError(f"{who}: bias={raw['bias']!r} is not supported, expected 'none'")
    if raw.get("fan_in_fan_out") not in (False, None):
        raise UnsupportedAdapterError(
            f"{who}: fan_in_fan_out={raw['fan_in_fan_out']!r} (Conv1D layout) is not supported, expected false"
        )
    init = str(raw.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_MUTATING_INITS):
        raise UnsupportedAdapterError(
            f"{who}: init_lora_weights={raw['init_lora_weights']!r} rewrites the base weights, so the adapter only "
            "fits that residual base; convert it with save_pretrained(path_initial_model_for_weight_conversion=...)"
        )
    unknown = sorted(k for k in raw if k not in _KNOWN_FIELDS and _is_set(raw[k]))
    if unknown:  # fail closed: a field we do not know may change numerics
        raise UnsupportedAdapterError(
            f"{who}: unknown adapter_config fields set to non-default values: "
            + ", ".join(f"{k}={raw[k]!r}" for k in unknown)
        )


def _parse_targets(value: Any, who: str) -> str | tuple[str, ...]:
    if value is None:
        return _DEFAULT_TARGETS  # PEFT's default for llama/mistral/qwen2
    if isinstance(value, str):
        if value.lower() != "all-linear":
            _compile(value, "target_modules", who)
            embeds = [n for n in _EMBEDDING_NAMES if safe_regex.fullmatch(value, n)]
            if embeds:
                raise UnsupportedAdapterError(f"{who}: embedding LoRA is not supported, target_modules "
                                              f"{value!r} matches {embeds}")
        return value
    targets = _str_or_strs(value, "target_modules", who) or ()
    leaves = {t: t.rsplit(".", 1)[-1] for t in targets}
    embeds = sorted(t for t, leaf in leaves.items() if leaf in EMBEDDING_MODULES)
    if embeds:
        raise UnsupportedAdapterError(f"{who}: embedding LoRA is not supported, target_modules has {embeds}")
    unknown = sorted(t for t, leaf in leaves.items() if leaf not in TARGET_MODULES)
    if unknown:
        raise AdapterValidationError(
            f"{who}: unknown target modules {unknown}; supported modules are {list(TARGET_MODULES)}"
        )
    return tuple(sorted(targets))


def _check_peft_invariants(config: PeftLoraConfig, who: str) -> None:
    # LoraConfig.__post_init__ rejects these combinations; PEFT itself could not load such a config.
    if isinstance(config.target_modules, str) and (config.layers_to_transform is not None or config.layers_pattern):
        raise AdapterLoadError(f"{who}: layers_to_transform/layers_pattern cannot be used with a regex "
                               f"target_modules {config.target_modules!r}")
    if config.layers_pattern and config.layers_to_transform is None:
        raise AdapterLoadError(f"{who}: layers_pattern={config.layers_pattern!r} requires layers_to_transform")
    if isinstance(config.exclude_modules, str):
        _compile(config.exclude_modules, "exclude_modules", who)
    patterns = (config.layers_pattern,) if isinstance(config.layers_pattern, str) else config.layers_pattern or ()
    for p in patterns:
        _compile(_layers_regex(p), f"layers_pattern {p!r}", who)


def _positive_int(value: Any, field: str, who: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise AdapterLoadError(f"{who}: {field} must be a positive int, got {value!r}")
    return value


def _number(value: Any, field: str, who: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise AdapterLoadError(f"{who}: {field} must be a finite number, got {value!r}")
    return float(value)


def _bool(value: Any, field: str, who: str) -> bool:
    if not isinstance(value, bool):
        raise AdapterLoadError(f"{who}: {field} must be true or false, got {value!r}")
    return value


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _str_or_strs(value: Any, field: str, who: str) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AdapterLoadError(f"{who}: {field} must be a string or a list of strings, got {value!r}")


def _layer_indices(value: Any, who: str) -> int | tuple[int, ...] | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return tuple(value)
    raise AdapterLoadError(f"{who}: layers_to_transform must be an int or a list of ints, got {value!r}")


def _pattern(value: Any, field: str, who: str, parse: Any) -> tuple[tuple[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise AdapterLoadError(f"{who}: {field} must be a JSON object, got {value!r}")
    out = []
    for key, v in value.items():
        _compile(rf"(.*\.)?({key})$", f"{field} key {key!r}", who)
        out.append((key, parse(v, f"{field}[{key!r}]", who)))
    return tuple(out)


def _compile(pattern: str, what: str, who: str) -> None:
    # Invalid -> AdapterLoadError; too complex to match in bounded time -> UnsafeAdapterPatternError.
    safe_regex.check_pattern(pattern, what, who)
