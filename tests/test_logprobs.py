"""Logprobs of sampled and prompt tokens: parity with transformers' log-softmax, vLLM's shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from chameleon import EngineConfig, Logprob, SamplingParams
from chameleon.engine.core import EngineCore
from chameleon.engine.factory import build_core
from chameleon.engine.token_text import TokenText
from chameleon.errors import InvalidSamplingParamsError
from chameleon.executor.base import TokenLogprobs
from chameleon.executor.logprobs import head_rows, token_logprobs
from chameleon.outputs import RequestOutput

PROMPT = [5, 17, 99, 3, 250, 42, 8, 61, 7, 300, 11]


def drain(core: EngineCore) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    while core.has_unfinished_requests():
        for out in core.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def hf_logprobs(path: Path, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every position of `ids` ([len, vocab], float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), -1)


def check_position(entry: dict[int, Logprob], chosen: int, ref: torch.Tensor, k: int) -> None:
    """One position against the reference row: the chosen token first, its rank, the top k."""
    assert next(iter(entry)) == chosen
    own = float(ref[chosen])
    assert entry[chosen].logprob == pytest.approx(own, abs=1e-4)
    assert entry[chosen].rank == int((ref >= own - 1e-6).sum())
    top = ref.topk(k)
    others = {t: lp for t, lp in entry.items() if t != chosen or lp.rank <= k}
    ranked = sorted((lp.rank, lp.logprob) for lp in others.values() if lp.rank is not None and lp.rank <= k)
    assert [r for r, _ in ranked] == list(range(1, k + 1))
    assert [v for _, v in ranked] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("chunk", [None, 4])
def test_logprobs_equal_transformers_log_softmax(tiny_llama: Path, temperature: float, chunk: int | None) -> None:
    """Raw logprobs (before temperature) of sampled and prompt tokens equal transformers' own,
    also when the prefill is chunked (prompt logprobs then arrive over several steps)."""
    config = EngineConfig(dtype="float32", **({"max_num_batched_tokens": chunk} if chunk else {}))
    core = build_core(tiny_llama, config)
    sp = SamplingParams(max_tokens=6, temperature=temperature, seed=3, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    core.add_request("r", PROMPT, sp)
    core.add_request("plain", PROMPT[:4], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    outs = drain(core)["r"]
    out_ids = [t for o in outs for t in o.token_ids]
    logprobs = [e for o in outs for e in (o.logprobs or ())]
    assert len(logprobs) == len(out_ids) == 6
    prompt = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    assert len(prompt) == 1 and outs[0].prompt_logprobs is not None  # once, on the first output
    ref = hf_logprobs(tiny_llama, PROMPT + out_ids)
    for j, (token, entry) in enumerate(zip(out_ids, logprobs, strict=True)):
        check_position(entry, token, ref[len(PROMPT) - 1 + j], 5)
    assert prompt[0][0] is None and len(prompt[0]) == len(PROMPT)
    for j in range(1, len(PROMPT)):
        entry = prompt[0][j]
        assert entry is not None
        check_position(entry, PROMPT[j], ref[j - 1], 3)
    if temperature == 0:  # greedy: the sampled token is the most likely one
        assert all(e[t].rank == 1 for t, e in zip(out_ids, logprobs, strict=True))


def test_rows_without_logprobs_get_none_and_the_same_tokens(tiny_llama: Path) -> None:
    def run(with_logprobs: bool) -> dict[str, list[int]]:
        core = build_core(tiny_llama, EngineConfig(dtype="float32"))
        for i, t in enumerate((0.0, 0.9)):
            core.add_request(f"x{i}", PROMPT[i:], SamplingParams(max_tokens=5, temperature=t, seed=i, ignore_eos=True))
        extra = {"logprobs": 2} if with_logprobs else {}
        core.add_request("lp", PROMPT[:5], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, **extra))
        outs = drain(core)
        for rid in ("x0", "x1"):
            assert all(o.logprobs is None and o.prompt_logprobs is None for o in outs[rid])
        assert all((o.logprobs is not None) == with_logprobs for o in outs["lp"])
        return {rid: [t for o in v for t in o.token_ids] for rid, v in outs.items()}

    assert run(True) == run(False)


def test_logprobs_follow_the_output_kind(tiny_llama: Path) -> None:
    core = build_core(tiny_llama, EngineConfig(dtype="float32"))
    for kind in ("delta", "cumulative", "final"):
        sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1, output_kind=kind)
        core.add_request(kind, PROMPT, sp)
    outs = drain(core)
    delta = [e for o in outs["delta"] for e in (o.logprobs or ())]
    assert [len(o.logprobs or ()) for o in outs["cumulative"]] == [1, 2, 3, 4]
    (final,) = outs["final"]
    assert final.logprobs == tuple(delta) == outs["cumulative"][-1].logprobs
    assert all(len(e) in (1, 2) for e in delta)  # the sampled token, plus the top-1 when it differs


def test_prompt_logprobs_skip_the_prefix_cache_but_feed_it(tiny_llama: Path) -> None:
    """A request asking for prompt logprobs computes every prompt position (no cached blocks),
    yet indexes its blocks so that a later request hits them."""
    core = build_core(tiny_llama, EngineConfig(dtype="float32", enable_prefix_caching=True, block_size=4))
    prompt = PROMPT * 2
    core.add_request("warm", prompt, SamplingParams(max_tokens=1, temperature=0))
    drain(core)
    core.add_request("asks", prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    (out,) = drain(core)["asks"]
    assert out.prompt_logprobs is not None and all(e is not None for e in out.prompt_logprobs[1:])
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:] if e is not None)  # k=0: the prompt token alone
    before = core.stats().prefix.hit_tokens
    core.add_request("after", prompt, SamplingParams(max_tokens=1, temperature=0))
    drain(core)
    assert core.stats().prefix.hit_tokens > before


def test_token_logprobs_and_head_rows() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    a, b = token_logprobs(logits, [2, 0], [2, 0])
    ref = torch.log_softmax(logits, -1)
    assert a.rank == 3 and a.logprob == pytest.approx(float(ref[0, 2]))  # two better tokens
    assert a.top_ids and set(a.top_ids) == {1, 3} and len(a.top_logprobs) == 2
    assert b.rank == 4 and b.top_ids == ()  # ties share the worse rank (vLLM counts >=)
    assert token_logprobs(logits, [], []) == []
    from chameleon.executor.base import PromptLogprobsAsk

    rows, at_sample, at_prompt = head_rows([4, 9], [(0, PromptLogprobsAsk(1, 1, [7, 8])), (5, PromptLogprobsAsk(1, 1, [3]))])
    assert rows == [0, 1, 4, 5, 9] and [rows[i] for i in at_sample] == [4, 9] and [rows[i] for i in at_prompt] == [0, 1, 5]


def test_token_text_bytes_are_exact_for_byte_level_bpe(tokenizer: Any) -> None:
    text = TokenText(tokenizer)
    ids = tokenizer("héllo 🌊").input_ids
    assert b"".join(text.bytes_of(i) for i in ids) == "héllo 🌊".encode()
    assert text.text_of(ids[0]) == tokenizer.decode([ids[0]])
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert text.bytes_of(special) == b"<|im_start|>"
    none = TokenText(None)
    assert none.text_of(3) is None and none.bytes_of(3) == b""
    entry = text.position(TokenLogprobs(ids[0], -0.5, 2, (ids[1], ids[0]), (-0.1, -0.5)))
    assert list(entry) == [ids[0], ids[1]] and entry[ids[1]].rank == 1 and entry[ids[0]].rank == 2


@pytest.mark.parametrize(
    "bad",
    [
        {"logprobs": -1},
        {"logprobs": 21},
        {"logprobs": True},
        {"logprobs": 2.0},
        {"prompt_logprobs": -1},
        {"prompt_logprobs": 21},
        {"prompt_logprobs": "3"},
    ],
)
def test_bad_logprobs_are_typed_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidSamplingParamsError, match="logprobs"):
        SamplingParams(**bad)


def test_logprob_limits_accepted() -> None:
    for k in (None, 0, 20):
        assert SamplingParams(logprobs=k, prompt_logprobs=k).logprobs == k
    assert SamplingParams(temperature=0).needs_logits is False
    assert SamplingParams(temperature=0, logprobs=0).needs_logits is True
    assert SamplingParams(temperature=0.5).needs_logits is True


def test_an_executor_without_logprobs_leaves_empty_entries() -> None:
    """The simulator computes no logprobs: entries stay aligned with the ids, and are empty."""
    from chameleon.sim.engine import build_sim_engine

    core, _clock = build_sim_engine("A40", "llama-7b", EngineConfig())
    core.add_request("s", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=1))
    outs = drain(core)["s"]
    assert [e for o in outs for e in (o.logprobs or ())] == [{}, {}, {}]
    assert all(o.prompt_logprobs is None for o in outs)  # never computed: never sent


def test_token_text_survives_a_tokenizer_that_refuses_an_id() -> None:
    class Refusing:
        all_special_ids = ()

        def decode(self, ids: list[int]) -> str:
            raise IndexError("no such id")

    text = TokenText(Refusing())
    assert text.text_of(7) == "<token 7>" and text.bytes_of(7) == b"<token 7>"


def test_openai_shapes_clamp_minus_infinity_and_skip_missing_entries(tokenizer: Any) -> None:
    from chameleon.serve.logprobs import FLOOR, chat_logprobs, completion_logprobs

    entry = {5: Logprob(float("-inf"), 9, "a"), 6: Logprob(-0.1, 1, "bc")}
    legacy = completion_logprobs([entry, {}], offset=3)
    assert legacy["token_logprobs"] == [FLOOR, None] and legacy["tokens"] == ["a", ""]
    assert legacy["top_logprobs"] == [{"a": FLOOR, "bc": -0.1}, None]
    assert legacy["text_offset"] == [3, 4] and legacy["next_offset"] == 4
    chat = chat_logprobs([entry, {}], 1, TokenText(tokenizer))
    (item,) = chat["content"]
    assert item["logprob"] == FLOOR and [t["token"] for t in item["top_logprobs"]] == ["bc"]
