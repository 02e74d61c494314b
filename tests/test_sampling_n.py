"""`SamplingParams.n`: n completions of one prompt, seeded `seed + i`, sharing the prefill."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from chameleon import AsyncEngine, CompletionOutput, EngineConfig, RequestMetrics, RequestOutput, SamplingParams
from chameleon.engine.core import EngineCore
from chameleon.engine.factory import build_core
from chameleon.errors import InvalidRequestError, InvalidSamplingParamsError
from chameleon.executor import torch_executor
from chameleon.outputs import merge_outputs

PROMPT = [5, 17, 99, 3, 250, 42, 8, 61, 7, 300, 11, 12, 13]


def drain(core: EngineCore) -> list[RequestOutput]:
    outs = []
    while core.has_unfinished_requests():
        outs += core.step()
    return outs


def texts(outs: list[RequestOutput], rid: str) -> dict[int, list[int]]:
    """Token ids per completion index (delta outputs)."""
    got: dict[int, list[int]] = {}
    for out in outs:
        if out.request_id == rid:
            for c in out.outputs:
                got.setdefault(c.index, []).extend(c.token_ids)
    return got


def single(core: EngineCore, seed: int, **kw: Any) -> list[int]:
    core.add_request(f"one-{seed}", PROMPT, SamplingParams(max_tokens=6, temperature=1.0, seed=seed, ignore_eos=True, **kw))
    return [t for o in drain(core) for t in o.token_ids]


def assert_idle(core: EngineCore) -> None:
    assert not core.has_unfinished_requests() and core.request_ids() == []
    assert core.blocks.num_in_use == 0


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_completion_i_equals_a_single_request_with_seed_plus_i(tiny_llama: Path, prefix_caching: bool) -> None:
    core = build_core(tiny_llama, EngineConfig(dtype="float32", enable_prefix_caching=prefix_caching, block_size=4))
    core.add_request("p", PROMPT, SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=40, ignore_eos=True))
    assert core.request_ids() == ["p"] and core.has_request("p") and not core.has_request("0_p")
    outs = drain(core)
    assert {o.request_id for o in outs} == {"p"}
    assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
    got = texts(outs, "p")
    assert sorted(got) == [0, 1, 2] and all(len(v) == 6 for v in got.values())
    final = outs[-1]
    assert final.metrics.num_generated_tokens == 18 and final.metrics.num_prompt_tokens == len(PROMPT)
    assert final.metrics.ttft is not None and final.finish_reason == "length"
    assert_idle(core)
    reference = build_core(tiny_llama, EngineConfig(dtype="float32"))
    assert [got[i] for i in range(3)] == [single(reference, 40 + i) for i in range(3)]
    assert len({tuple(v) for v in got.values()}) > 1  # independent samples
    if prefix_caching:  # children 1 and 2 attached child 0's full prompt blocks
        assert core.stats().prefix.hit_tokens >= 2 * (len(PROMPT) // 4) * 4


def test_greedy_n_gives_identical_completions_and_final_carries_all(tiny_llama: Path) -> None:
    core = build_core(tiny_llama, EngineConfig(dtype="float32"))
    core.add_request("g", PROMPT, SamplingParams(n=4, max_tokens=5, temperature=0, ignore_eos=True, output_kind="final"))
    (out,) = drain(core)
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({c.token_ids for c in out.outputs}) == 1 and len(out.outputs[0].token_ids) == 5
    assert out.token_ids == out.outputs[0].token_ids and out.text == out.outputs[0].text
    assert all(c.finish_reason == "length" and c.finished for c in out.outputs)


def test_parent_metrics_on_a_clock_at_zero(tiny_llama: Path) -> None:
    from chameleon.clock import ManualClock

    core = build_core(tiny_llama, EngineConfig(dtype="float32"), clock=ManualClock())
    core.add_request("z", PROMPT, SamplingParams(n=2, max_tokens=2, temperature=0, ignore_eos=True))
    final = drain(core)[-1]
    assert final.finished and final.metrics.finish_time == 0.0 and final.metrics.first_token_time == 0.0


def test_cumulative_n_and_logprobs_per_completion(tiny_llama: Path) -> None:
    core = build_core(tiny_llama, EngineConfig(dtype="float32", enable_prefix_caching=True, block_size=4))
    sp = SamplingParams(n=2, max_tokens=3, temperature=0.8, seed=1, ignore_eos=True, output_kind="cumulative",
                        logprobs=2, prompt_logprobs=1)  # fmt: skip
    core.add_request("c", PROMPT, sp)
    outs = drain(core)
    prompts = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    assert len(prompts) == 1 and len(prompts[0]) == len(PROMPT) and prompts[0][0] is None
    last = {c.index: c for o in outs for c in o.outputs}
    assert sorted(last) == [0, 1]
    for c in last.values():
        assert len(c.token_ids) == 3 and c.logprobs is not None and len(c.logprobs) == 3
        assert all(next(iter(e)) == t for e, t in zip(c.logprobs, c.token_ids, strict=True))


def test_abort_of_a_parent_ends_every_completion(tiny_llama: Path) -> None:
    core = build_core(tiny_llama, EngineConfig(dtype="float32", enable_prefix_caching=True, block_size=4))
    core.add_request("a", PROMPT, SamplingParams(n=3, max_tokens=50, temperature=0, ignore_eos=True))
    assert core.abort("0_a") is None  # a child id is not a request id
    core.step()  # child 0 prefills; 1 and 2 are released after it
    out = core.abort("a")
    assert out is not None and out.finished and out.finish_reason == "abort"
    assert sorted(c.index for c in out.outputs) == [0, 1, 2] and all(c.finish_reason == "abort" for c in out.outputs)
    assert core.abort("a") is None
    assert_idle(core)
    core.add_request("b", PROMPT, SamplingParams(n=2, max_tokens=50, output_kind="final"))
    (out,) = core.abort_all()  # before any step: child 1 is still held back
    assert out.request_id == "b" and [c.index for c in out.outputs] == [0, 1]
    assert_idle(core)


def test_ids_of_parents_and_children_are_checked(tiny_llama: Path) -> None:
    core = build_core(tiny_llama, EngineConfig(dtype="float32"))
    core.add_request("x", PROMPT, SamplingParams(n=2, max_tokens=3))
    with pytest.raises(InvalidRequestError, match="already in use"):
        core.add_request("x", PROMPT, SamplingParams())
    core.add_request("1_y", PROMPT, SamplingParams(max_tokens=3))
    with pytest.raises(InvalidRequestError, match="completion of 'y'"):
        core.add_request("y", PROMPT, SamplingParams(n=2, max_tokens=3))
    with pytest.raises(InvalidRequestError, match="completion of 'y'"):  # checked before anything is queued
        core.check_request("y", PROMPT, sampling=SamplingParams(n=2))
    assert not core.has_request("y")
    drain(core)
    assert_idle(core)


def test_one_failing_completion_fails_the_whole_request(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch_executor.sample_from_hidden

    def flaky(hidden, params, generators, **kw):  # type: ignore[no-untyped-def]
        if any(p.seed == 667 for p in params):  # completion 1 of seed 666
            raise RuntimeError("poisoned row")
        return real(hidden, params, generators, **kw)

    monkeypatch.setattr(torch_executor, "sample_from_hidden", flaky)
    core = build_core(tiny_llama, EngineConfig(dtype="float32"))
    core.add_request("bad", PROMPT, SamplingParams(n=3, max_tokens=4, temperature=0.5, seed=666, ignore_eos=True))
    core.add_request("ok", PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    outs = drain(core)
    bad = [o for o in outs if o.request_id == "bad"]
    assert bad[-1].finished and "poisoned row" in (bad[-1].error or "")
    assert {c.index for c in bad[-1].outputs} == {0, 1, 2} and all(c.finished for c in bad[-1].outputs)
    assert sum(len(o.token_ids) for o in outs if o.request_id == "ok") == 4
    assert_idle(core)


def test_async_engine_streams_n_completions(tiny_llama: Path) -> None:
    async def main() -> tuple[dict[int, str], list[str]]:
        async with AsyncEngine.from_pretrained(tiny_llama, EngineConfig(device="cpu")) as engine:
            sp = SamplingParams(n=2, max_tokens=5, temperature=0, ignore_eos=True)
            got: dict[int, str] = {}
            async for out in engine.generate("The sea", sp):
                for c in out.outputs:
                    got[c.index] = got.get(c.index, "") + c.delta
            single = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
            alone = "".join([o.delta async for o in engine.generate("The sea", single)])
            with pytest.raises(InvalidSamplingParamsError):
                engine.generate("x", SamplingParams(n=0))
            return got, [alone]

    got, (alone,) = anyio.run(main)
    assert got == {0: alone, 1: alone} and alone


def test_merge_outputs_keeps_completions_apart() -> None:
    m = RequestMetrics(0.0)
    first = RequestOutput.of("r", (CompletionOutput(0, "", (1,), delta="a"), CompletionOutput(2, "", (5,), delta="x")), False, m)
    then = RequestOutput.of("r", (CompletionOutput(0, "ab", (2,), "length", delta="b"),), True, m)
    merged = merge_outputs(first, then, cumulative=False)
    assert merged.finished and [c.index for c in merged.outputs] == [0, 2]
    assert merged.outputs[0].token_ids == (1, 2) and merged.outputs[0].delta == "ab" and merged.delta == "ab"
    assert merged.outputs[1].token_ids == (5,)
    assert merge_outputs(first, then, cumulative=True).outputs[0] is then.outputs[0]


@pytest.mark.parametrize("bad", [0, -1, 129, 1.0, True, "2"])
def test_bad_n_is_a_typed_error(bad: Any) -> None:
    with pytest.raises(InvalidSamplingParamsError, match="n must be"):
        SamplingParams(n=bad)
    assert SamplingParams(n=128).n == 128
