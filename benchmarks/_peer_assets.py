"""Assets and workloads shared by `bench_peers.py` and its peer worker: a tiny Llama with a real
tokenizer, PEFT adapters, and the offline / online request lists.

Only the standard library, torch, transformers and peft: the vLLM worker (another venv) does not
import this module, it receives plain JSON.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

# Offline workload (A): the model and four adapters the issue names.
TINY = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=2048)
OFFLINE_ADAPTERS = {"sql-r8": 8, "chat-r16": 16, "code-r8": 8, "math-r16": 16}
OFFLINE_TARGETS = ["q_proj", "v_proj"]

PROMPT_TEXTS = [
    "The capital of France is",
    "Write a short poem about autumn leaves falling in the park.",
    "Explain quantum computing to a ten year old.",
    "List five fruits:",
    "def fibonacci(n):",
    "Once upon a time in a small village by the sea, there lived an old fisherman who",
    "Translate to French: Good morning, how are you today?",
    "The three laws of robotics are",
    "SELECT name, age FROM users WHERE",
    "Summarize the plot of Hamlet in two sentences.",
    "What is the derivative of x squared plus three x?",
    "A haiku about the ocean:",
    "The best way to learn a new language is",
    "import numpy as np\nx = np.arange(10)\n",
    "Dear customer, thank you for your order. Unfortunately",
    "In 1969, the first humans landed on",
]


def tokenizer_dir() -> Path:
    from chameleon.assets import smollm2_dir

    return smollm2_dir()


def make_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """A random Llama (hidden 256, 4 layers, GQA 8/2 heads) with SmolLM2's real tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    cfg = LlamaConfig(vocab_size=len(tok), initializer_range=0.05, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **TINY)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_peft_adapter(base: Path, out: Path, rank: int, targets: list[str], seed: int) -> Path:
    """A real PEFT save (init_lora_weights=False: random A and B, otherwise a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                            init_lora_weights=False))
    peft.save_pretrained(out)
    return out




def make_online_adapters(base: Path, root: Path, specs: list[tuple[str, int]], targets: list[str]) -> dict[str, Path]:
    """One distinct PEFT adapter per spec (name, rank), each with its own random weights.

    PEFT's get_peft_model is slow (~1 s each); instead we save one adapter per rank through PEFT
    and derive the others by re-drawing the tensors with the same shapes and file layout.
    """
    from safetensors.torch import load_file, save_file

    templates: dict[int, Path] = {}
    for rank in sorted({r for _, r in specs}):
        templates[rank] = make_peft_adapter(base, root / f"_template-r{rank}", rank, targets, seed=rank)
    out: dict[str, Path] = {}
    for i, (name, rank) in enumerate(specs):
        d = root / name
        d.mkdir(parents=True)
        shutil.copy(templates[rank] / "adapter_config.json", d / "adapter_config.json")
        g = torch.Generator().manual_seed(1000 + i)
        tensors = load_file(str(templates[rank] / "adapter_model.safetensors"))
        std = {k: float(v.std()) for k, v in tensors.items()}
        save_file({k: torch.randn(v.shape, generator=g) * std[k] for k, v in tensors.items()},
                  str(d / "adapter_model.safetensors"))
        out[name] = d
    return out


def offline_requests(tok: Any, n: int, max_tokens: int, adapters: list[str | None], seed: int = 0) -> list[dict[str, Any]]:
    """n requests with real prompts, adapters assigned round robin over `adapters` (None = base)."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        text = PROMPT_TEXTS[i % len(PROMPT_TEXTS)]
        if rng.random() < 0.5:  # vary prompt lengths a little
            text = text + " " + PROMPT_TEXTS[rng.randrange(len(PROMPT_TEXTS))]
        reqs.append({"id": f"r{i}", "prompt": tok(text).input_ids, "max_tokens": max_tokens,
                     "adapter": adapters[i % len(adapters)]})
    return reqs


def dump(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj))
    return path
