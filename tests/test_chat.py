"""`AsyncEngine.chat`: the tokenizer's chat template, an override, and typed refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from chameleon import AsyncEngine, EngineConfig, SamplingParams
from chameleon.chat import render_chat
from chameleon.errors import ChatTemplateError, InvalidRequestError

MESSAGES = [{"role": "user", "content": "Hello!"}]


def test_render_uses_template_and_generation_prompt(tokenizer: Any) -> None:
    text = render_chat(tokenizer, MESSAGES)
    assert text == tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.rstrip().endswith("assistant")
    assert render_chat(tokenizer, MESSAGES, "{% for m in messages %}[{{ m.content }}]{% endfor %}") == "[Hello!]"


def test_refusals_are_typed(tokenizer: Any) -> None:
    assert issubclass(ChatTemplateError, InvalidRequestError)
    with pytest.raises(ChatTemplateError, match="no tokenizer"):
        render_chat(None, MESSAGES)
    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        with pytest.raises(ChatTemplateError, match="no chat template"):
            render_chat(tokenizer, MESSAGES)
    finally:
        tokenizer.chat_template = saved
    for bad in ([], "hi", [{"content": "no role"}]):
        with pytest.raises(ChatTemplateError):
            render_chat(tokenizer, bad)  # type: ignore[arg-type]
    with pytest.raises(ChatTemplateError, match="failed"):
        render_chat(tokenizer, MESSAGES, "{{ raise_exception('nope') }}")


def test_engine_chat_equals_generate_on_rendered_prompt(tiny_llama: Path) -> None:
    async def main() -> tuple[str, str]:
        sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        async with AsyncEngine.from_pretrained(tiny_llama, EngineConfig(device="cpu")) as engine:
            chat = "".join([o.delta async for o in engine.chat(MESSAGES, sp)])
            prompt = render_chat(engine.tokenizer, MESSAGES)
            plain = "".join([o.delta async for o in engine.generate(prompt, sp)])
            return chat, plain

    chat, plain = anyio.run(main)
    assert chat == plain and chat
