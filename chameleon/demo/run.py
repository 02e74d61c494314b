"""`chameleon demo`: one question through the base model and every demo adapter, in one batch.

Trains (or loads from cache) the three style adapters, registers them, starts all requests at
once so they share every iteration, and prints each answer, a per-request table (TTFT, tokens,
decode tokens/s) and the adapter cache's figures.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs

from chameleon.demo.train import TrainSettings, system_message, train_demo_adapters

DEFAULT_QUESTION = "What is the largest ocean on Earth?"


@attrs.define
class Answer:
    """One request's text and timings (wall clock, seconds)."""

    name: str
    text: str = ""
    tokens: int = 0
    ttft: float | None = None
    total: float = 0.0

    @property
    def decode_rate(self) -> float | None:
        if self.ttft is None or self.tokens < 2 or self.total <= self.ttft:
            return None
        return (self.tokens - 1) / (self.total - self.ttft)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if c[:1].isdigit() or c == "-" else c.ljust(w) for c, w in zip(cells, widths)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


async def _ask(engine: object, question: str, adapter: str | None, max_tokens: int, answer: Answer) -> None:
    from chameleon import AsyncEngine, SamplingParams

    assert isinstance(engine, AsyncEngine)
    start = time.perf_counter()
    sp = SamplingParams(max_tokens=max_tokens, temperature=0)
    async for out in engine.chat([system_message(), {"role": "user", "content": question}], sp, adapter=adapter):
        if answer.ttft is None:
            answer.ttft = time.perf_counter() - start
        answer.text += out.delta
        answer.tokens += len(out.token_ids)
    answer.total = time.perf_counter() - start


async def run_adapter_demo(question: str, max_tokens: int, steps: int, model: str | None = None) -> None:
    """Train or load the adapters, then answer `question` with the base model and each adapter."""
    from chameleon import AsyncEngine, EngineConfig
    from chameleon.assets import smollm2_dir

    base = Path(model) if model else smollm2_dir()
    t0 = time.perf_counter()
    paths = await anyio.to_thread.run_sync(lambda: train_demo_adapters(base, TrainSettings(steps=steps)))
    print(f"adapters ready in {time.perf_counter() - t0:.1f} s: {', '.join(paths)}", flush=True)
    engine = AsyncEngine.from_pretrained(base, EngineConfig())
    answers = [Answer("base")] + [Answer(name) for name in paths]
    async with engine:
        for name, path in paths.items():
            await engine.add_adapter(name, path)
        print(f"question: {question}\n", flush=True)
        async with anyio.create_task_group() as tg:
            for a in answers:
                tg.start_soon(_ask, engine, question, None if a.name == "base" else a.name, max_tokens, a)
        stats = engine.stats()
    _report(answers, stats)


def _report(answers: Sequence[Answer], stats: dict[str, object]) -> None:
    for a in answers:
        print(f"[{a.name}] {a.text.strip()}\n")
    rows = [
        [a.name, f"{(a.ttft or 0) * 1000:.0f}", str(a.tokens), f"{a.decode_rate:.1f}" if a.decode_rate else "-"]
        for a in answers
    ]
    print(format_table(["request", "TTFT ms", "tokens", "tok/s"], rows))
    keys = ["hits", "misses", "loads", "resident"]
    print("\nadapter cache")
    cache: dict[str, Any] = stats["adapters"]  # type: ignore[assignment]
    print(format_table(["hits", "misses", "loads", "resident"], [[str(cache[k]) for k in keys]]))
