"""A request that could never fit next to its adapter is refused with a typed error, never left to wait.

The bug (issue 16): `num_kv_blocks` fixes the budget at exactly the KV blocks plus the reserve, so
an adapter lives only in KV bytes nobody uses. A request whose KV at its longest (prompt +
max_tokens) plus its adapter's rows exceeds that budget waited forever: `acquire` found room for
the adapter, the KV allocation next to it never did (or, with chunked prefill, it was admitted,
grew, preempted itself and started over, forever).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from chameleon import AsyncEngine, EngineConfig, SamplingParams
from chameleon.engine.core import EngineCore
from chameleon.engine.factory import build_core
from chameleon.errors import AdapterMemoryError, PromptTooLongError, RequestMemoryError

# The tiny Llama: a KV block (block_size 4, fp32) is 2,048 bytes, an adapter rank row 8,192 bytes.
BLOCK, ROW = 2048, 8192


def core_with(
    tiny_llama: Path, tiny_adapters: dict[str, Path], names: tuple[str, ...] = ("a8",), **kw: Any
) -> EngineCore:
    core = build_core(tiny_llama, EngineConfig(dtype="float32", block_size=4, num_kv_blocks=100, **kw))
    assert core.memory.kv_block_bytes == BLOCK and core.memory.adapter_row_bytes == ROW
    for name in names:
        core.add_adapter(name, str(tiny_adapters[name]))
    return core


def finishes(core: EngineCore, steps: int = 400) -> bool:
    for _ in range(steps):
        if not core.has_unfinished_requests():
            return True
        core.step()
    return not core.has_unfinished_requests()


def params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("chunk", [2048, 16], ids=["whole-prefill", "chunked-prefill"])
def test_a_request_that_can_never_fit_next_to_its_adapter_is_refused(
    tiny_llama: Path, tiny_adapters: dict[str, Path], chunk: int
) -> None:
    core = core_with(tiny_llama, tiny_adapters, max_num_batched_tokens=chunk)
    # 100 blocks = 204,800 bytes. a8 takes 8 rows = 65,536; 300 + 20 tokens need 80 blocks = 163,840.
    with pytest.raises(RequestMemoryError, match="a8") as err:
        core.add_request("big", list(range(5, 305)), params(20), adapter="a8")
    assert isinstance(err.value, PromptTooLongError)  # a request error (HTTP 400), not an engine fault
    assert not core.has_unfinished_requests()
    # The same request without the adapter fits (the KV alone holds 400 tokens) and finishes.
    core.add_request("base", list(range(5, 305)), params(20))
    assert finishes(core)
    # One that fits next to the adapter (67 blocks + 8 rows = 202,752 bytes) is served.
    core.add_request("fits", list(range(5, 253)), params(20), adapter="a8")
    assert finishes(core)
    assert core.blocks.num_in_use == 0 and core.adapter_cache.total_ref_count == 0


def test_pinned_adapters_count_against_every_request(tiny_llama: Path, tiny_adapters: dict[str, Path]) -> None:
    core = core_with(tiny_llama, tiny_adapters, names=("a8", "b16"))
    core.pin_adapter("b16")  # 16 rows = 131,072 bytes that never come back: 36 blocks are left
    with pytest.raises(RequestMemoryError):
        core.add_request("base", list(range(5, 145)), params(8))  # 37 blocks
    with pytest.raises(RequestMemoryError):
        core.add_request("a8", list(range(5, 15)), params(8), adapter="a8")  # 5 blocks + 8 rows > 36 blocks
    core.add_request("b16", list(range(5, 137)), params(8), adapter="b16")  # its own rows are counted once
    assert finishes(core)


def test_an_adapter_that_leaves_no_room_for_one_kv_block_is_refused(
    tiny_llama: Path, tiny_adapters: dict[str, Path]
) -> None:
    # 32 blocks = 65,536 bytes = exactly a8's 8 rows: it would fit alone, with no KV for its requests.
    core = build_core(tiny_llama, EngineConfig(dtype="float32", block_size=4, num_kv_blocks=32))
    with pytest.raises(AdapterMemoryError, match="KV block"):
        core.add_adapter("a8", str(tiny_adapters["a8"]))
    assert "a8" not in core.adapters and "a8" not in core.adapter_cache.entries
    core.add_request("base", [1, 2, 3], params(2))
    assert finishes(core)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_the_async_front_end_refuses_at_submit(tiny_llama: Path, tiny_adapters: dict[str, Path]) -> None:
    config = EngineConfig(dtype="float32", block_size=4, num_kv_blocks=100)
    async with AsyncEngine.from_pretrained(tiny_llama, config) as engine:
        await engine.add_adapter("a8", tiny_adapters["a8"])
        with pytest.raises(RequestMemoryError):
            engine.generate(list(range(5, 305)), params(20), adapter="a8")
        with anyio.fail_after(30):
            outs = [o async for o in engine.generate(list(range(5, 25)), params(3), adapter="a8")]
        assert outs[-1].finish_reason == "length"
