"""Continuous batching changes nothing numerically: greedy fp32 tokens equal transformers' generate."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from chameleon import EngineConfig, SamplingParams
from chameleon.engine.core import EngineCore
from chameleon.engine.factory import build_core
from chameleon.sched import SchedulerOptions
from tests.conftest import save_tiny_model


def hf_greedy(path: Path, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    """The oracle: transformers' own generate, one request at a time (no padding effects)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # compare exactly max_tokens tokens
    outs = []
    for prompt, n in zip(prompts, max_tokens, strict=True):
        ids = torch.tensor([prompt])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        outs.append(gen[0, len(prompt) :].tolist())
    return outs


def run_core(core: EngineCore, prompts: list[list[int]], max_tokens: list[int], stagger: int = 0) -> list[list[int]]:
    """Submit all requests (some arriving mid-flight when `stagger` > 0) and step to completion."""
    results: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    pending = list(range(len(prompts)))
    steps = 0
    while pending or core.has_unfinished_requests():
        while pending and (stagger == 0 or steps % stagger == 0 or not core.has_unfinished_requests()):
            i = pending.pop(0)
            core.add_request(str(i), prompts[i], SamplingParams(max_tokens=max_tokens[i], temperature=0, ignore_eos=True))
            if stagger:
                break
        for out in core.step():
            results[out.request_id].extend(out.token_ids)
        steps += 1
    return [results[str(i)] for i in range(len(prompts))]


def workload(vocab: int, n: int = 20, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 60))] for _ in range(n)]
    max_tokens = [rng.randint(1, 24) for _ in range(n)]
    return prompts, max_tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(dtype="float32"),
        # A small token budget forces chunked prefill mixed with decodes in the same step.
        EngineConfig(dtype="float32", max_num_batched_tokens=24, block_size=4),
        # A KV cache too small for everyone forces preemption and recomputation (FIFO overcommits).
        EngineConfig(dtype="float32", scheduler="fifo", num_kv_blocks=40, block_size=4, max_model_len=160),
        # Chameleon's quotas avoid overcommitting when predictions are right; a predictor that is
        # always wrong makes it overcommit, so its victims get preempted too.
        EngineConfig(
            dtype="float32",
            num_kv_blocks=40,
            block_size=4,
            max_model_len=160,
            scheduler_options=SchedulerOptions(predictor="noisy-oracle", predictor_accuracy=0.0),
        ),
    ],
    ids=["default", "chunked", "preempting-fifo", "preempting-chameleon"],
)
def test_greedy_matches_transformers(arch: str, config: EngineConfig, request: Any) -> None:
    path = request.getfixturevalue(f"tiny_{arch}")
    core = build_core(path, config)
    prompts, max_tokens = workload(core.limits.vocab_size)
    expected = hf_greedy(path, prompts, max_tokens)
    got = run_core(core, prompts, max_tokens, stagger=0 if config.num_kv_blocks else 3)
    assert got == expected
    assert core.stats().kv.blocks_in_use == 0
    if config.num_kv_blocks == 40:
        assert core.stats().requests.preemptions > 0, "the scenario was meant to preempt"


def test_llama3_rope_scaling_and_attention_bias(tmp_path: Path, tokenizer: Any) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    path = save_tiny_model(tmp_path, "llama", tokenizer, rope_parameters=rope, attention_bias=True)
    core = build_core(path, EngineConfig(dtype="float32"))
    prompts, max_tokens = workload(core.limits.vocab_size, n=6, seed=1)
    assert run_core(core, prompts, max_tokens) == hf_greedy(path, prompts, max_tokens)
