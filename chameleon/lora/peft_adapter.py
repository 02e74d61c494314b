"""Load PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) for Llama-family bases.

Everything that can be checked without reading tensor data is checked first: the JSON config and the
safetensors *header* (key names, shapes, dtypes). Only an adapter that fits the base model gets its
tensors read. Pickle formats (`.bin`, `.pt`, ...) are refused, never unpickled.

Target-module matching, `rank_pattern`/`alpha_pattern` lookup and `layers_to_transform` mirror PEFT
0.21 (`peft.tuners.tuners_utils.check_target_module_exists`, `peft.utils.other.get_pattern_key`), so
an adapter gets exactly the ranks and scales PEFT would give it. Scales are folded into `b_t`.
Every regex from the config is matched in bounded time (`chameleon.lora.safe_regex`).

Tensor data is read once, as bytes, into memory the engine owns (never a view of a file mapping), and
the content hash is taken from those same bytes: rewriting or truncating the file after loading can
neither change the adapter nor crash the process, and a reload that sees other bytes gets another
hash (the executor then raises `AdapterLoadError`). Peak memory while loading is about twice the file.
Weights must be F16/BF16/F32, finite in the serving dtype and at most `MAX_ABS_WEIGHT` in magnitude
(lora_A, and lora_B with its scale folded in): no trained LoRA comes near that, and larger values
could only overflow activations and poison the sampler.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import types
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import attrs
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from chameleon.errors import (
    AdapterLoadError,
    AdapterValidationError,
    ModelLoadError,
    UnsafeAdapterFormatError,
    UnsafeAdapterPatternError,
    UnsupportedAdapterError,
)
from chameleon.lora import safe_regex
from chameleon.lora.peft_config import (
    _EMBEDDING_NAMES,
    _GLOBAL_AUX,
    _LAYER_AUX,
    CONFIG_FILE,
    EMBEDDING_MODULES,
    PeftLoraConfig,
    _load_json,
    _parse_config,
    _who,
    with_who,
)
from chameleon.model.geometry import PARENT as _PARENT
from chameleon.model.geometry import TARGET_MODULES

WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_SAFETENSORS_DTYPES: Mapping[str, torch.dtype] = types.MappingProxyType(
    {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
)
MAX_ABS_WEIGHT = 1e4  # |lora_A| and |lora_B x scale| above this are refused (module docstring)
MATCH_BUDGET_S = 2.0  # all config-regex matching of one adapter load together (lora/safe_regex.py)
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
_SERVING_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
# What PEFT's save_pretrained writes: "base_model.model." + module name + ".lora_A.weight" (adapter name stripped).
_KEY_RE = re.compile(
    r"base_model\.model\.(?P<name>model\.layers\.(?P<layer>0|[1-9][0-9]*)\.(?P<parent>[A-Za-z0-9_]+)"
    r"\.(?P<module>[A-Za-z0-9_]+))\.lora_(?P<ab>[AB])\.weight"
)
_KEY_FORMAT = "base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight"




# --- base model -------------------------------------------------------------------------------


def _freeze_shapes(shapes: Mapping[str, Sequence[int]]) -> Mapping[str, tuple[int, int]]:
    return types.MappingProxyType({str(k): (int(v[0]), int(v[1])) for k, v in shapes.items()})


@attrs.frozen
class BaseModelSpec:
    """The parts of the base model an adapter must fit."""

    num_layers: int
    module_shapes: Mapping[str, tuple[int, int]] = attrs.field(converter=_freeze_shapes)  # (in, out)
    dtype: torch.dtype

    def __attrs_post_init__(self) -> None:
        if self.num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {self.num_layers}")
        if set(self.module_shapes) != set(TARGET_MODULES):
            raise ValueError(f"module_shapes must have exactly {TARGET_MODULES}, got {tuple(self.module_shapes)}")
        bad = {m: s for m, s in self.module_shapes.items() if min(s) <= 0}
        if bad:
            raise ValueError(f"module shapes must be positive, got {bad}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"base dtype must be floating point, got {self.dtype}")

    @classmethod
    def from_hf_config(cls, config: Any, dtype: torch.dtype) -> BaseModelSpec:
        """Shapes of a Llama / Mistral / Qwen2 transformers config (GQA; head_dim may be absent)."""
        hidden = _config_int(config, "hidden_size")
        inter = _config_int(config, "intermediate_size")
        heads = _config_int(config, "num_attention_heads")
        kv_heads = getattr(config, "num_key_value_heads", None) or heads  # absent means MHA
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        q_out, kv_out = heads * head_dim, int(kv_heads) * head_dim
        shapes = {
            "q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
            "o_proj": (q_out, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        return cls(num_layers=_config_int(config, "num_hidden_layers"), module_shapes=shapes, dtype=dtype)


def _config_int(config: Any, field: str) -> int:
    value = getattr(config, field, None)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelLoadError(f"model config field {field!r} must be a positive int, got {value!r}")
    return value


def _module_name(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{_PARENT[module]}.{module}"


# --- adapter weights -----------------------------------------------------------------------------


@attrs.frozen(eq=False)
class LoRAModuleWeights:
    """One target module of one layer: `delta(x) = (x @ a.T) @ b_t`."""

    layer: int
    module: str
    rank: int
    a: torch.Tensor  # [rank, in_features]
    b_t: torch.Tensor  # [rank, out_features] = lora_B.T * scale
    scale: float  # already folded into b_t; kept for reporting


@attrs.frozen(eq=False)
class LoRAAdapter:
    name: str
    path: str
    rank: int  # the config's r
    max_rank: int  # largest rank over modules (rank_pattern may differ per module)
    target_modules: tuple[str, ...]
    weights: Mapping[tuple[int, str], LoRAModuleWeights]
    nbytes: int
    content_hash: str  # sha256 of the safetensors bytes + normalized config; dtype not included
    dtype: torch.dtype


@attrs.frozen
class _ModulePlan:
    """A validated (layer, module) entry from the header: what to read and how to fold it."""

    layer: int
    module: str
    rank: int
    scale: float
    a_key: str
    b_key: str
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]


_Header = Mapping[str, tuple[tuple[int, ...], str]]  # key -> (shape, safetensors dtype name)


def load_peft_adapter(
    name: str,
    path: str | os.PathLike[str],
    base: BaseModelSpec,
    *,
    max_lora_rank: int,
    dtype: torch.dtype | None = None,
) -> LoRAAdapter:
    """Validate a PEFT LoRA adapter against `base` from its config and header, then read and fold it."""
    dtype = base.dtype if dtype is None else dtype
    if dtype not in _SERVING_DTYPES:
        raise ValueError(f"dtype must be one of {_SERVING_DTYPES}, got {dtype}")
    if not isinstance(max_lora_rank, int) or max_lora_rank <= 0:
        raise ValueError(f"max_lora_rank must be a positive int, got {max_lora_rank!r}")
    root = Path(path)
    who = _who(name, root)
    cfg_file, st_file = _locate_files(root, who)
    config = _parse_config(_load_json(cfg_file, who), who)
    try:
        with safe_regex.deadline(MATCH_BUDGET_S):
            expected = _expected_modules(config, base, who)
            plans = _plan_modules(_read_header(st_file, who), config, base, expected, max_lora_rank, who)
    except UnsafeAdapterPatternError as e:
        raise with_who(e, who) from e
    tensors, digest = _read_module_tensors(st_file, plans, who)
    weights = {(p.layer, p.module): _fold(p, tensors.pop(p.a_key), tensors.pop(p.b_key), dtype, who) for p in plans}
    return LoRAAdapter(
        name=name,
        path=str(root),
        rank=config.r,
        max_rank=max(p.rank for p in plans),
        target_modules=tuple(sorted({p.module for p in plans})),
        weights=types.MappingProxyType(weights),
        nbytes=sum(w.a.nbytes + w.b_t.nbytes for w in weights.values()),
        content_hash=_content_hash(digest, config),
        dtype=dtype,
    )


def _locate_files(root: Path, who: str) -> tuple[Path, Path]:
    if not root.is_dir():
        raise AdapterLoadError(f"{who}: adapter directory does not exist")
    st_file = root / WEIGHTS_FILE
    if not st_file.is_file():
        pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeAdapterFormatError(
                f"{who}: found {pickles} but no {WEIGHTS_FILE}; pickle formats are refused (we never unpickle); "
                "convert the adapter to safetensors"
            )
        raise AdapterLoadError(f"{who}: missing {WEIGHTS_FILE}")
    cfg_file = root / CONFIG_FILE
    if not cfg_file.is_file():
        raise AdapterLoadError(f"{who}: missing {CONFIG_FILE}")
    return cfg_file, st_file


def _expected_modules(config: PeftLoraConfig, base: BaseModelSpec, who: str) -> frozenset[tuple[int, str]]:
    """The (layer, module) pairs PEFT would wrap on this base, from the config alone."""
    # A regex/list that also hits a norm, an MLP block, ... could never have been built by PEFT on this base.
    aux = list(_GLOBAL_AUX) + [f"model.layers.{i}{s}" for i in range(base.num_layers) for s in _LAYER_AUX]
    embeds = [n for n in _EMBEDDING_NAMES if config.targets(n)]
    if embeds:
        raise UnsupportedAdapterError(f"{who}: embedding LoRA is not supported, target_modules matches {embeds}")
    hit = [n for n in aux if config.targets(n)]
    if hit:
        raise AdapterValidationError(
            f"{who}: target_modules {config.target_modules!r} matches non-linear modules {hit[:4]}; "
            f"only {list(TARGET_MODULES)} can carry LoRA"
        )
    expected = frozenset(
        (i, m) for i in range(base.num_layers) for m in TARGET_MODULES if config.targets(_module_name(i, m))
    )
    if not expected:
        raise AdapterValidationError(
            f"{who}: target_modules {config.target_modules!r} matches no module of the base model"
        )
    return expected


def _read_header(st_file: Path, who: str) -> _Header:
    """Key -> (shape, dtype) from the safetensors header; get_slice does not materialize data."""
    try:
        with safe_open(str(st_file), framework="pt") as f:
            header = {}
            for key in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                sl = f.get_slice(key)
                header[key] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
            return header
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterLoadError(f"{who}: cannot read {WEIGHTS_FILE}: {e}") from e


def _plan_modules(
    header: _Header, config: PeftLoraConfig, base: BaseModelSpec, expected: frozenset[tuple[int, str]],
    max_lora_rank: int, who: str,
) -> list[_ModulePlan]:
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in header:
        layer, module, ab = _parse_key(key, config, base, expected, who)
        pairs.setdefault((layer, module), {})[ab] = key
    plans = [_plan_one(layer, module, keys, header, config, base, max_lora_rank, who)
             for (layer, module), keys in sorted(pairs.items())]
    _check_missing(set(pairs), expected, who)
    return plans


def _parse_key(
    key: str, config: PeftLoraConfig, base: BaseModelSpec, expected: frozenset[tuple[int, str]], who: str
) -> tuple[int, str, str]:
    m = _KEY_RE.fullmatch(key)
    if m is None:
        _refuse_unparseable(key, who)
    layer, parent, module = int(m["layer"]), m["parent"], m["module"]
    if module not in TARGET_MODULES or _PARENT[module] != parent:
        raise AdapterValidationError(
            f"{who}: key {key!r} is for unknown module {parent}.{module}; supported modules are "
            + ", ".join(f"{_PARENT[t]}.{t}" for t in TARGET_MODULES)
        )
    if layer >= base.num_layers:
        raise AdapterValidationError(
            f"{who}: key {key!r} is for layer {layer}, but the base model has {base.num_layers} layers "
            f"(expected 0..{base.num_layers - 1})"
        )
    if (layer, module) not in expected:
        raise AdapterValidationError(
            f"{who}: key {key!r} is for {m['name']}, which the adapter config does not target "
            f"(target_modules={config.target_modules!r}, layers_to_transform={config.layers_to_transform!r})"
        )
    return layer, module, m["ab"]


def _refuse_unparseable(key: str, who: str) -> NoReturn:
    if "lora_embedding_" in key or any(f".{e}." in key for e in EMBEDDING_MODULES):
        raise UnsupportedAdapterError(f"{who}: key {key!r}: embedding / lm_head weights are not supported")
    if "lora_magnitude_vector" in key:
        raise UnsupportedAdapterError(f"{who}: key {key!r}: DoRA magnitude vectors are not supported")
    if "modules_to_save" in key or key.endswith(".bias"):
        raise UnsupportedAdapterError(f"{who}: key {key!r}: trained extra modules / biases are not supported")
    raise AdapterValidationError(f"{who}: unexpected key {key!r}; expected keys like {_KEY_FORMAT}")


def _plan_one(
    layer: int, module: str, keys: Mapping[str, str], header: _Header,
    config: PeftLoraConfig, base: BaseModelSpec, max_lora_rank: int, who: str,
) -> _ModulePlan:
    name = _module_name(layer, module)
    for ab in ("A", "B"):
        if ab not in keys:
            present = next(iter(keys.values()))
            raise AdapterValidationError(
                f"{who}: {name} has {present!r} but no matching lora_{ab}.weight; A and B must come in pairs"
            )
    for key in keys.values():
        dt = header[key][1]
        if dt not in _SAFETENSORS_DTYPES:
            raise AdapterValidationError(
                f"{who}: key {key!r} has dtype {dt}, expected one of {sorted(_SAFETENSORS_DTYPES)}"
            )
    rank = config.rank_for(name)
    in_f, out_f = base.module_shapes[module]
    a_shape, b_shape = header[keys["A"]][0], header[keys["B"]][0]
    _check_shape(keys["A"], a_shape, (rank, in_f), "(rank, in_features)", who)
    _check_shape(keys["B"], b_shape, (out_f, rank), "(out_features, rank)", who)
    if rank > max_lora_rank:
        raise AdapterValidationError(
            f"{who}: {name} has rank {rank}, above the engine's max_lora_rank {max_lora_rank}"
        )
    return _ModulePlan(layer, module, rank, config.scale_for(name), keys["A"], keys["B"], (rank, in_f), (out_f, rank))


def _check_shape(key: str, actual: tuple[int, ...], expected: tuple[int, int], what: str, who: str) -> None:
    if actual == expected:
        return
    # Say whether the rank or the base dimension disagrees: they have different fixes.
    rank_axis = 0 if what.startswith("(rank") else 1
    if len(actual) == 2 and actual[1 - rank_axis] == expected[1 - rank_axis]:
        raise AdapterValidationError(
            f"{who}: key {key!r} has rank {actual[rank_axis]} (shape {actual}), but the adapter config gives rank "
            f"{expected[rank_axis]} for this module (r / rank_pattern); expected shape {expected} = {what}"
        )
    raise AdapterValidationError(
        f"{who}: key {key!r} has shape {actual}, expected {expected} = {what} of the base model; "
        "was the adapter trained for a different base model?"
    )


def _check_missing(present: set[tuple[int, str]], expected: frozenset[tuple[int, str]], who: str) -> None:
    # PEFT would only warn and leave these modules at their init; a config/weights mismatch is a broken adapter.
    missing = sorted(expected - present)
    if missing:
        names = [_module_name(i, m) for i, m in missing[:4]]
        raise AdapterValidationError(
            f"{who}: the config targets {len(expected)} modules but {WEIGHTS_FILE} lacks weights for "
            f"{len(missing)} of them, e.g. {names}"
        )


def _read_module_tensors(
    st_file: Path, plans: Sequence[_ModulePlan], who: str
) -> tuple[dict[str, torch.Tensor], Any]:
    """The only place tensor data is read: the whole file, as bytes, into memory we own, at most the size
    the validated header allows. Returns the tensors by key and the sha256 of exactly those bytes."""
    try:
        with st_file.open("rb") as f:
            limit = _size_limit(f.read(8), plans)
            f.seek(0)
            blob = f.read(limit + 1)
    except OSError as e:
        raise AdapterLoadError(f"{who}: cannot read {WEIGHTS_FILE}: {e}") from e
    if len(blob) > limit:
        raise AdapterLoadError(f"{who}: {WEIGHTS_FILE} holds more data than its header describes")
    digest = hashlib.sha256(blob)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # frombuffer over read-only bytes; _fold copies
            tensors = safetensors.torch.load(blob)
    except (SafetensorError, ValueError, OSError) as e:
        raise AdapterLoadError(f"{who}: {WEIGHTS_FILE} changed while loading: {e}") from e
    wanted = {k for p in plans for k in (p.a_key, p.b_key)}
    if set(tensors) != wanted:
        raise AdapterLoadError(f"{who}: {WEIGHTS_FILE} changed while loading (its keys differ from its header)")
    return tensors, digest


def _size_limit(prefix: bytes, plans: Sequence[_ModulePlan]) -> int:
    """8 + header + data bytes, data counted at 4 bytes an element (the widest dtype accepted)."""
    header = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
    data = sum(4 * (p.a_shape[0] * p.a_shape[1] + p.b_shape[0] * p.b_shape[1]) for p in plans)
    return 8 + min(header, _MAX_HEADER_BYTES) + data


def _fold(
    plan: _ModulePlan, a_raw: torch.Tensor, b_raw: torch.Tensor, dtype: torch.dtype, who: str
) -> LoRAModuleWeights:
    name = _module_name(plan.layer, plan.module)
    if tuple(a_raw.shape) != plan.a_shape or tuple(b_raw.shape) != plan.b_shape:  # file changed since the header
        raise AdapterLoadError(f"{who}: {name} tensors changed while loading")
    bad = [str(t.dtype) for t in (a_raw, b_raw) if t.dtype not in _SAFETENSORS_DTYPES.values()]
    if bad:  # never cast an int / bool tensor into weights
        raise AdapterValidationError(f"{who}: {name} has dtype {bad[0]}, expected one of {sorted(_SAFETENSORS_DTYPES)}")
    a = a_raw.to(dtype=dtype, copy=True).contiguous()  # copy: storage owned here, not the read buffer
    b_t = (b_raw.to(torch.float32).T * plan.scale).to(dtype).contiguous()  # fold in fp32, round once
    if not (torch.isfinite(a).all() and torch.isfinite(b_t).all()):
        raise AdapterValidationError(
            f"{who}: {name} has non-finite values in {dtype} (lora_A, or lora_B x scale {plan.scale:g})"
        )
    biggest = max(float(a.abs().max()), float(b_t.abs().max()))
    if biggest > MAX_ABS_WEIGHT:
        raise AdapterValidationError(
            f"{who}: {name} has a weight of magnitude {biggest:g} (lora_A, or lora_B x scale {plan.scale:g}), "
            f"above the limit {MAX_ABS_WEIGHT:g}"
        )
    return LoRAModuleWeights(layer=plan.layer, module=plan.module, rank=plan.rank, a=a, b_t=b_t, scale=plan.scale)


def _content_hash(digest: Any, config: PeftLoraConfig) -> str:
    h = digest.copy()  # sha256 of the safetensors bytes that were loaded
    h.update(b"\0adapter_config\0")
    h.update(json.dumps(attrs.asdict(config), sort_keys=True).encode())
    return h.hexdigest()
