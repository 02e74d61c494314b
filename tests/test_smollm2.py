"""The real demo model through our engine matches transformers token for token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chameleon import EngineConfig, SamplingParams
from chameleon.engine.factory import build_core

pytestmark = pytest.mark.slow


def test_capital_of_france(smollm2_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    core = build_core(smollm2_path, EngineConfig(dtype="float32"))
    prompt = core.tokenizer("The capital of France is").input_ids
    core.add_request("paris", prompt, SamplingParams(max_tokens=16, temperature=0))
    core.add_request("other", core.tokenizer("Water boils at").input_ids, SamplingParams(max_tokens=16, temperature=0))
    outs: dict[str, list] = {}
    while core.has_unfinished_requests():
        for out in core.step():
            outs.setdefault(out.request_id, []).append(out)
    ours = [t for o in outs["paris"] for t in o.token_ids]

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)[0, len(prompt) :]
    ref_ids = ref.tolist()
    if core.tokenizer.eos_token_id in ref_ids:  # generate pads after EOS; we stop at it
        ref_ids = ref_ids[: ref_ids.index(core.tokenizer.eos_token_id) + 1]
    assert ours == ref_ids
    assert "Paris" in outs["paris"][-1].text
