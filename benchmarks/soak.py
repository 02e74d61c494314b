"""Soak: N requests on the tiny test model, 30% cancelled three ways, under asyncio and trio.

Cancellations (a third each): `break` out of `async for` after the first output, cancelling the
consuming task, `engine.abort(request_id)`. Requests mix the base model and two tiny adapters.
Prints, per backend: RSS every `--every` requests, and once idle the leaks that must be zero
(KV blocks in use, adapter references, open streams, unfinished requests).

    PYTHONPATH=. python benchmarks/soak.py --requests 10000 --backend both
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anyio
from _machine import machine_line

from chameleon import AsyncEngine, EngineConfig, SamplingParams


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def build_assets(root: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny random Llama with the SmolLM2 tokenizer, and two PEFT adapters (as tests/conftest.py)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from chameleon.assets import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    base = root / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    adapters = {}
    for i, (name, r) in enumerate((("a8", 8), ("b16", 16))):
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
        adapters[name] = root / name
        peft.save_pretrained(adapters[name])
    return base, adapters


async def one(engine: AsyncEngine, i: int, rng: random.Random, counts: dict[str, int]) -> None:
    prompt = [rng.randrange(1, 1000) for _ in range(rng.randint(1, 24))]
    sampling = SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.8]), ignore_eos=True)
    adapter = (None, "a8", "b16")[i % 3]
    how = ("break", "cancel", "abort")[i % 3] if rng.random() < 0.3 else "finish"
    stream = engine.generate(prompt, sampling, request_id=f"r{i}", adapter=adapter)
    counts[how] += 1
    if how == "break":
        async for _ in stream:
            break
    elif how == "cancel":
        with anyio.move_on_after(rng.random() * 0.02):
            async for _ in stream:
                pass
        await stream.aclose()  # the cancelled consumer is gone (no-op if it had finished)
    elif how == "abort":
        async for out in stream:
            if not out.finished:
                engine.abort(f"r{i}")
    else:
        async for _ in stream:
            pass


async def soak(base: Path, adapters: dict[str, Path], n: int, concurrency: int, every: int) -> dict[str, Any]:
    counts = {"finish": 0, "break": 0, "cancel": 0, "abort": 0}
    rng = random.Random(0)
    engine = AsyncEngine.from_pretrained(base, EngineConfig(dtype="float32", max_model_len=256, num_threads=1))
    rss: list[tuple[int, float]] = []
    start = time.perf_counter()
    async with engine:
        for name, path in adapters.items():
            await engine.add_adapter(name, path)
        limit = anyio.Semaphore(concurrency)

        async def guarded(i: int) -> None:
            async with limit:
                await one(engine, i, rng, counts)

        async with anyio.create_task_group() as tg:
            for i in range(n):
                await limit.acquire()  # at most `concurrency` requests open at a time
                limit.release()
                tg.start_soon(guarded, i)
                if (i + 1) % every == 0:
                    rss.append((i + 1, rss_mib()))
                    print(f"  {i + 1:>6} requests  rss {rss[-1][1]:7.1f} MiB", flush=True)
        with anyio.fail_after(30):
            while engine.stats()["requests"]["running"] or engine.stats()["requests"]["waiting"] or engine.stats()["open_streams"]:
                await anyio.sleep(0.01)
        stats = engine.stats()
        unfinished = len(engine.core.request_ids())
    return dict(counts=counts, stats=stats, unfinished=unfinished, rss=rss, seconds=time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--every", type=int, default=1000, help="print RSS every this many requests")
    parser.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    args = parser.parse_args()
    print(machine_line())
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = build_assets(Path(tmp))
        for backend in backends:
            print(f"{backend}: {args.requests} requests, concurrency {args.concurrency}")
            r = anyio.run(soak, base, adapters, args.requests, args.concurrency, args.every, backend=backend)
            s = r["stats"]
            warm = [m for k, m in r["rss"] if k > args.requests // 4] or [m for _, m in r["rss"]]
            growth = (max(warm) - min(warm)) if warm else 0.0
            print(
                f"  done in {r['seconds']:.1f} s; outcomes {r['counts']}\n"
                f"  leaked KV blocks {s['kv']['blocks_in_use']}, adapter references {s['adapters']['ref_count']}, "
                f"open streams {s['open_streams']}, unfinished requests {r['unfinished']}\n"
                f"  RSS after warm-up: {min(warm):.1f}..{max(warm):.1f} MiB (spread {growth:.1f} MiB)"
            )
            failed |= bool(s["kv"]["blocks_in_use"] or s["adapters"]["ref_count"] or s["open_streams"] or r["unfinished"])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
