"""Mixed batches of base and adapter requests, token-identical to PEFT; every adapter refusal typed."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import anyio
import pytest
import torch

from chameleon import AsyncEngine, EngineConfig, SamplingParams
from chameleon.engine.core import EngineCore
from chameleon.engine.factory import build_core
from chameleon.errors import (
    AdapterExistsError,
    AdapterInUseError,
    AdapterMemoryError,
    AdapterNotFoundError,
    AdapterValidationError,
    UnsafeAdapterFormatError,
    UnsupportedAdapterError,
)

NAMES = [None, "a8", "b16", "c64", "d8"]


def mixed_workload(vocab: int, n: int = 20, seed: int = 0) -> list[tuple[list[int], int, str | None]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(vocab) for _ in range(rng.randint(1, 40))], rng.randint(1, 10), NAMES[i % len(NAMES)])
        for i in range(n)
    ]


def peft_reference(base_path: Path, adapters: dict[str, Path], work: list[tuple[list[int], int, str | None]]) -> list[list[int]]:
    """The oracle: PEFT's own mixed-adapter generate, one request at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    model.generation_config.eos_token_id = None
    out = []
    for prompt, n, name in work:
        ids = torch.tensor([prompt])
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            adapter_names=[name or "__base__"],
        )
        out.append(gen[0, len(prompt) :].tolist())
    return out


def run(core: EngineCore, work: list[tuple[list[int], int, str | None]]) -> list[list[int]]:
    got: dict[str, list[int]] = {}
    for i, (prompt, n, name) in enumerate(work):
        core.add_request(str(i), prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter=name)
    while core.has_unfinished_requests():
        for out in core.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
    return [got[str(i)] for i in range(len(work))]


@pytest.fixture(scope="module")
def reference(tiny_llama: Path, tiny_adapters: dict[str, Path]) -> tuple[list, list[list[int]]]:
    work = mixed_workload(49152)
    return work, peft_reference(tiny_llama, tiny_adapters, work)


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(dtype="float32"),
        EngineConfig(dtype="float32", lora_backend="triton"),
        # Room for ~2 adapters at a time: requests wait for rows, adapters are evicted and reloaded.
        EngineConfig(dtype="float32", max_loras=2, max_lora_rank=64, adapter_cache="slora"),
    ],
    ids=["torch", "triton-interpreted", "tight-pool"],
)
def test_mixed_batches_match_peft(
    config: EngineConfig, tiny_llama: Path, tiny_adapters: dict[str, Path], reference: tuple[list, list[list[int]]]
) -> None:
    work, expected = reference
    if config.lora_backend == "triton":
        work, expected = work[:16], expected[:16]  # the interpreter is slow; 16 requests still mix all
    core = build_core(tiny_llama, config)
    for name, path in tiny_adapters.items():
        core.add_adapter(name, str(path))
    assert run(core, work) == expected
    # The adapters really change the output (so the comparison above could fail).
    base_only = run(core, [(p, n, None) for p, n, _ in work])
    assert sum(a != b for a, b in zip(base_only, expected)) >= len(work) // 2
    stats = core.stats()
    assert stats.kv.blocks_in_use == 0 and stats.adapters.ref_count == 0
    if config.max_loras == 2:
        assert stats.adapters.evictions > 0


def test_adapter_info(tiny_llama: Path, tiny_adapters: dict[str, Path]) -> None:
    core = build_core(tiny_llama, EngineConfig(dtype="float32"))
    info = core.add_adapter("d8", str(tiny_adapters["d8"]))
    assert (info.rank, info.max_rank, info.target_modules) == (8, 8, ("down_proj", "o_proj"))
    assert info.host_bytes > 0 and info.device_bytes > 0


# --- the async API and its refusals ----------------------------------------------------------


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.anyio
async def test_async_adapter_api_and_refusals(tiny_llama: Path, tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    engine = AsyncEngine.from_pretrained(tiny_llama, EngineConfig(dtype="float32", max_lora_rank=32))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def serves(adapter: str | None = None) -> bool:
        outs = [o async for o in engine.generate([1, 2, 3], params, adapter=adapter)]
        return outs[-1].finish_reason == "length"

    async with engine:
        info = await engine.add_adapter("a8", tiny_adapters["a8"])
        assert info.rank == 8 and [a.name for a in engine.adapters()] == ["a8"]
        assert await serves("a8")

        with pytest.raises(AdapterExistsError):
            await engine.add_adapter("a8", tiny_adapters["a8"])
        with pytest.raises(AdapterNotFoundError):
            engine.generate("hi", params, adapter="nope")
        with pytest.raises(AdapterValidationError, match="64"):  # rank 64 > max_lora_rank 32
            await engine.add_adapter("big", tiny_adapters["c64"])

        pickled = tmp_path / "pickled"
        pickled.mkdir()
        shutil.copy(tiny_adapters["a8"] / "adapter_config.json", pickled)
        (pickled / "adapter_model.bin").write_bytes(b"\x80\x04never unpickled")
        with pytest.raises(UnsafeAdapterFormatError):
            await engine.add_adapter("pickled", pickled)

        dora = tmp_path / "dora"
        shutil.copytree(tiny_adapters["a8"], dora)
        cfg = json.loads((dora / "adapter_config.json").read_text())
        (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
        with pytest.raises(UnsupportedAdapterError, match="DoRA"):
            await engine.add_adapter("dora", dora)

        stream = engine.generate([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True), adapter="a8")
        await stream.__anext__()
        with pytest.raises(AdapterInUseError):
            engine.remove_adapter("a8")
        await stream.aclose()
        with anyio.fail_after(5):
            while engine.stats()["requests"]["running"]:
                await anyio.sleep(0.01)
        engine.remove_adapter("a8")
        with pytest.raises(AdapterNotFoundError):
            engine.remove_adapter("a8")
        assert engine.adapters() == []
        assert await serves()  # the engine kept serving through every refusal
        assert engine.stats()["adapters"]["ref_count"] == 0 and engine.stats()["kv"]["blocks_in_use"] == 0


def test_pinned_adapters_are_never_evicted(tiny_llama: Path, tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    from tests.conftest import save_peft_adapters

    extra = save_peft_adapters(tiny_llama, tmp_path, {"e16": dict(r=16, lora_alpha=16, target_modules=["q_proj"])})
    # 24 rank rows: a8 pinned (8) leaves room for one of the rank-16 adapters at a time.
    core = build_core(tiny_llama, EngineConfig(dtype="float32", max_loras=1, max_lora_rank=24))
    core.add_adapter("a8", str(tiny_adapters["a8"]))
    core.add_adapter("b16", str(tiny_adapters["b16"]))
    core.add_adapter("e16", str(extra["e16"]))
    core.pin_adapter("a8")
    for name in ("a8", "b16", "e16", "b16", "a8", "e16"):
        run(core, [([1, 2, 3], 2, name)])
        assert core.adapter_cache.entries["a8"].resident
    assert core.stats().adapters.evictions >= 3
    with pytest.raises(AdapterMemoryError):  # b16 could never load next to two pinned adapters
        core.pin_adapter("e16")
    core.pin_adapter("a8", False)
    run(core, [([1, 2, 3], 2, "b16")])
    run(core, [([1, 2, 3], 2, "e16")])  # with a8 unpinned and idle, it is the one evicted
    assert not core.adapter_cache.entries["a8"].resident


def test_an_adapter_that_cannot_fit_is_refused(tiny_llama: Path, tiny_adapters: dict[str, Path]) -> None:
    core = build_core(tiny_llama, EngineConfig(dtype="float32", max_loras=1, max_lora_rank=16))
    core.add_adapter("b16", str(tiny_adapters["b16"]))
    core.pin_adapter("b16")
    with pytest.raises(AdapterMemoryError):
        core.add_adapter("a8", str(tiny_adapters["a8"]))
    assert "a8" not in core.adapters
