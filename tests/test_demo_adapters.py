"""The demo's adapters: shipped datasets, a short real training run into a tmp cache, and loading."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from chameleon.demo.run import format_table
from chameleon.demo.train import STYLES, TrainSettings, load_dataset


def test_datasets_ship_with_the_package() -> None:
    for style in STYLES:
        examples = load_dataset(style)
        assert 6 <= len(examples) <= 10
        assert all(m[-1]["role"] == "assistant" and m[-2]["role"] == "user" for m in examples)


def test_table_is_aligned() -> None:
    lines = format_table(["request", "TTFT ms"], [["base", "12"], ["pirate", "1234"]]).splitlines()
    assert len({len(line) for line in lines}) == 1 and lines[3].endswith("1234")


@pytest.mark.slow
def test_train_few_steps_then_load(smollm2_path: Path, tmp_path: Path) -> None:
    from peft import PeftModel  # noqa: F401  (the demo extra)

    from chameleon import AsyncEngine, EngineConfig, SamplingParams
    from chameleon.demo.train import system_message, train_demo_adapters

    settings = TrainSettings(steps=1, max_len=48)
    paths = train_demo_adapters(smollm2_path, settings, cache_root=tmp_path, progress=False)
    assert set(paths) == set(STYLES) and all((p / "adapter_model.safetensors").is_file() for p in paths.values())
    start = time.perf_counter()
    assert train_demo_adapters(smollm2_path, settings, cache_root=tmp_path, progress=False) == paths
    assert time.perf_counter() - start < 2  # cached

    async def main() -> list[int]:
        async with AsyncEngine.from_pretrained(smollm2_path, EngineConfig(device="cpu")) as engine:
            for name, path in paths.items():
                await engine.add_adapter(name, path)
            messages = [system_message(), {"role": "user", "content": "Hi"}]
            sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
            counts = []
            for name in paths:
                counts.append(sum([len(o.token_ids) async for o in engine.chat(messages, sp, adapter=name)]))
            return counts

    assert anyio.run(main) == [2, 2, 2]
