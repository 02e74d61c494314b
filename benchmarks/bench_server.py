"""The HTTP server's cost: the same streaming workload through the library and through the server.

    python benchmarks/bench_server.py [--model DIR] [--clients 8] [--max-tokens 32] [--adapter NAME=PATH]

Library: `clients` concurrent `engine.generate` streams (after one warm-up request). Server:
`chameleon serve` in its own process and `clients` concurrent streaming HTTP clients (httpx, SSE). Same prompts, greedy, EOS ignored, so both sides generate the same tokens. Prints tokens/s
and P50/P99 TTFT (client-side, wall clock) for both, and server / library ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import anyio
import attrs
import httpx
from _peer_assets import PROMPT_TEXTS

from chameleon import AsyncEngine, EngineConfig, SamplingParams
from chameleon.harness.metrics import percentile

Result = tuple[float, list[float], int]  # wall seconds, TTFTs, tokens


async def run_library(model: str, prompts: list[str], max_tokens: int, adapter: tuple[str, str] | None) -> Result:
    ttfts: list[float] = []
    tokens = [0]
    async with AsyncEngine.from_pretrained(model, EngineConfig(dtype="float32")) as engine:
        if adapter:
            await engine.add_adapter(*adapter)
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        async for _ in engine.generate(prompts[0], attrs.evolve(sp, max_tokens=2)):  # warm-up
            pass

        async def one(prompt: str) -> None:
            start, first = time.perf_counter(), True
            async for out in engine.generate(prompt, sp, adapter=adapter[0] if adapter else None):
                if out.delta and first:
                    ttfts.append(time.perf_counter() - start)
                    first = False
                tokens[0] += len(out.token_ids)

        began = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for p in prompts:
                tg.start_soon(one, p)
        return time.perf_counter() - began, ttfts, tokens[0]


async def run_clients(url: str, model: str, prompts: list[str], max_tokens: int) -> Result:
    ttfts: list[float] = []
    tokens = [0]
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def one(client: httpx.AsyncClient, prompt: str) -> None:
        start, first = time.perf_counter(), True
        async with client.stream("POST", "/v1/completions", json={**body, "prompt": prompt}) as resp:
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"] and first:
                    ttfts.append(time.perf_counter() - start)
                    first = False
                if chunk.get("usage"):
                    tokens[0] += chunk["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        began = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for p in prompts:
                tg.start_soon(one, client, p)
        return time.perf_counter() - began, ttfts, tokens[0]


def run_server(model: str, prompts: list[str], max_tokens: int, adapter: tuple[str, str] | None) -> Result:
    """`chameleon serve` in its own process (as deployed: no GIL shared with the clients)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "chameleon", "serve", model, "--served-model-name", "base", "--port", str(port)]
    cmd += ["--log-level", "warning"] + (["--adapter", "=".join(adapter)] if adapter else [])
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        anyio.run(run_clients, url, adapter[0] if adapter else "base", prompts[:1], 2)  # warm-up
        return anyio.run(run_clients, url, adapter[0] if adapter else "base", prompts, max_tokens)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("the server did not come up")


def report(name: str, r: Result) -> dict[str, float]:
    wall, ttfts, tokens = r
    row = {
        "tok_s": tokens / wall,
        "ttft_p50_ms": percentile(ttfts, 50) * 1000,
        "ttft_p99_ms": percentile(ttfts, 99) * 1000,
    }
    print(
        f"{name:8s} {tokens:6d} tokens in {wall:6.2f} s = {row['tok_s']:7.1f} tok/s   "
        f"TTFT P50 {row['ttft_p50_ms']:7.1f} ms  P99 {row['ttft_p99_ms']:7.1f} ms"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a local HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--adapter", help="NAME=PATH: every request goes through this adapter")
    args = parser.parse_args()
    from chameleon.assets import smollm2_dir

    model = args.model or str(smollm2_dir())
    adapter = tuple(args.adapter.split("=", 1)) if args.adapter else None
    prompts = [PROMPT_TEXTS[i % len(PROMPT_TEXTS)] for i in range(args.clients)]
    lib = report("library", anyio.run(run_library, model, prompts, args.max_tokens, adapter))
    srv = report("server", run_server(model, prompts, args.max_tokens, adapter))  # type: ignore[arg-type]
    print(
        f"server / library: tok/s x{srv['tok_s'] / lib['tok_s']:.2f}, "
        f"TTFT P99 x{srv['ttft_p99_ms'] / lib['ttft_p99_ms']:.2f}"
    )


if __name__ == "__main__":
    main()
