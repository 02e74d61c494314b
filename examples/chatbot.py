"""A small terminal chatbot with history, on `AsyncEngine.chat` (optionally through an adapter).

    python examples/chatbot.py [--model DIR] [--adapter NAME=PATH]

Type a message and press Enter; `/reset` forgets the conversation, `/quit` (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse

import anyio

from chameleon import AsyncEngine, EngineConfig, SamplingParams
from chameleon.assets import smollm2_dir

SAMPLING = SamplingParams(max_tokens=160, temperature=0.7, top_p=0.9)


async def reply(engine: AsyncEngine, history: list[dict[str, str]], adapter: str | None) -> str:
    """Stream the assistant's answer to the terminal and return it."""
    text = ""
    async for out in engine.chat(history, SAMPLING, adapter=adapter):
        print(out.delta, end="", flush=True)
        text += out.delta
    print()
    return text.strip()


async def main(model: str | None, adapter: str | None) -> None:
    name, _, path = (adapter or "").partition("=")
    async with AsyncEngine.from_pretrained(model or smollm2_dir(), EngineConfig()) as engine:
        if adapter:
            await engine.add_adapter(name, path)
        history: list[dict[str, str]] = []
        while True:
            try:
                line = (await anyio.to_thread.run_sync(input, "you> ")).strip()
            except EOFError:
                return
            if line == "/quit":
                return
            if line == "/reset":
                history.clear()
                continue
            if line:
                history.append({"role": "user", "content": line})
                print("bot> ", end="", flush=True)
                history.append({"role": "assistant", "content": await reply(engine, history, name or None)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a local Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", help="NAME=PATH of a PEFT LoRA adapter to talk through")
    args = parser.parse_args()
    anyio.run(main, args.model, args.adapter)
