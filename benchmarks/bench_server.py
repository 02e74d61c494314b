"""The HTTP server's cost: the same streaming workload through the library and through the server.

    python benchmarks/bench_server.py [--model DIR] [--clients 8] [--max-tokens 32] [--repeats 3]
                                      [--adapters demo|none]

Both sides run at once and stay warm: `chameleon serve` in its own process (as deployed: no GIL
shared with its clients) and an `AsyncEngine` in this one, built with the same `EngineConfig()`
and the same adapters (default: the demo's three trained style adapters, requests cycling over
the base model and each of them). A round is `clients` concurrent streams of the same prompts,
greedy with EOS ignored, so both sides generate the same tokens; library clients iterate
`engine.generate`, server clients are httpx SSE streams on /v1/completions. Rounds alternate in
ABBA order after a full warm-up round on each side. Prints each round, the medians of tokens/s and P50/P99
TTFT (client-side wall clock), and the median of the per-pair server / library ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import anyio
import httpx
from _machine import machine_line
from _peer_assets import PROMPT_TEXTS

from chameleon import AsyncEngine, EngineConfig, SamplingParams
from chameleon.harness.metrics import percentile

Job = tuple[str, str]  # (prompt, model name in the API: "base" or an adapter)
Result = tuple[float, list[float], int]  # wall seconds, TTFTs, tokens


async def library_round(engine: AsyncEngine, jobs: list[Job], max_tokens: int) -> Result:
    ttfts: list[float] = []
    tokens = [0]
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def one(prompt: str, model: str) -> None:
        start, first = time.perf_counter(), True
        async for out in engine.generate(prompt, sp, adapter=None if model == "base" else model):
            if out.delta and first:
                ttfts.append(time.perf_counter() - start)
                first = False
            tokens[0] += len(out.token_ids)

    began = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for prompt, model in jobs:
            tg.start_soon(one, prompt, model)
    return time.perf_counter() - began, ttfts, tokens[0]


async def server_round(client: httpx.AsyncClient, jobs: list[Job], max_tokens: int) -> Result:
    ttfts: list[float] = []
    tokens = [0]
    body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip

    async def one(prompt: str, model: str) -> None:
        start, first = time.perf_counter(), True
        async with client.stream("POST", "/v1/completions", json={**body, "model": model, "prompt": prompt}) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"] and first:
                    ttfts.append(time.perf_counter() - start)
                    first = False
                if chunk.get("usage"):
                    tokens[0] += chunk["usage"]["completion_tokens"]

    began = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for prompt, model in jobs:
            tg.start_soon(one, prompt, model)
    return time.perf_counter() - began, ttfts, tokens[0]


def start_server(model: str, adapters: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "chameleon", "serve", model, "--served-model-name", "base", "--port", str(port)]
    cmd += ["--log-level", "warning"] + [a for name, path in adapters.items() for a in ("--adapter", f"{name}={path}")]
    return subprocess.Popen(cmd), f"http://127.0.0.1:{port}"


def wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not come up")


def row(r: Result) -> dict[str, float]:
    wall, ttfts, tokens = r
    return {"tok_s": tokens / wall, "p50_ms": percentile(ttfts, 50) * 1e3, "p99_ms": percentile(ttfts, 99) * 1e3}


async def bench(args: argparse.Namespace, model: str, adapters: dict[str, str]) -> None:
    names = ["base", *adapters]
    jobs = [(PROMPT_TEXTS[i % len(PROMPT_TEXTS)], names[i % len(names)]) for i in range(args.clients)]
    proc, url = start_server(model, adapters)
    try:
        async with AsyncEngine.from_pretrained(model, EngineConfig()) as engine:
            for name, path in adapters.items():
                await engine.add_adapter(name, path)
            await anyio.to_thread.run_sync(wait_healthy, url, proc)
            limits = httpx.Limits(max_connections=args.clients + 4)
            async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
                sides: dict[str, Callable[[list[Job], int], Awaitable[Result]]] = {
                    "library": lambda j, n: library_round(engine, j, n),
                    "server": lambda j, n: server_round(client, j, n),
                }
                for side in sides.values():  # warm-up: one full round on each side
                    await side(jobs, args.max_tokens)
                rows: dict[str, list[dict[str, float]]] = {"library": [], "server": []}
                for rep in range(args.repeats):
                    order = ("library", "server") if rep % 2 == 0 else ("server", "library")
                    for name in order:
                        r = row(await sides[name](jobs, args.max_tokens))
                        rows[name].append(r)
                        print(f"  rep {rep} {name:7s} {r['tok_s']:7.1f} tok/s  TTFT P50 {r['p50_ms']:7.1f} ms  "
                              f"P99 {r['p99_ms']:7.1f} ms", flush=True)  # fmt: skip
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    report(rows)


def report(rows: dict[str, list[dict[str, float]]]) -> None:
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in rows.items()}
    print("\n| side | tokens/s | TTFT P50 (ms) | TTFT P99 (ms) [min–max] |\n|---|---|---|---|")
    for side, m in med.items():
        lo, hi = min(r["p99_ms"] for r in rows[side]), max(r["p99_ms"] for r in rows[side])
        print(f"| {side} | {m['tok_s']:.1f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} [{lo:.1f}–{hi:.1f}] |")
    pairs = list(zip(rows["server"], rows["library"], strict=True))
    tput = statistics.median(s["tok_s"] / lib["tok_s"] for s, lib in pairs)
    p99 = statistics.median(s["p99_ms"] / lib["p99_ms"] for s, lib in pairs)
    print(f"\nserver / library, median of {len(pairs)} interleaved pairs: tokens/s x{tput:.2f}, TTFT P99 x{p99:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a local HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per side, alternated ABBA")
    parser.add_argument("--adapters", choices=("demo", "none"), default="demo",
                        help="demo: the demo's three style adapters, requests mixed with the base model")  # fmt: skip
    args = parser.parse_args()
    from chameleon.assets import smollm2_dir
    from chameleon.demo.train import TrainSettings, train_demo_adapters

    model = args.model or str(smollm2_dir())
    adapters = train_demo_adapters(Path(model), TrainSettings()) if args.adapters == "demo" else {}
    print(f"server vs library · {Path(model).name} · {args.clients} concurrent streams x {args.max_tokens} tokens "
          f"· adapters: base + {', '.join(adapters) or 'none'}\nhost: {machine_line()}", flush=True)  # fmt: skip
    anyio.run(bench, args, model, {k: str(v) for k, v in adapters.items()})


if __name__ == "__main__":
    main()
