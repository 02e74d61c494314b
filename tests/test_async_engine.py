"""The async front end under asyncio and trio: streaming, cancellation, errors, shutdown."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from chameleon import AsyncEngine, EngineConfig, SamplingParams
from chameleon.errors import (
    EngineClosedError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    PromptTooLongError,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def engine(tiny_llama: Path) -> AsyncEngine:
    return AsyncEngine.from_pretrained(tiny_llama, EngineConfig(dtype="float32", max_model_len=256))


async def wait_idle(engine: AsyncEngine, timeout: float = 5.0) -> dict[str, int]:
    with anyio.fail_after(timeout):
        while True:
            stats = engine.stats()
            if stats["requests"]["running"] == 0 and stats["requests"]["waiting"] == 0:
                return stats
            await anyio.sleep(0.01)


async def test_streams_concurrently_and_match_a_solo_run(engine: AsyncEngine, tiny_llama: Path) -> None:
    prompts = ["Hello there", "The capital of France is", "1 2 3 4 5 6", "a"]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    results: dict[int, list] = {}

    async def consume(i: int) -> None:
        results[i] = [out async for out in engine.generate(prompts[i], params)]

    async with engine:
        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(consume, i)
        assert (await wait_idle(engine))["kv"]["blocks_in_use"] == 0
    for outs in results.values():
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert outs[-1].finish_reason == "length"
        assert sum(len(o.token_ids) for o in outs) == 12
        assert "".join(o.delta for o in outs) == outs[-1].text
        m = outs[-1].metrics
        assert m.arrival_time <= m.first_token_time <= m.finish_time
    # Same greedy tokens as a request run alone.
    async with AsyncEngine.from_pretrained(tiny_llama, EngineConfig(dtype="float32")) as solo:
        alone = [o async for o in solo.generate(prompts[1], params)]
    assert [t for o in alone for t in o.token_ids] == [t for o in results[1] for t in o.token_ids]


async def test_break_frees_kv_blocks(engine: AsyncEngine) -> None:
    async with engine:
        async for out in engine.generate("Tell me a long story", SamplingParams(max_tokens=200, ignore_eos=True)):
            assert engine.stats()["kv"]["blocks_in_use"] > 0
            break
        stats = await wait_idle(engine)
        assert stats["kv"]["blocks_in_use"] == 0
        # and the engine keeps serving
        outs = [o async for o in engine.generate("again", SamplingParams(max_tokens=3, ignore_eos=True))]
        assert outs[-1].finish_reason == "length"


async def test_cancelling_the_consumer_aborts(engine: AsyncEngine) -> None:
    started = anyio.Event()

    async def consume() -> None:
        async for _ in engine.generate("x", SamplingParams(max_tokens=240, ignore_eos=True)):
            started.set()

    async with engine:
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await started.wait()
            tg.cancel_scope.cancel()
        stats = await wait_idle(engine)
        assert stats["kv"]["blocks_in_use"] == 0 and stats["requests"]["running"] == 0


async def test_abort_by_id(engine: AsyncEngine) -> None:
    async with engine:
        stream = engine.generate("x", SamplingParams(max_tokens=240, ignore_eos=True), request_id="r1")
        first = await stream.__anext__()
        assert not first.finished
        engine.abort("r1")
        rest = [o async for o in stream]
        assert rest[-1].finished and rest[-1].finish_reason == "abort"
        assert (await wait_idle(engine))["kv"]["blocks_in_use"] == 0


async def test_typed_errors_and_engine_keeps_serving(engine: AsyncEngine) -> None:
    with pytest.raises(EngineClosedError):
        engine.generate("not started")
    async with engine:
        with pytest.raises(InvalidSamplingParamsError):
            engine.generate("x", SamplingParams(temperature=-1))
        with pytest.raises(PromptTooLongError):
            engine.generate(list(range(300)))
        with pytest.raises(InvalidRequestError):
            engine.generate([])
        with pytest.raises(InvalidRequestError):
            engine.generate([10**9])
        stream = engine.generate("dup", SamplingParams(max_tokens=50, ignore_eos=True), request_id="same")
        with pytest.raises(InvalidRequestError):
            engine.generate("dup", request_id="same")
        await stream.aclose()
        outs = [o async for o in engine.generate("ok", SamplingParams(max_tokens=2, ignore_eos=True))]
        assert outs[-1].finished
    with pytest.raises(EngineClosedError):
        engine.generate("closed")


async def test_close_aborts_in_flight_requests(engine: AsyncEngine) -> None:
    got: list = []
    first = anyio.Event()

    async def consume(stream) -> None:  # type: ignore[no-untyped-def]
        async for out in stream:
            got.append(out)
            first.set()

    async with anyio.create_task_group() as tg:
        async with engine:
            tg.start_soon(consume, engine.generate("x", SamplingParams(max_tokens=200, ignore_eos=True)))
            await first.wait()  # 200 tokens take 200 steps; closing now must abort, not finish
    assert got[-1].finished and got[-1].finish_reason == "abort"
    assert engine.stats()["kv"]["blocks_in_use"] == 0
    with pytest.raises(EngineClosedError):
        async with engine:
            pass


async def test_stop_strings_never_leak(engine: AsyncEngine) -> None:
    async with engine:
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        full = [o async for o in engine.generate("Once upon", params)]
        text = full[-1].text
        assert len(text) > 6
        stop = text[3:6]
        outs = [o async for o in engine.generate("Once upon", SamplingParams(max_tokens=40, temperature=0, stop=[stop]))]
        assert outs[-1].finish_reason == "stop"
        assert outs[-1].text == text[: text.index(stop)]
        assert "".join(o.delta for o in outs) == outs[-1].text
