"""Runs vLLM (CPU build) for `bench_peers.py`, in vLLM's own venv. Standalone on purpose (no
chameleon import: it is not installed in that venv). vLLM's multiprocessing spawns, so everything
runs under `if __name__ == "__main__"`.

Offline, as a server the benchmark drives run by run (so its runs interleave with ours and drift
in machine speed hits every engine alike; an idle vLLM engine uses no CPU):

    python _vllm_worker.py serve RESULT_FD
    stdin, one JSON per line: {"cmd": "init", "engine": {...EngineArgs...}, "adapters": {name: path}}
                              {"cmd": "generate", "requests": [{"prompt", "max_tokens", "adapter"}]}
                              {"cmd": "quit"}
    RESULT_FD gets one JSON line per command (stdout carries vLLM's own logs).

Online, in one go: `python _vllm_worker.py SPEC OUT` with SPEC
    {"engine", "adapters", "online": [{"key", "rate", "requests": [{"id", "arrival_s", "prompt",
     "max_tokens", "adapter"}]}], "skip_rates_above_slo_s"}
OUT gets, per key, one record per request (seconds from the run's start; the arrival is the
scheduled one, so a late submission is charged to TTFT).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from _machine import steal_s  # this script's folder is on sys.path when run as a file


def _lora_requests(adapters: dict[str, str]) -> dict[str, Any]:
    from vllm.lora.request import LoRARequest

    return {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(sorted(adapters.items()))}


def serve(result_fd: int) -> None:
    import vllm
    from vllm import LLM, SamplingParams

    out = os.fdopen(result_fd, "w")
    llm: Any = None
    loras: dict[str, Any] = {}

    def generate(requests: list[dict[str, Any]]) -> tuple[float, list[list[int]]]:
        params = [SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True) for r in requests]
        prompts = [{"prompt_token_ids": r["prompt"]} for r in requests]
        lora = [loras[r["adapter"]] if r["adapter"] else None for r in requests]
        start = time.perf_counter()
        res = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in res]

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "init":
            t = time.perf_counter()
            llm = LLM(**cmd["engine"])
            loras = _lora_requests(cmd["adapters"])
            # Warm-up: every adapter loaded once, first-call costs paid outside the timed runs.
            generate([{"prompt": [1, 2, 3, 4], "max_tokens": 4, "adapter": a} for a in [None, *loras]])
            reply: dict[str, Any] = {"startup_s": time.perf_counter() - t, "vllm_version": vllm.__version__}
        else:
            dt, tokens = generate(cmd["requests"])
            reply = {"time": dt, "tokens": tokens}
        out.write(json.dumps(reply) + "\n")
        out.flush()


async def _online_run(engine: Any, loras: dict[str, Any], requests: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []

    async def one(r: dict[str, Any]) -> None:
        delay = t0 + r["arrival_s"] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        params = SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        times: list[float] = []
        first_token = None
        async for o in engine.generate({"prompt_token_ids": r["prompt"]}, params, request_id=f"{tag}-{r['id']}",
                                        lora_request=loras[r["adapter"]] if r["adapter"] else None):
            now = time.perf_counter() - t0
            n = len(o.outputs[0].token_ids)
            if n and first_token is None:
                first_token = now
            times.extend([now] * n)
        records.append({"id": r["id"], "adapter": r["adapter"], "arrival_s": r["arrival_s"], "first_token_s": first_token,
                        "finish_s": times[-1] if times else None, "prompt_len": len(r["prompt"]),
                        "output_len": len(times), "token_times_s": times})

    await asyncio.gather(*(one(r) for r in requests))
    return records


async def run_online(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    t = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**spec["engine"]))
    out: dict[str, Any] = {"startup_s": time.perf_counter() - t}
    loras = _lora_requests(spec["adapters"])
    try:
        warm = [{"id": f"w{i}", "arrival_s": 0.0, "prompt": [1] * 16, "max_tokens": 4, "adapter": a}
                for i, a in enumerate([None, *loras])]
        await _online_run(engine, loras, warm, "warmup")
        # Runs come rate by rate, ascending. Once the median P99 TTFT of a rate misses the SLO, the
        # higher rates are skipped: they only queue longer (and would take minutes to drain).
        slo = spec.get("skip_rates_above_slo_s")
        p99s: dict[float, list[float]] = {}
        for run in spec.get("online", []):
            if slo is not None and any(r < run["rate"] and _median(v) > slo for r, v in p99s.items()):
                print(f"vllm {run['key']}: skipped (a lower rate already missed the SLO)", file=sys.stderr, flush=True)
                continue
            for attempt in range(4):  # redone while the hypervisor took > 5% of the CPU (see bench_peers)
                await asyncio.sleep(2.0)  # the engine busy-polls a core for ~1 s after work: start idle
                s0, t0 = steal_s(), time.perf_counter()
                recs = await _online_run(engine, loras, run["requests"], f"{run['key']}-{attempt}")
                share = (steal_s() - s0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
                if share <= 0.05:
                    break
                out.setdefault("stolen", []).append(f"vllm {run['rate']} req/s: {share:.0%} stolen")
            out[run["key"]] = recs
            ttft = sorted((r["first_token_s"] - r["arrival_s"]) if r["first_token_s"] is not None else float("inf")
                          for r in recs)
            p99s.setdefault(run["rate"], []).append(_p99(ttft))
            print(f"vllm {run['key']}: P99 TTFT {p99s[run['rate']][-1]:.3f} s", file=sys.stderr, flush=True)
    finally:
        engine.shutdown()
    return out


def _median(v: list[float]) -> float:
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def _p99(sorted_values: list[float]) -> float:
    h = (len(sorted_values) - 1) * 0.99
    lo, hi = int(h), min(int(h) + 1, len(sorted_values) - 1)
    if sorted_values[lo] == sorted_values[hi]:
        return sorted_values[lo]
    return sorted_values[lo] + (h - lo) * (sorted_values[hi] - sorted_values[lo])


def main() -> None:
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
        return
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    import vllm

    result = asyncio.run(run_online(spec))
    result["vllm_version"] = vllm.__version__
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
