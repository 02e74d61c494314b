"""Shared fixtures: tiny random checkpoints that transformers builds and saves, plus SmolLM2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a hub, ever
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels can only run interpreted. Triton fixes this when a kernel is
# defined, so it has to be set before anything imports them.
if not os.environ.get("CHAMELEON_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from chameleon.assets import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def tokenizer(smollm2_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def save_tiny_model(path: Path, arch: str, tokenizer: Any, **overrides: Any) -> Path:
    """A small random decoder saved the way the Hub would ship it, with a real tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,  # larger than default so greedy picks are decisive, not near-ties
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    common.update(overrides)
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    else:
        raise ValueError(arch)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tokenizer)


# PEFT adapters for the tiny Llama: different ranks, targets, rsLoRA and a rank pattern.
ADAPTER_CONFIGS: dict[str, dict[str, Any]] = {
    "a8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "b16": dict(
        r=16,
        lora_alpha=32,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "c64": dict(r=64, lora_alpha=64, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "d8": dict(r=8, lora_alpha=8, target_modules=["o_proj", "down_proj"], rank_pattern={"down_proj": 4}),
}


def save_peft_adapters(base_path: Path, out: Path, configs: dict[str, dict[str, Any]]) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for i, (name, kwargs) in enumerate(configs.items()):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        # init_lora_weights=False: random A *and* B, otherwise the adapter is a no-op.
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, **kwargs))
        paths[name] = out / name
        model.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict[str, Path]:
    return save_peft_adapters(tiny_llama, tmp_path_factory.mktemp("adapters"), ADAPTER_CONFIGS)
