"""Serve several PEFT LoRA adapters and the base model side by side, in one batch.

    python examples/adapters.py NAME=ADAPTER_DIR [NAME=ADAPTER_DIR ...] [--model DIR]

Each adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (what PEFT's
`save_pretrained` writes) trained for the base model. With no adapters given, this makes two
random rank-8/16 adapters for SmolLM2 with PEFT (needs `pip install peft`) to show the mechanics.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anyio

from chameleon import AsyncEngine, EngineConfig, SamplingParams
from chameleon.assets import smollm2_dir


def random_adapters(model_dir: Path, out: Path) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for name, rank, targets in [("q-v-r8", 8, ["q_proj", "v_proj"]), ("mlp-r16", 16, ["gate_proj", "up_proj"])]:
        torch.manual_seed(rank)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        peft = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
        paths[name] = out / name
        peft.save_pretrained(paths[name])
    return paths


async def main(model: Path, adapters: dict[str, Path]) -> None:
    async with AsyncEngine.from_pretrained(model, EngineConfig()) as engine:
        for name, path in adapters.items():
            info = await engine.add_adapter(name, path)
            print(f"registered {info.name}: rank {info.rank}, targets {', '.join(info.target_modules)}")
        params = SamplingParams(max_tokens=24, temperature=0)
        results: dict[str, str] = {}

        async def ask(adapter: str | None) -> None:
            text = ""
            async for out in engine.generate("The best thing about autumn is", params, adapter=adapter):
                text += out.delta
            results[adapter or "base"] = text

        async with anyio.create_task_group() as tg:  # one batch, mixed adapters
            for adapter in [None, *adapters]:
                tg.start_soon(ask, adapter)
        for name, text in results.items():
            print(f"[{name}] {text!r}")
        print(engine.stats())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("adapters", nargs="*", help="NAME=DIR")
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    model = args.model or smollm2_dir()
    with tempfile.TemporaryDirectory() as tmp:
        given = dict(a.split("=", 1) for a in args.adapters)
        adapters = {k: Path(v) for k, v in given.items()} or random_adapters(model, Path(tmp))
        anyio.run(main, model, adapters)
