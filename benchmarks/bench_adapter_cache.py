"""Adapter hit rate under `chameleon`, `lru` and `slora`, measured on the same requests in one run.

    python benchmarks/bench_adapter_cache.py [--adapters 32] [--alpha 0.3] [--requests 300]

The real engine (tiny random Llama, real PEFT-format adapters of ranks 8-64 on q/v) serves an
S-LoRA-style workload: power-law adapter popularity (S-LoRA's law: smaller alpha = more skewed),
Poisson arrivals. Arrivals are replayed against the iteration count (each step stands for
`--step-ms` of virtual time), so every policy sees exactly the same request sequence and
concurrency; only the cache policy differs. The memory budget fits KV plus about a quarter of the
adapters, so idle memory is worth fighting over.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _machine import machine_line  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from chameleon import EngineConfig, SamplingParams  # noqa: E402
from chameleon.clock import ManualClock  # noqa: E402
from chameleon.engine.factory import build_core  # noqa: E402
from chameleon.harness.workload import Workload, slora_workload  # noqa: E402


def tiny_model(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def peft_adapter(path: Path, rank: int, seed: int) -> Path:
    """A PEFT-format LoRA adapter on q_proj/v_proj of the tiny model, written directly."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for module, out in (("q_proj", 64), ("v_proj", 32)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, 64, generator=g) * 0.05
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.05
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj", "v_proj"], "bias": "none"}))
    return path


def run(policy: str, model: Path, adapters: dict[str, Path], work: Workload, step_s: float) -> dict[str, float]:
    row_kib, block_kib = 2 * (64 + 64 + 64 + 32) * 4 / 1024, 16 * 512 / 1024  # rank row, KV block
    budget = int((256 * block_kib + 0.25 * sum(a.rank for a in work.adapters) * row_kib) * 1024)
    clock = ManualClock()
    core = build_core(model, EngineConfig(dtype="float32", device_memory_bytes=budget, activation_reserve_bytes=1,
                                          max_loras=64, max_lora_rank=64, adapter_cache=policy, max_num_seqs=16),
                      clock=clock)
    for name, path in adapters.items():
        core.add_adapter(name, str(path))
    pending = list(work.requests)
    while pending or core.has_unfinished_requests():
        while pending and pending[0].arrival_s <= clock.now():
            r = pending.pop(0)
            core.add_request(r.request_id, [1] * r.prompt_len, SamplingParams(max_tokens=r.output_len, ignore_eos=True),
                             adapter=r.adapter)
        if not core.has_unfinished_requests():
            clock.t = pending[0].arrival_s
            continue
        core.step()
        clock.advance(step_s)
    s = core.stats()
    return {"hit_rate": s.adapters.hit_rate or 0.0, "hits": s.adapters.hits, "misses": s.adapters.misses,
            "loads": s.adapters.loads, "prefetches": s.adapters.prefetches, "evictions": s.adapters.evictions,
            "mib_loaded": s.adapters.bytes_loaded / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--rate", type=float, default=8.0)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--step-ms", type=float, default=25.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = slora_workload(num_adapters=args.adapters, alpha=args.alpha, rate=args.rate, cv=1.0,
                          duration_s=args.requests / args.rate, input_range=(8, 128), output_range=(8, 64),
                          ranks=(8, 16, 32, 64), seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "model")
        adapters = {a.name: peft_adapter(Path(tmp) / a.name, a.rank, i) for i, a in enumerate(work.adapters)}
        results = {p: run(p, model, adapters, work, args.step_ms / 1000) for p in ("chameleon", "lru", "slora")}
    print(f"machine: {machine_line()}")
    print(f"workload: {len(work.requests)} requests, {args.adapters} adapters (ranks 8-64), S-LoRA power law "
          f"alpha={args.alpha}, Poisson {args.rate} req/s, {args.step_ms} ms per iteration (virtual)")
    print(f"{'policy':<10} {'hit rate':>8} {'hits':>6} {'misses':>7} {'loads':>6} {'prefetch':>8} {'evict':>6} {'MiB loaded':>10}")
    for p, r in results.items():
        print(f"{p:<10} {r['hit_rate']:>8.1%} {r['hits']:>6} {r['misses']:>7} {r['loads']:>6} {r['prefetches']:>8} "
              f"{r['evictions']:>6} {r['mib_loaded']:>10.1f}")
    base = results["slora"]["hit_rate"]
    print(f"chameleon vs slora: {results['chameleon']['hit_rate'] - base:+.1%} hit rate; "
          f"vs lru: {results['chameleon']['hit_rate'] - results['lru']['hit_rate']:+.1%}")


if __name__ == "__main__":
    main()
