"""Stream one answer from a local model (default: the bundled SmolLM2-135M-Instruct).

    python examples/stream.py ["your question"] [--model DIR]
"""

from __future__ import annotations

import argparse

import anyio

from chameleon import AsyncEngine, EngineConfig, SamplingParams
from chameleon.assets import smollm2_dir


async def main(question: str, model: str | None) -> None:
    async with AsyncEngine.from_pretrained(model or smollm2_dir(), EngineConfig()) as engine:
        prompt = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        async for out in engine.generate(prompt, SamplingParams(max_tokens=96, temperature=0.7, top_p=0.9, seed=0)):
            print(out.delta, end="", flush=True)
            if out.finished:
                m = out.metrics
                print(f"\n[{out.finish_reason}; TTFT {(m.first_token_time - m.arrival_time) * 1000:.0f} ms]")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("question", nargs="?", default="Why is the sky blue?")
    parser.add_argument("--model")
    args = parser.parse_args()
    anyio.run(main, args.question, args.model)
