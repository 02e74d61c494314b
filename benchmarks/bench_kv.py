"""KV quantization quality on SmolLM2-135M: greedy agreement and perplexity vs unquantized KV.

    python benchmarks/bench_kv.py [--model DIR] [--max-tokens 48] [--kv int8 fp8_e4m3]

Greedy agreement: the same prompts (benchmarks/_peer_assets.PROMPT_TEXTS) through the engine
with `kv_cache_dtype=auto` and with each quantized dtype, fp32 model; reports the share of
requests whose whole output is identical and the mean share of tokens before the first
divergence. Perplexity: a fixed text fed in 16-token chunks through the paged model (each chunk
attends to the cached, i.e. quantized, KV of the previous ones), next-token NLL on every token.
Prefix-caching TTFT/throughput and the in-flight effect of int8 are not measured here yet.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _machine import machine_line
from _peer_assets import PROMPT_TEXTS

from chameleon import EngineConfig, SamplingParams
from chameleon.engine.core import EngineCore
from chameleon.engine.factory import build_core
from chameleon.model.attention import build_attention_metadata

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a screw press adapted from wine making. "
    "Before that, books were copied by hand, a slow and expensive process that kept literacy rare. "
    "Within fifty years printing shops had spread to more than two hundred cities across Europe, "
    "and millions of volumes had been produced. Cheaper books changed education, religion and "
    "science: ideas could be shared quickly, checked by many readers and improved in new editions. "
    "Historians often describe the press as one of the inventions that made the modern world, "
    "because it turned knowledge from a scarce possession into a common resource."
)


def greedy(core: EngineCore, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(str(i), p, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while core.has_unfinished_requests():
        for o in core.step():
            out[o.request_id].extend(o.token_ids)
    return [out[str(i)] for i in range(len(prompts))]


@torch.inference_mode()
def perplexity(core: EngineCore, ids: list[int], chunk: int = 16) -> float:
    ex: object = core.executor
    model, bs = ex.model, ex.block_size  # type: ignore[attr-defined]
    table = list(range(-(-len(ids) // bs)))
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start : min(start + chunk, len(ids) - 1)]
        n = len(piece)
        meta = build_attention_metadata([n], [start + n], [table], bs, torch.device("cpu"))
        h = model(torch.tensor(piece), torch.arange(start, start + n), meta, ex.kv_caches,  # type: ignore[attr-defined]
                  torch.arange(n), None)
        logp = model.logits(h).float().log_softmax(-1)
        target = torch.tensor(ids[start + 1 : start + n + 1])
        nll -= logp[torch.arange(n), target].sum().item()
        count += n
    return math.exp(nll / count)


def main() -> None:
    from chameleon.assets import smollm2_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--kv", nargs="+", default=["int8", "fp8_e4m3"])
    args = ap.parse_args()
    path = args.model or smollm2_dir()
    print(machine_line())
    base = build_core(path, EngineConfig(dtype="float32"))
    tok = base.tokenizer
    prompts = [tok(t)["input_ids"] for t in PROMPT_TEXTS]
    ids = tok(TEXT)["input_ids"]
    ref = greedy(base, prompts, args.max_tokens)
    print(f"{'kv dtype':10} {'blocks':>7} {'identical':>10} {'prefix agree':>13} {'tokens agree':>13} {'ppl':>8}")
    print(f"{'auto fp32':10} {base.blocks.num_blocks:7d} {'-':>10} {'-':>13} {'-':>13} {perplexity(base, ids):8.3f}")
    for kv in args.kv:
        core = build_core(path, EngineConfig(dtype="float32", kv_cache_dtype=kv))
        got = greedy(core, prompts, args.max_tokens)
        same = sum(a == b for a, b in zip(ref, got, strict=True))
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) / len(a) for a, b in zip(ref, got)]
        tokens = sum(x == y for a, b in zip(ref, got) for x, y in zip(a, b)) / sum(len(a) for a in ref)
        print(f"{kv:10} {core.blocks.num_blocks:7d} {same:4d}/{len(ref):<5d} {sum(prefix) / len(prefix):13.3f} "
              f"{tokens:13.3f} {perplexity(core, ids):8.3f}")


if __name__ == "__main__":
    main()
