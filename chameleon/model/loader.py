"""Read a Hugging Face model directory (config + safetensors, sharded or not) into `LlamaModel`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from chameleon.errors import ModelLoadError, UnsupportedModelError
from chameleon.model.llama import LlamaModel
from chameleon.model.spec import ModelSpec

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def load_hf_config(path: str | os.PathLike[str]) -> Any:
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        # Local files only and no remote code: a model directory never runs code of its own.
        return AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except ValueError as exc:  # transformers' word for "unknown model_type"
        raise UnsupportedModelError(f"{path}: {exc}") from exc
    except (KeyError, TypeError, OSError) as exc:  # malformed config.json
        raise ModelLoadError(f"{path}: invalid config.json ({exc})") from exc


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: pickle formats are never loaded)" if pickled else ""
        raise ModelLoadError(f"{path}: no *.safetensors weights{hint}")
    return files


class _Filler:
    """Copies checkpoint tensors into the fused parameters and remembers what was filled."""

    def __init__(self, model: LlamaModel, spec: ModelSpec) -> None:
        self.model, self.spec = model, spec
        self.filled: set[str] = set()
        q, kv, inter = spec.q_size, spec.kv_size, spec.intermediate_size
        h = spec.hidden_size
        # checkpoint module -> (our weight attribute, our bias attribute, row offset, rows) in the fused tensor
        self.layer_slots: dict[str, tuple[str, str | None, int, int]] = {
            "self_attn.q_proj": ("qkv_proj", "qkv_bias", 0, q),
            "self_attn.k_proj": ("qkv_proj", "qkv_bias", q, kv),
            "self_attn.v_proj": ("qkv_proj", "qkv_bias", q + kv, kv),
            "self_attn.o_proj": ("o_proj", "o_bias", 0, h),
            "mlp.gate_proj": ("gate_up_proj", None, 0, inter),
            "mlp.up_proj": ("gate_up_proj", None, inter, inter),
            "mlp.down_proj": ("down_proj", None, 0, h),
        }

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if _IGNORED.match(name) or (name == "lm_head.weight" and self.spec.tie_word_embeddings):
            return  # tied checkpoints sometimes save the head anyway; we use the embedding
        target = self._target(name)
        if target is None:
            raise ModelLoadError(f"unexpected weight {name!r} for {self.spec.architecture}")
        param, offset, rows = target
        dest = param[offset : offset + rows]
        if dest.shape != tensor.shape:
            raise ModelLoadError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
        with torch.no_grad():
            dest.copy_(tensor)
        self.filled.add(name)

    def _target(self, name: str) -> tuple[torch.Tensor, int, int] | None:
        m = self.model
        whole: dict[str, torch.Tensor | None] = {
            "model.embed_tokens.weight": m.embed_tokens,
            "model.norm.weight": m.norm,
            "lm_head.weight": m.lm_head,
        }
        if name in whole:
            param = whole[name]
            return (param, 0, param.shape[0]) if param is not None else None
        match = _LAYER_KEY.fullmatch(name)
        if match is None or int(match.group(1)) >= len(m.layers):
            return None
        layer: Any = m.layers[int(match.group(1))]
        rest = match.group(2)
        if rest == "input_layernorm.weight":
            return layer.input_norm, 0, layer.input_norm.shape[0]
        if rest == "post_attention_layernorm.weight":
            return layer.post_attn_norm, 0, layer.post_attn_norm.shape[0]
        module, _, kind = rest.rpartition(".")
        if module not in self.layer_slots or kind not in ("weight", "bias"):
            return None
        weight_attr, bias_attr, offset, rows = self.layer_slots[module]
        attr = weight_attr if kind == "weight" else bias_attr
        param = getattr(layer, attr) if attr is not None else None
        return (param, offset, rows) if param is not None else None

    def expected(self) -> set[str]:
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if self.model.lm_head is not None:
            names.add("lm_head.weight")
        for i in range(self.spec.num_layers):
            names |= {f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"}
            names |= {f"model.layers.{i}.{mod}.weight" for mod in self.layer_slots}
            if self.spec.qkv_bias:
                names |= {f"model.layers.{i}.self_attn.{p}_proj.bias" for p in "qkv"}
            if self.spec.o_bias:
                names.add(f"model.layers.{i}.self_attn.o_proj.bias")
        return names


def load_model(
    path: str | os.PathLike[str], spec: ModelSpec, dtype: torch.dtype, device: torch.device, max_positions: int
) -> LlamaModel:
    """`spec` comes from `model_spec_from_config(load_hf_config(path))`."""
    path = Path(path)
    files = safetensors_files(path)
    with torch.device(device):
        model = LlamaModel(spec, dtype, max_positions)
    filler = _Filler(model, spec)
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    filler.put(name, f.get_tensor(name))
        except (OSError, SafetensorError) as exc:
            raise ModelLoadError(f"{file}: cannot read safetensors ({exc})") from exc
    missing = filler.expected() - filler.filled
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise ModelLoadError(f"{path}: {len(missing)} weights missing from the checkpoint, e.g. {shown}")
    return model.eval()
