"""The OpenAI server for real: uvicorn on 127.0.0.1, driven by the official `openai` client.

One module-scoped server over the tiny Llama with PEFT adapters: adapter `a8` registered at
startup, `b16` loadable from the adapter root. Checks streaming and non-streaming chat and
completions against the library's own greedy output, the model list, adapter loading through the
endpoints (and its path guard), OpenAI-shaped errors (404/400/401/429), that a client leaving
mid-stream frees its KV blocks, and that /metrics parses with per-adapter series.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from chameleon import AsyncEngine, EngineConfig, SamplingParams
from chameleon.serve import build_app

KEY = "test-key"
BASE = "tiny-base"
MESSAGES = [{"role": "user", "content": "Say something about the sea."}]
CONFIG = EngineConfig(device="cpu", max_model_len=4096, num_kv_blocks=1024)
LONG = 3500  # tokens a held stream asks for: seconds of work, so it is still running when checked
MAX_QUEUED = 3


class ServerThread:
    """A real uvicorn server in a daemon thread; `stop()` makes it exit by itself."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """The tiny Llama with a 4096-token context, so a stream can outlast the checks made on it."""
    from tests.conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("long-llama"), "llama", tokenizer, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, long_llama: Path) -> dict[str, Path]:
    from tests.conftest import ADAPTER_CONFIGS, save_peft_adapters

    configs = {k: ADAPTER_CONFIGS[k] for k in ("a8", "b16")}
    return save_peft_adapters(long_llama, tmp_path_factory.mktemp("server-adapters"), configs)


@pytest.fixture(scope="module")
def served(long_llama: Path, adapters: dict[str, Path]) -> Iterator[tuple[str, AsyncEngine]]:
    engine = AsyncEngine.from_pretrained(long_llama, CONFIG)
    app = build_app(
        engine,
        served_model_name=BASE,
        api_key=KEY,
        adapter_roots=[adapters["b16"].parent],
        max_queued_requests=MAX_QUEUED,
        adapters={"a8": adapters["a8"]},
    )
    thread = ServerThread(app)
    url = thread.start()
    try:
        yield url, engine
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def client(served: tuple[str, AsyncEngine]) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def http(served: tuple[str, AsyncEngine], key: str | None = KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=served[0], headers=headers, timeout=60)


@pytest.fixture(scope="module")
def library_text(long_llama: Path, adapters: dict[str, Path]) -> str:
    """The library's greedy answer through `AsyncEngine.chat` with adapter a8."""

    async def main() -> str:
        engine = AsyncEngine.from_pretrained(long_llama, CONFIG)
        async with engine:
            await engine.add_adapter("a8", adapters["a8"])
            sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
            return "".join([o.delta async for o in engine.chat(MESSAGES, sp, adapter="a8")])

    return anyio.run(main)


def test_streaming_chat_with_adapter_matches_library(client: openai.OpenAI, library_text: str) -> None:
    stream = client.chat.completions.create(
        model="a8",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == library_text and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    full = client.chat.completions.create(
        model="a8", messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert full.choices[0].message.content == library_text
    assert full.usage is not None and full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0


def test_completions_and_n_choices(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=BASE, prompt="The sea is", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 5
    many = client.completions.create(
        model=BASE, prompt="The sea is", max_tokens=6, temperature=1.0, n=3, seed=7, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in many.choices) == [0, 1, 2] and many.usage.completion_tokens == 18
    again = client.completions.create(
        model=BASE, prompt="The sea is", max_tokens=6, temperature=1.0, n=3, seed=7, extra_body={"ignore_eos": True}
    )
    assert [c.text for c in again.choices] == [c.text for c in many.choices]  # seed + i per choice
    streamed = client.completions.create(
        model=BASE, prompt="The sea is", max_tokens=5, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_streaming_chat_n_choices_interleave(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="a8", messages=MESSAGES, max_tokens=5, temperature=0, n=2, stream=True, extra_body={"ignore_eos": True}
    )
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and texts[0] == texts[1] and texts[0]  # greedy: the same answer twice


def test_models_and_adapter_endpoints(
    served: tuple[str, AsyncEngine], client: openai.OpenAI, adapters: dict[str, Path], tmp_path: Path
) -> None:
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {BASE, "a8"} and ids["a8"].model_extra["parent"] == BASE
    with http(served) as h:
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "b16", "lora_path": str(adapters["b16"])})
        assert r.status_code == 200, r.text
        assert {m.id for m in client.models.list().data} == {BASE, "a8", "b16"}
        out = client.chat.completions.create(model="b16", messages=MESSAGES, max_tokens=3, temperature=0)
        assert out.model == "b16" and out.choices[0].message.content is not None
        outside = tmp_path / "evil"
        outside.mkdir()
        sneaky = str(adapters["b16"].parent / ".." / outside.name)
        for path in (str(outside), sneaky, "/etc"):
            r = h.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
            assert r.status_code == 403 and r.json()["error"]["code"] == "adapter_path_forbidden"
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "no-such-adapter"})
        assert r.status_code == 400
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": "b16"}).status_code == 200
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": "b16"}).status_code == 404
    assert {m.id for m in client.models.list().data} == {BASE, "a8"}


def test_error_shapes(served: tuple[str, AsyncEngine], client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e404:
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    assert e404.value.status_code == 404 and e404.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e400:
        client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2, temperature=-1)
    assert set(e400.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt=" x" * 5000, max_tokens=2)  # PromptTooLongError
    with pytest.raises(openai.AuthenticationError) as e401:
        openai.OpenAI(base_url=served[0] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e401.value.status_code == 401
    with http(served, key=None) as h:
        assert h.get("/v1/models").status_code == 401
        assert h.get("/health").status_code == 200


def _open_streams(h: httpx.Client, n: int) -> list[Any]:
    body = {
        "model": "a8",
        "messages": MESSAGES,
        "max_tokens": LONG,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    held = []
    for _ in range(n):
        cm = h.stream("POST", "/v1/chat/completions", json=body)
        resp = cm.__enter__()
        assert resp.status_code == 200
        lines = resp.iter_lines()
        next(
            line for line in lines if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line
        )
        held.append((cm, lines))  # keep the line iterator: dropping it closes the response
    return held


def test_overload_429_and_disconnect_frees_kv(served: tuple[str, AsyncEngine], client: openai.OpenAI) -> None:
    engine = served[1]
    with http(served) as h:
        held = _open_streams(h, MAX_QUEUED)
        assert engine.stats()["requests"]["running"] == MAX_QUEUED and engine.stats()["kv"]["blocks_in_use"] > 0
        with pytest.raises(openai.RateLimitError) as e429:
            client.completions.create(model=BASE, prompt="hi", max_tokens=2)
        assert e429.value.status_code == 429
        for cm, _lines in held:  # the clients go away mid-stream
            cm.__exit__(None, None, None)
    deadline = time.monotonic() + 20
    while engine.stats()["kv"]["blocks_in_use"] or engine.stats()["requests"]["running"]:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.05)
    client.completions.create(model=BASE, prompt="hi", max_tokens=2)  # capacity is back


def test_metrics_parse_with_per_adapter_series(served: tuple[str, AsyncEngine], client: openai.OpenAI) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model="a8", messages=MESSAGES, max_tokens=3, temperature=0)
    with http(served, key=None) as h:
        text = h.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "request_success",
        "prompt_tokens",
        "generation_tokens",
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "adapter_hits",
        "adapter_misses",
        "adapter_loads",
        "adapter_evictions",
        "lora_requests",
        "lora_requests_info",
    ):
        assert f"chameleon:{name}" in families, name
    lora = [s for s in families["chameleon:lora_requests"].samples if s.labels["lora_name"] == "a8"]
    assert {s.labels["state"] for s in lora} == {"running", "waiting"}
    ttft = [s for s in families["chameleon:time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft and ttft[0].value > 0
    gen = [s for s in families["chameleon:generation_tokens"].samples if s.name.endswith("_total")]
    assert gen and gen[0].value >= 3


# --- logprobs and n (the library's) ---------------------------------------------------------------


def _library_logprobs(long_llama: Path, prompt: str, k: int) -> list[dict[int, Any]]:
    from chameleon.engine.factory import build_core

    core = build_core(long_llama, CONFIG)
    ids = list(core.tokenizer(prompt).input_ids)
    core.add_request("r", ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=k))
    entries: list[dict[int, Any]] = []
    while core.has_unfinished_requests():
        for out in core.step():
            entries += out.logprobs or ()
    return entries


def test_completions_logprobs_legacy_shape(client: openai.OpenAI, long_llama: Path) -> None:
    kw: dict[str, Any] = {"model": BASE, "prompt": "The sea is", "max_tokens": 4, "temperature": 0, "logprobs": 3,
        "extra_body": {"ignore_eos": True}}  # fmt: skip
    out = client.completions.create(**kw)
    lp = out.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    library = _library_logprobs(long_llama, "The sea is", 3)
    assert lp.token_logprobs == pytest.approx([next(iter(e.values())).logprob for e in library], abs=1e-5)
    assert lp.tokens == [next(iter(e.values())).decoded_token for e in library]
    for top, value in zip(lp.top_logprobs, lp.token_logprobs, strict=True):
        assert 1 <= len(top) <= 4 and max(top.values()) == pytest.approx(value)  # greedy: the best one
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    chunks = [c for c in client.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs]
    streamed = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert streamed == lp.tokens and offsets == lp.text_offset  # offsets continue across chunks
    plain = client.completions.create(model=BASE, prompt="The sea is", max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_shape_streaming_and_not(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "a8", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True,
        "top_logprobs": 2, "extra_body": {"ignore_eos": True}}  # fmt: skip
    full = client.chat.completions.create(**kw)
    content = full.choices[0].logprobs.content
    assert len(content) == 6 == full.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert item.bytes is not None and item.logprob <= 0
    plain = [i for i in content if not i.token.startswith("<|")]
    if len(plain) == len(content):  # no special tokens: the bytes spell the text exactly
        assert bytes(b for i in content for b in i.bytes).decode() == full.choices[0].message.content
    stream = list(client.chat.completions.create(**kw, stream=True))
    streamed = [i for c in stream if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert [(i.token, i.logprob) for i in streamed] == [(i.token, i.logprob) for i in content]
    bare = client.chat.completions.create(model="a8", messages=MESSAGES, max_tokens=2, logprobs=True)
    assert all(i.top_logprobs == [] for i in bare.choices[0].logprobs.content)


def test_logprobs_errors_are_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2, top_logprobs=2)
    for bad in (21, -1):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2, logprobs=True, top_logprobs=bad)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=BASE, prompt="hi", max_tokens=2, logprobs=bad)


def test_n_choice_i_is_the_library_seed_plus_i(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": BASE, "prompt": "The sea is", "max_tokens": 6, "temperature": 1.0,
        "extra_body": {"ignore_eos": True}}  # fmt: skip
    many = client.completions.create(**kw, n=3, seed=11, logprobs=1)
    for c in many.choices:
        alone = client.completions.create(**kw, seed=11 + c.index)
        assert c.text == alone.choices[0].text
        assert c.logprobs is not None and len(c.logprobs.tokens) == 6
