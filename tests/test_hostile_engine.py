"""The async front end against a hostile caller: bad arguments to every entry point, unhashable and
stale aborts, a failing `async with` body, overload, refused pins and adapters, unread streams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from chameleon import AsyncEngine, EngineConfig, SamplingParams
from chameleon.engine.async_engine import OUTPUT_BUFFER
from chameleon.errors import (
    AdapterMemoryError,
    ChameleonError,
    EngineOverloadedError,
    InvalidRequestError,
    PromptTooLongError,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


def make_engine(tiny_llama: Path, **kw: Any) -> AsyncEngine:
    return AsyncEngine.from_pretrained(tiny_llama, EngineConfig(dtype="float32", max_model_len=256, **kw))


def params(**kw: Any) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 3, "ignore_eos": True, **kw})


def with_output_kind(kind: str, **kw: Any) -> SamplingParams:
    """`output_kind` as a SamplingParams field where it exists, else on a subclass (same reading)."""
    try:
        return params(output_kind=kind, **kw)
    except TypeError:
        cls = type("KindParams", (SamplingParams,), {"output_kind": kind})
        return cls(**{"max_tokens": 3, "ignore_eos": True, **kw})  # type: ignore[no-any-return]


async def serves(engine: AsyncEngine) -> bool:
    outs = [o async for o in engine.generate([1, 2, 3], params())]
    return outs[-1].finish_reason == "length"


async def wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            stats = engine.stats()
            if stats["requests"]["running"] == 0 and stats["requests"]["waiting"] == 0 and stats["open_streams"] == 0:
                return stats
            await anyio.sleep(0.01)


BAD_GENERATE: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((b"abc",), {}),
    ((bytearray(b"ab"),), {}),
    (({1: 2},), {}),
    (({1, 2},), {}),
    (([True, False],), {}),
    (([1.0, 2.0],), {}),
    (([1, "2"],), {}),
    ((None,), {}),
    ((3,), {}),
    (([[1, 2]],), {}),
    (([-1],), {}),
    (([1, 2],), {"request_id": ["unhashable"]}),
    (([1, 2],), {"request_id": 7}),
    (([1, 2],), {"request_id": ""}),
    (([1, 2],), {"request_id": b"id"}),
    (([1, 2],), {"adapter": 3}),
    (([1, 2],), {"adapter": ["a"]}),
    (([1, 2],), {"adapter": "nope"}),
    (([1, 2], {"max_tokens": 3}), {}),
    (([1, 2], "greedy"), {}),
]


async def test_bad_arguments_to_every_entry_point_raise_typed_errors(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama)
    async with engine:
        for args, kwargs in BAD_GENERATE:
            with pytest.raises(ChameleonError):
                engine.generate(*args, **kwargs)
        with pytest.raises(PromptTooLongError):  # prompt + max_tokens past max_model_len
            engine.generate([1] * 200, SamplingParams(max_tokens=100))
        for bad in ([1], {"a": 1}, 3, None, b"r"):
            with pytest.raises(InvalidRequestError):
                engine.abort(bad)  # type: ignore[arg-type]
        for name, path in ((3, "x"), (["a"], "x"), ("", "x"), ("ok", 3), ("ok", None)):
            with pytest.raises(ChameleonError):
                await engine.add_adapter(name, path)  # type: ignore[arg-type]
        for call in (engine.remove_adapter, engine.pin_adapter, engine.unpin_adapter):
            for bad in ([1], 3, "", "missing"):
                with pytest.raises(ChameleonError):
                    call(bad)  # type: ignore[arg-type]
        assert await serves(engine)  # the loop survived every one of them
        assert (await wait_idle(engine))["kv"]["blocks_in_use"] == 0


async def test_an_abort_never_kills_a_later_request_that_reuses_the_id(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama)
    async with engine:
        first = [o async for o in engine.generate([1, 2, 3], params(), request_id="r")]
        assert first[-1].finish_reason == "length"
        engine.abort("r")  # stale: "r" is finished
        second = [o async for o in engine.generate([1, 2, 3], params(max_tokens=5), request_id="r")]
        assert second[-1].finish_reason == "length" and sum(len(o.token_ids) for o in second) == 5
        # an abort of the live request still works, and an id reused afterwards is untouched
        stream = engine.generate([1, 2, 3], params(max_tokens=200), request_id="q")
        await stream.__anext__()
        engine.abort("q")
        assert [o async for o in stream][-1].finish_reason == "abort"
        third = [o async for o in engine.generate([4, 5], params(), request_id="q")]
        assert third[-1].finish_reason == "length"
        assert (await wait_idle(engine))["kv"]["blocks_in_use"] == 0


async def test_consumers_outside_the_task_group_end_when_the_body_raises(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama)
    ended: list[Any] = []
    first, done = anyio.Event(), anyio.Event()

    async def consume(stream: Any) -> None:
        try:
            async for out in stream:
                ended.append(out)
                first.set()
        except ChameleonError as exc:
            ended.append(exc)
        done.set()

    async with anyio.create_task_group() as outside:
        with pytest.raises((RuntimeError, BaseExceptionGroup)):
            async with engine:
                outside.start_soon(consume, engine.generate([1, 2, 3], params(max_tokens=200)))
                queued = engine.generate([4, 5], params(max_tokens=200))  # never read, maybe never added
                await first.wait()
                raise RuntimeError("the body failed")
        with anyio.fail_after(5):
            await done.wait()
        with anyio.fail_after(5):
            rest = [o async for o in queued]
    last = ended[-1]
    assert isinstance(last, ChameleonError) or (last.finished and last.finish_reason == "abort")
    assert rest and rest[-1].finished
    assert engine.stats()["kv"]["blocks_in_use"] == 0 and engine.stats()["open_streams"] == 0


async def test_overload_is_refused_at_once(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama, max_queued_requests=3)
    async with engine:
        streams = [engine.generate([1, 2, 3], params(max_tokens=50)) for _ in range(3)]  # queued, not yet added
        with pytest.raises(EngineOverloadedError):
            engine.generate([1, 2, 3], params())
        for s in streams:
            await s.aclose()
        await wait_idle(engine)
        assert await serves(engine)  # room again


async def test_a_refused_pin_surfaces_and_is_not_reported(tiny_llama: Path, tiny_adapters: dict[str, Path]) -> None:
    engine = make_engine(tiny_llama, max_loras=1, max_lora_rank=16)
    async with engine:
        await engine.add_adapter("b16", tiny_adapters["b16"])
        await engine.add_adapter("a8", tiny_adapters["a8"])
        with pytest.raises(AdapterMemoryError):  # pinning b16 would leave a8 no room, ever
            await engine.pin_adapter("b16")
        assert not any(info.pinned for info in engine.adapters())
        await engine.remove_adapter("a8")
        await engine.pin_adapter("b16")  # alone, it fits
        assert [i.name for i in engine.adapters() if i.pinned] == ["b16"]
        await engine.unpin_adapter("b16")
        assert not any(info.pinned for info in engine.adapters())


async def test_a_refused_adapter_leaves_nothing_registered(tiny_llama: Path, tiny_adapters: dict[str, Path]) -> None:
    engine = make_engine(tiny_llama, max_loras=1, max_lora_rank=16)
    async with engine:
        await engine.add_adapter("b16", tiny_adapters["b16"])
        await engine.pin_adapter("b16")
        for _ in range(3):
            with pytest.raises(AdapterMemoryError):
                await engine.add_adapter("a8", tiny_adapters["a8"])
        executor = engine.core.executor
        assert "a8" not in executor.host_adapters and "a8" not in executor._sources
        assert [i.name for i in engine.adapters()] == ["b16"]


async def test_delta_streams_carry_no_cumulative_text_and_an_unread_stream_is_bounded(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama)
    async with engine:
        n = OUTPUT_BUFFER * 2 + 10
        stream = engine.generate("Once upon a time", params(max_tokens=n))
        with anyio.fail_after(60):
            while engine.stats()["open_streams"]:
                await anyio.sleep(0.02)
        assert stream._receive.statistics().current_buffer_used <= OUTPUT_BUFFER + 1
        outs = [o async for o in stream]
        assert all(o.text == "" for o in outs[:-1])
        assert "".join(o.delta for o in outs) == outs[-1].text
        assert sum(len(o.token_ids) for o in outs) == n


@pytest.mark.parametrize("kind", ["cumulative", "final"])
async def test_output_kinds(tiny_llama: Path, kind: str) -> None:
    engine = make_engine(tiny_llama)
    async with engine:
        outs = [o async for o in engine.generate("Hello", with_output_kind(kind, max_tokens=6, temperature=0))]
        ref = [o async for o in engine.generate("Hello", params(max_tokens=6, temperature=0))]
    full_ids = tuple(t for o in ref for t in o.token_ids)
    assert outs[-1].token_ids == full_ids and outs[-1].text == ref[-1].text
    if kind == "final":
        assert len(outs) == 1
    else:
        assert len(outs) == 6 and [len(o.token_ids) for o in outs] == [1, 2, 3, 4, 5, 6]
