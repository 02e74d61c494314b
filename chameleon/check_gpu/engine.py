"""(c) + (d): the real engine token-identical to transformers on a tiny random Llama, and its tokens/s.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chameleon.check_gpu.mode import TARGETS, Mode


def save_llama(path: Path, dims: dict[str, Any], seed: int = 0) -> Path:
    """A random Llama saved as safetensors, no tokenizer (prompts are token ids); nothing downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        max_position_embeddings=1024,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **dims,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def save_adapter(path: Path, dims: dict[str, int], rank: int, seed: int) -> Path:
    """A PEFT-format LoRA (q_proj, v_proj) written directly: adapter_config.json + safetensors."""
    from safetensors.torch import save_file

    h, heads, kv = dims["hidden_size"], dims["num_attention_heads"], dims["num_key_value_heads"]
    out_f = {"q_proj": h, "v_proj": h // heads * kv}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(dims["num_hidden_layers"]):
        for mod in TARGETS:
            key = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, h, generator=gen) / h**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f[mod], rank, generator=gen) * 0.05
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS),
        "bias": "none",
        "lora_dropout": 0.0,
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def merged_hf_model(model_dir: Path, adapter: Path | None, device: torch.device) -> torch.nn.Module:
    """transformers' Llama in fp32 with the adapter merged into its weights: W += (alpha/r)·B·A."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    if adapter is not None:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        w = load_file(str(adapter / "adapter_model.safetensors"))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key in {k.removesuffix(".lora_A.weight") for k in w if k.endswith(".lora_A.weight")}:
                name = key.removeprefix("base_model.model.") + ".weight"
                params[name] += scale * w[f"{key}.lora_B.weight"] @ w[f"{key}.lora_A.weight"]
    return model.to(device)


def hf_greedy(model: Any, prompt: list[int], n: int, device: torch.device) -> list[int]:
    """transformers' generate, one request (no padding), exactly n greedy tokens."""
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt) :].tolist()]


def make_core(model_dir: Path, adapters: dict[str, Path], mode: Mode, dtype: Any, max_seqs: int) -> Any:
    """The real engine on the mode's device, Triton LoRA backend, a 1 GiB memory budget. The test
    models have no tokenizer on purpose, so the factory's warning about that is silenced."""
    from chameleon import EngineConfig
    from chameleon.engine.factory import build_core

    cfg = EngineConfig(
        device="cuda" if mode.device.type == "cuda" else "cpu",
        dtype=dtype,
        lora_backend="triton",
        max_loras=len(adapters) + 1,
        max_lora_rank=16,
        max_model_len=512,
        device_memory_bytes=1 << 30,
        max_num_seqs=max_seqs,
    )
    factory_log = logging.getLogger(build_core.__module__)
    level = factory_log.level
    factory_log.setLevel(logging.ERROR)
    try:
        core = build_core(model_dir, cfg)
    finally:
        factory_log.setLevel(level)
    for name, path in adapters.items():
        core.add_adapter(name, str(path))
    return core


def engine_generate(core: Any, requests: list[tuple[list[int], str | None]], n: int) -> tuple[float, list[list[int]]]:
    """All requests submitted at once, stepped to completion: (seconds, tokens per request)."""
    from chameleon import SamplingParams

    got: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    t0 = time.perf_counter()
    for i, (prompt, adapter) in enumerate(requests):
        core.add_request(str(i), prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter=adapter)
    while core.has_unfinished_requests():
        for out in core.step():
            got[out.request_id].extend(out.token_ids)
    return time.perf_counter() - t0, [got[str(i)] for i in range(len(requests))]


def make_requests(vocab: int, n: int, adapters: Sequence[str | None], seed: int) -> list[tuple[list[int], str | None]]:
    """n random-token prompts of 3..40 tokens, adapters round robin (None = base)."""
    rng = random.Random(seed)
    return [
        ([rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))], adapters[i % len(adapters)]) for i in range(n)
    ]


def run_parity(root: Path, mode: Mode) -> dict[str, Any]:
    """Greedy fp32 tokens of the engine (base rows and two LoRA adapters) vs merged transformers."""
    dims = mode.parity_model
    model_dir = save_llama(root / "parity-model", dims)
    adapters = {f"r{r}": save_adapter(root / f"parity-r{r}", dims, r, seed=r) for r in (8, 16)}
    reqs = make_requests(dims["vocab_size"], mode.parity_requests, [None, *adapters], seed=1)
    core = make_core(model_dir, adapters, mode, "float32", 64)
    _, ours = engine_generate(core, reqs, mode.parity_tokens)
    oracle: list[list[int]] = []
    for name in [None, *adapters]:
        hf = merged_hf_model(model_dir, adapters[name] if name else None, mode.device)
        oracle += [hf_greedy(hf, p, mode.parity_tokens, mode.device) for p, a in reqs if a == name]
    order = [i for name in [None, *adapters] for i, (_, a) in enumerate(reqs) if a == name]
    mismatched = [i for k, i in enumerate(order) if ours[i] != oracle[k]]
    return {
        "requests": len(reqs),
        "new_tokens": mode.parity_tokens,
        "identical": len(reqs) - len(mismatched),
        "mismatched_requests": mismatched,
        "passed": not mismatched,
    }


def run_throughput(root: Path, mode: Mode) -> dict[str, Any]:
    """Engine tokens/s, base-only and mixed (two adapters round robin with base), after a warm-up."""
    dims = mode.tput_model
    model_dir = save_llama(root / "tput-model", dims)
    adapters = {f"r{r}": save_adapter(root / f"tput-r{r}", dims, r, seed=r) for r in (8, 16)}
    core = make_core(model_dir, adapters, mode, mode.tput_dtype, mode.tput_requests)
    engine_generate(core, make_requests(dims["vocab_size"], 2, [None, *adapters], seed=9), 2)  # warm-up
    out: dict[str, Any] = {
        "dtype": mode.tput_dtype,
        "requests": mode.tput_requests,
        "new_tokens": mode.tput_tokens,
        "model": dims,
    }
    mixes: dict[str, list[str | None]] = {"base": [None], "mixed": [None, *adapters]}
    for mix, ads in mixes.items():
        reqs = make_requests(dims["vocab_size"], mode.tput_requests, ads, seed=2)
        secs, toks = engine_generate(core, reqs, mode.tput_tokens)
        out[f"{mix}_tok_s"] = sum(len(t) for t in toks) / secs
        out[f"{mix}_s"] = secs
    out["lora_overhead"] = out["base_tok_s"] / out["mixed_tok_s"]
    return out
