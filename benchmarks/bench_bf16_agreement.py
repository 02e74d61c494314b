"""bf16 greedy agreement with transformers' own bf16 `generate` (sdpa, one request at a time).

    HF_HUB_OFFLINE=1 python benchmarks/bench_bf16_agreement.py [--baseline DIR]   # ~2 min

SmolLM2-135M, 32 prompts x 32 new tokens (bench_peers' prompts), EOS ignored on both sides. Any
change in a bf16 operation order moves greedy tokens after near-ties, so "identical" is not a bar
here; this says how close we stay to the reference, and (`--baseline`, a checkout of an earlier
chameleon) whether a change moved us closer or further. Prints: outputs identical, the mean share
of tokens before the first divergence, the share of positions agreeing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import bench_roofline as br
import torch
from _machine import machine_line
from _peer_assets import offline_requests
from bench_kv import agreement


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chameleon.assets import smollm2_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, help="a checkout of an earlier chameleon, measured beside ours")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    br.CLOCK = time.perf_counter
    model = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(model)
    reqs = offline_requests(tok, args.requests, args.max_tokens, [None])
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ref = []
    with torch.inference_mode():
        for r in reqs:
            out = hf.generate(torch.tensor([r["prompt"]]), max_new_tokens=r["max_tokens"],
                              min_new_tokens=r["max_tokens"], do_sample=False)
            ref.append(out[0, len(r["prompt"]) :].tolist())
    print(f"machine: {machine_line()}")
    for label, src in (("ours", None), ("baseline", args.baseline)):
        if label == "baseline" and src is None:
            continue
        _, got = br.timed_generate(br.build_engine(model, {}, "bfloat16", src), reqs)
        same, prefix, tokens = agreement(ref, got)
        print(f"{label}: {same}/{len(reqs)} identical, mean share before the first divergence {prefix:.3f},"
              f" positions agreeing {tokens:.3f}")


if __name__ == "__main__":
    main()
