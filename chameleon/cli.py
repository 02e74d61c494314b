"""`chameleon` / `python -m chameleon`: the command line. Subcommands: demo, bench, calibrate, serve."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import anyio

DEMO_QUESTIONS = (
    "What is the capital of France?",
    "Give me three tips for writing clean Python code.",
    "Explain what a LoRA adapter is in two sentences.",
    "Write a haiku about the sea.",
)


async def run_demo(model: str | None, max_tokens: int, questions: Sequence[str]) -> None:
    from chameleon import AsyncEngine, EngineConfig, SamplingParams
    from chameleon.assets import smollm2_dir
    from chameleon.errors import ModelLoadError

    path = model or str(smollm2_dir())
    print(f"loading {path} ...", flush=True)
    engine = AsyncEngine.from_pretrained(path, EngineConfig())
    tok = engine.tokenizer
    if tok is None:
        raise ModelLoadError(f"{path}: the demo needs a tokenizer with a chat template")
    results: dict[int, str] = {}

    async def ask(i: int, question: str) -> None:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        start = time.perf_counter()
        text, first, n = "", None, 0
        async for out in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0)):
            if first is None:
                first = time.perf_counter() - start
            text += out.delta
            n += len(out.token_ids)
            if i == 0:  # stream the first answer live; the rest print when done
                print(out.delta, end="", flush=True)
        total = time.perf_counter() - start
        decode_rate = (n - 1) / (total - first) if first is not None and n > 1 and total > first else float("nan")
        results[i] = f"TTFT {(first or 0.0) * 1000:.0f} ms, {n} tokens, {decode_rate:.1f} tok/s after the first"
        if i:
            print(f"\n--- [{i}] {question}\n{text.strip()}", flush=True)

    async with engine:
        print(f"--- [0] {questions[0]}", flush=True)
        async with anyio.create_task_group() as tg:
            for i, q in enumerate(questions):
                tg.start_soon(ask, i, q)
    print("\n\nper request:")
    for i in sorted(results):
        print(f"  [{i}] {results[i]}")
    print(f"engine: {engine.stats()}")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="chameleon", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="stream several chat answers concurrently from a small real model")
    demo.add_argument("--model", help="a local Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    demo.add_argument("--max-tokens", type=int, default=64)
    demo.add_argument("questions", nargs="*", help="questions to ask (default: built-in ones)")
    demo.add_argument("--base-only", action="store_true", help="several questions to the base model, no adapters")
    demo.add_argument("--steps", type=int, default=12, help="training steps per demo adapter (cached)")
    from chameleon.harness.bench import add_bench_arguments, run_bench
    from chameleon.harness.calibrate import add_calibrate_arguments, run_calibrate

    add_bench_arguments(
        sub.add_parser("bench", help="serve a workload under several policies and rates (simulated GPU or real)")
    )
    add_calibrate_arguments(
        sub.add_parser("calibrate", help="profile the real executor here and write a cost profile for the simulator")
    )
    from chameleon.serve.main import add_serve_arguments, run_serve

    add_serve_arguments(sub.add_parser("serve", help="serve the OpenAI API (completions, chat, LoRA adapters)"))
    args = parser.parse_args(argv)
    from chameleon.errors import ChameleonError

    try:
        if args.command == "demo" and not args.base_only:
            from chameleon.demo.run import DEFAULT_QUESTION, run_adapter_demo

            question = " ".join(args.questions) or DEFAULT_QUESTION
            anyio.run(run_adapter_demo, question, args.max_tokens, args.steps, args.model)
        elif args.command == "demo":
            anyio.run(run_demo, args.model, args.max_tokens, args.questions or DEMO_QUESTIONS)
        elif args.command == "bench":
            return run_bench(args)
        elif args.command == "calibrate":
            return run_calibrate(args)
        elif args.command == "serve":
            return run_serve(args)
    except ChameleonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
