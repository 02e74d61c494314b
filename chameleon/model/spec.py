"""What we need from a Hugging Face config, checked up front so unsupported models fail clearly."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from chameleon.errors import UnsupportedModelError
from chameleon.model.geometry import Geometry

# Architectures whose HF checkpoints share the Llama layout (names of weights and blocks).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_SUPPORTED_ROPE = {"default", "linear", "llama3", "yarn"}


@attrs.frozen
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    max_position_embeddings: int
    sliding_window: int | None
    inv_freq: torch.Tensor = attrs.field(eq=False)  # RoPE inverse frequencies (float32)
    rope_attention_scaling: float = 1.0
    eos_token_ids: tuple[int, ...] = ()

    @property
    def geometry(self) -> Geometry:
        return Geometry(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
        )

    @property
    def q_size(self) -> int:
        return self.geometry.q_size

    @property
    def kv_size(self) -> int:
        return self.geometry.kv_size


def _architecture(config: Any) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
    if not archs and model_type in by_type:
        return by_type[model_type]
    named = ", ".join(archs) or f"model_type={model_type!r}"
    raise UnsupportedModelError(
        f"unsupported architecture {named}; Chameleon serves {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
    )


def _rope(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type not in _SUPPORTED_ROPE:
        raise UnsupportedModelError(f"unsupported RoPE type {rope_type!r}; supported: {sorted(_SUPPORTED_ROPE)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings are not supported")
    if rope_type == "default":
        # Same arithmetic as transformers' default so greedy outputs match bit for bit.
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def _eos_ids(config: Any) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def model_spec_from_config(config: Any) -> ModelSpec:
    arch = _architecture(config)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{arch}: hidden_act {config.hidden_act!r} is not supported (only silu)")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModelError(f"{arch}: mlp_bias=True is not supported")
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    inv_freq, scaling = _rope(config, head_dim)
    sliding = getattr(config, "sliding_window", None)
    if arch == "Qwen2ForCausalLM" and not getattr(config, "use_sliding_window", False):
        sliding = None  # Qwen2 configs carry a window they do not use
    return ModelSpec(
        architecture=arch,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases (never on o_proj); Llama's attention_bias covers all four.
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(config, "attention_bias", False)),
        o_bias=arch != "Qwen2ForCausalLM" and bool(getattr(config, "attention_bias", False)),
        max_position_embeddings=config.max_position_embeddings,
        sliding_window=sliding,
        inv_freq=inv_freq,
        rope_attention_scaling=scaling,
        eos_token_ids=_eos_ids(config),
    )
