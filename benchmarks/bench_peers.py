"""Our engine vs vLLM (CPU build) and PEFT/transformers, side by side on this machine, in one run.

    python benchmarks/bench_peers.py offline [--quick] [--peer-python /tmp/vllm-venv/bin/python]  # ~8 min
    python benchmarks/bench_peers.py online  [--quick] [--rates 4 8 16 32] [--duration 12]          # ~9 min
    python benchmarks/bench_peers.py profile [--quick]   # where our engine's time goes (A, 256 x 64 mixed)

`--quick` (about 1-2 minutes each) runs fp32 64 x 16 only / two rates for 10 s.

(A) offline: a tiny random Llama (hidden 256, 4 layers, 8 query / 2 KV heads, SmolLM2's real
tokenizer and 49,152-token vocabulary) and 4 PEFT adapters (ranks 8/16/8/16 on q_proj, v_proj,
saved by PEFT with random A and B). 64 requests x 16 new tokens and 256 x 64, base-only and mixed
(round robin: base, then each adapter), greedy, EOS ignored, in fp32 and bf16. All requests are
submitted at once; tokens/s = generated tokens / wall time. Peers: vLLM's offline `LLM.generate`
(in a subprocess, in its own venv) and PEFT static batching (`generate(adapter_names=...)`, one
left-padded batch). LoRA overhead = mixed-workload time / base-only time, per engine.
Token equality: every engine's greedy fp32 tokens on the 64 x 16 mixed workload (and on the first
requests of 256 x 64) against PEFT generating one request at a time (no padding), the same oracle
as `tests/test_lora_engine.py`.

(B) online: 32 adapters of ranks 8/16/32/64 on q/k/v/o, S-LoRA power-law popularity
(`chameleon.harness.workload.slora_workload`, alpha 0.3), Poisson arrivals at several rates, prompts of
8-256 tokens, 8-128 new tokens. Real wall-clock arrivals, open loop: TTFT counts from the scheduled
arrival. Ours: `EngineCore` driven by `chameleon.harness.driver.run_workload` on a monotonic clock,
under the `chameleon` policy (MLQ scheduler + Chameleon adapter cache) and the `slora` baseline
(FIFO + evict at refcount 0). vLLM: its `AsyncLLM` with one asyncio task per request, woken at
the request's arrival time.

Timing hygiene: every run starts on an idle machine (vLLM's processes busy-poll a core for about a
second after each request batch), and a run during which the hypervisor took more than 5% of the
CPU ("steal" in /proc/stat; this VM's host sometimes takes its cores for seconds) is redone, up to
3 times; the report lists such runs.

Fairness settings, the same for every engine: greedy, no prefix caching (switched off on both
sides: the workloads repeat prompts), the same `max_num_seqs`, 2,048 batched tokens
per step, LoRA slots above the number of adapters (vLLM CPU's known bug: with every `max_loras`
slot full, no-adapter rows get the last slot's LoRA), LoRA only on the modules the adapters
target (vLLM's `lora_target_modules`; without it vLLM wraps the 49k-vocab LM head too and runs
about 8x slower), both engines detokenize. vLLM gets the CPU settings that were fastest here
(`--vllm-bind`, see docs/benchmarks.md); its KV cache is `VLLM_CPU_KVCACHE_SPACE` GiB.
Benchmarks are never run by the test suite.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _machine import machine_line, steal_s  # noqa: E402
from _peer_assets import (  # noqa: E402
    OFFLINE_ADAPTERS,
    OFFLINE_TARGETS,
    TINY,
    make_online_adapters,
    make_peft_adapter,
    make_tiny_model,
    offline_requests,
)

from chameleon import EngineConfig, SamplingParams  # noqa: E402
from chameleon.engine.factory import build_core  # noqa: E402

DEFAULT_PEER = "/tmp/vllm-venv/bin/python"
WORKER = Path(__file__).resolve().parent / "_vllm_worker.py"
ONLINE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MAX_BATCHED_TOKENS = 2048
SLO_TTFT_S = 2.0


# ------------------------------------------------------------------------------------------------
# vLLM in its own venv
# ------------------------------------------------------------------------------------------------


def peer_available(python: str) -> str | None:
    """None if the peer's python imports vllm, else why not."""
    if not Path(python).exists():
        return f"{python} does not exist"
    try:
        r = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                           timeout=120, env=_vllm_env("all"))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python}: {exc}"
    if r.returncode != 0:
        return f"{python} cannot import vllm: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
    return None


def _vllm_env(bind: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the tiny model needs far less
    env["HF_HUB_OFFLINE"] = "1"
    env["VLLM_NO_USAGE_STATS"] = "1"
    env["VLLM_TARGET_DEVICE"] = "cpu"
    if bind == "all":  # every core computes; the frontend and engine-core processes share them
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{(os.cpu_count() or 1) - 1}"
    return env  # "auto": vLLM's default, one core reserved for the frontend


def run_vllm(python: str, spec: dict[str, Any], bind: str, log: Path, timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        with open(log, "a") as f:
            r = subprocess.run([python, str(WORKER), str(spec_path), str(out_path)], stdout=f, stderr=subprocess.STDOUT,
                               env=_vllm_env(bind), timeout=timeout_s)
        if r.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"vLLM worker failed (exit {r.returncode}); see {log}")
        return json.loads(out_path.read_text())


def _busy_cores(window_s: float) -> float:
    """Cores the whole machine kept busy over the next `window_s` (Linux /proc/stat; 0.0 elsewhere)."""
    def busy() -> tuple[float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except OSError:
            return None
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK"), time.perf_counter()

    a = busy()
    time.sleep(window_s)
    b = busy()
    return 0.0 if a is None or b is None else (b[0] - a[0]) / (b[1] - a[1])


MAX_STEAL = 0.05  # a run during which the hypervisor took more than this share of the CPU is redone
RETRIES = 3
stolen_runs: list[str] = []  # runs redone because of steal, for the report


def without_steal(label: str, fn: Any) -> Any:
    """Run `fn()`; redo it (up to RETRIES times) while the hypervisor stole > MAX_STEAL of the CPU.
    On a shared host a VM's cores are sometimes taken away for seconds: steps then take 100x
    longer, which says nothing about the engines."""
    cores = os.cpu_count() or 1
    for attempt in range(RETRIES + 1):
        settle()
        s0, t0 = steal_s(), time.perf_counter()
        result = fn()
        share = (steal_s() - s0) / max(1e-9, (time.perf_counter() - t0) * cores)
        if share <= MAX_STEAL:
            return result
        stolen_runs.append(f"{label}: {share:.0%} stolen" + (", redone" if attempt < RETRIES else ", kept"))
        print(f"  (hypervisor steal {share:.0%} during {label}: " + ("redoing it)" if attempt < RETRIES else "kept)"),
              flush=True)
    return result


def settle(max_s: float = 5.0) -> None:
    """Wait until the machine is idle. vLLM's engine-core and worker processes busy-poll a core for
    about a second after each `generate`; whatever ran next would share the CPU with them."""
    deadline = time.perf_counter() + max_s
    while time.perf_counter() < deadline and _busy_cores(0.1) > 0.15:
        pass


class VLLMServer:
    """The offline vLLM worker, kept alive between runs and driven one `generate` at a time."""

    def __init__(self, python: str, bind: str, log: Path, engine: dict[str, Any], adapters: dict[str, str]) -> None:
        read_fd, write_fd = os.pipe()
        self._log = open(log, "a")  # noqa: SIM115
        self.proc = subprocess.Popen([python, str(WORKER), "serve", str(write_fd)], stdin=subprocess.PIPE,
                                     stdout=self._log, stderr=subprocess.STDOUT, env=_vllm_env(bind),
                                     pass_fds=(write_fd,), text=True)
        os.close(write_fd)
        self._results = os.fdopen(read_fd)
        self.info = self._call({"cmd": "init", "engine": engine, "adapters": adapters})

    def _call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self._results.readline()
        if not line:
            raise RuntimeError(f"vLLM worker died (exit {self.proc.wait()}); see {self._log.name}")
        return json.loads(line)

    def generate(self, requests: list[dict[str, Any]]) -> tuple[float, list[list[int]]]:
        r = self._call({"cmd": "generate", "requests": requests})
        return r["time"], r["tokens"]

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
            self.proc.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self._results.close()
        self._log.close()


def vllm_engine_args(model: Path, dtype: str, *, max_loras: int, max_lora_rank: int, max_num_seqs: int,
                     targets: list[str]) -> dict[str, Any]:
    return dict(model=str(model), dtype=dtype, max_model_len=1024, enable_lora=True, max_loras=max_loras,
                max_cpu_loras=max_loras, max_lora_rank=max_lora_rank, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=MAX_BATCHED_TOKENS, enable_prefix_caching=False, seed=0,
                lora_target_modules=targets)


# ------------------------------------------------------------------------------------------------
# (A) offline
# ------------------------------------------------------------------------------------------------


def ours_offline_core(model: Path, adapters: dict[str, Path], dtype: str, max_num_seqs: int):  # type: ignore[no-untyped-def]
    core = build_core(model, EngineConfig(dtype=dtype, max_loras=len(adapters) + 1, max_lora_rank=16,
                                          max_num_seqs=max_num_seqs, max_num_batched_tokens=MAX_BATCHED_TOKENS,
                                          enable_prefix_caching=False))  # as the vLLM side runs
    for name, path in adapters.items():
        core.add_adapter(name, str(path))
    return core


def ours_generate(core, requests: list[dict[str, Any]]) -> tuple[float, list[list[int]]]:  # type: ignore[no-untyped-def]
    gc.collect()
    got: dict[str, list[int]] = {r["id"]: [] for r in requests}
    start = time.perf_counter()
    for r in requests:
        core.add_request(r["id"], r["prompt"], SamplingParams(max_tokens=r["max_tokens"], temperature=0, ignore_eos=True),
                         adapter=r["adapter"])
    while core.has_unfinished_requests():
        for out in core.step():
            got[out.request_id].extend(out.token_ids)
    return time.perf_counter() - start, [got[r["id"]] for r in requests]


def load_peft(model: Path, adapters: dict[str, Path], dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    names = list(adapters)
    peft = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(adapters[name], adapter_name=name)
    peft.eval()
    peft.generation_config.eos_token_id = None
    return peft


def peft_generate(peft, requests: list[dict[str, Any]], pad_id: int) -> tuple[float, list[list[int]]]:  # type: ignore[no-untyped-def]
    """Static batching: all requests in one left-padded batch (every request has the same max_tokens)."""
    gc.collect()
    width = max(len(r["prompt"]) for r in requests)
    ids = torch.tensor([[pad_id] * (width - len(r["prompt"])) + r["prompt"] for r in requests])
    mask = torch.tensor([[0] * (width - len(r["prompt"])) + [1] * len(r["prompt"]) for r in requests])
    n = requests[0]["max_tokens"]
    start = time.perf_counter()
    with torch.inference_mode():
        out = peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=pad_id, adapter_names=[r["adapter"] or "__base__" for r in requests])
    return time.perf_counter() - start, out[:, width:].tolist()


def peft_oracle(peft, requests: list[dict[str, Any]]) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """PEFT one request at a time: no padding, the reference the tests use."""
    res = []
    with torch.inference_mode():
        for r in requests:
            ids = torch.tensor([r["prompt"]])
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=r["max_tokens"],
                                min_new_tokens=r["max_tokens"], do_sample=False, adapter_names=[r["adapter"] or "__base__"])
            res.append(out[0, ids.shape[1]:].tolist())
    return res


def compare(tokens: list[list[int]], oracle: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(tokens, oracle, strict=True))
    if same == len(oracle):
        return f"{same}/{len(oracle)} identical"
    diverge = []
    for i, (a, b) in enumerate(zip(tokens, oracle, strict=True)):
        if a != b:
            at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            diverge.append(f"req {i} at token {at}")
    return f"{same}/{len(oracle)} identical -- MISMATCH: " + ", ".join(diverge[:8]) + (" ..." if len(diverge) > 8 else "")


def offline(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    model = make_tiny_model(root / "model")
    adapters = {name: make_peft_adapter(model, root / name, r, OFFLINE_TARGETS, seed=10 + i)
                for i, (name, r) in enumerate(OFFLINE_ADAPTERS.items())}
    tok = AutoTokenizer.from_pretrained(model)
    sizes = [(64, 16)] if args.quick else [(64, 16), (256, 64)]
    dtypes = ["float32"] if args.quick else ["float32", "bfloat16"]
    repeats = args.repeats
    mixes = {"base": [None], "mixed": [None, *adapters]}
    work = {f"{n}x{m}-{mix}": offline_requests(tok, n, m, ads) for n, m in sizes for mix, ads in mixes.items()}
    results: dict[str, dict[str, dict[str, Any]]] = {}  # dtype -> engine -> key -> {"times", "tokens"}

    why = peer_available(args.peer_python)
    if why:
        print(f"!! vLLM peer ABSENT: {why}. Running ours and PEFT only.", flush=True)
    for dtype in dtypes:
        results[dtype] = {}
        vllm: VLLMServer | None = None
        if not why:
            print(f"[{dtype}] starting vLLM ({args.vllm_bind} bind) ...", flush=True)
            try:
                vllm = VLLMServer(args.peer_python, args.vllm_bind, args.log,
                                  vllm_engine_args(model, dtype, max_loras=len(adapters) + 1, max_lora_rank=16,
                                                   max_num_seqs=256, targets=OFFLINE_TARGETS),
                                  {k: str(v) for k, v in adapters.items()})
                results[dtype]["vllm_meta"] = {"startup_s": vllm.info["startup_s"], "version": vllm.info["vllm_version"]}
            except (RuntimeError, OSError) as exc:
                print(f"!! vLLM failed to start: {exc}", flush=True)
                vllm = None
        print(f"[{dtype}] runs, interleaved: " + ("vLLM, " if vllm else "") + "ours, PEFT ...", flush=True)
        core = ours_offline_core(model, adapters, dtype, 256)
        peft = load_peft(model, adapters, getattr(torch, dtype))
        ours_generate(core, offline_requests(tok, 8, 4, [None, *adapters]))  # warm-up
        peft_generate(peft, offline_requests(tok, 8, 4, [None, *adapters]), tok.pad_token_id or 0)
        engines: dict[str, Any] = {"ours": lambda reqs: ours_generate(core, reqs),
                                   "peft": lambda reqs: peft_generate(peft, reqs, tok.pad_token_id or 0)}
        if vllm is not None:
            engines = {"vllm": vllm.generate, **engines}
        for e in engines:
            results[dtype][e] = {k: {"times": [], "tokens": None} for k in work}
        # Round 0 is an untimed warm-up of every workload (first-call costs of new shapes: oneDNN
        # builds a primitive per shape); then `repeats` timed rounds, interleaved so drift in machine
        # speed hits every engine alike, each run starting on an idle machine (`settle`).
        for rnd in range(repeats + 1):
            for k, reqs in work.items():
                for e, gen in list(engines.items()):
                    if rnd == 0 and e == "peft":
                        continue  # no first-call costs worth paying again (and it is the slow one)
                    try:
                        t, toks = without_steal(f"{dtype} {k} {e}", lambda gen=gen, reqs=reqs: gen(reqs))
                    except RuntimeError as exc:  # only the vLLM worker raises this
                        print(f"!! {e} failed: {exc}", flush=True)
                        engines.pop(e)
                        results[dtype].pop(e, None)
                        continue
                    if rnd:
                        results[dtype][e][k]["times"].append(t)
                        results[dtype][e][k]["tokens"] = toks
        if vllm is not None:
            vllm.close()
        if dtype == "float32":
            results["oracle"] = {}
            for k in work:
                if k.endswith("mixed"):
                    reqs = work[k][: args.oracle_requests]
                    print(f"[oracle] PEFT one request at a time: {k} ({len(reqs)} requests) ...", flush=True)
                    results["oracle"][k] = peft_oracle(peft, reqs)
        del core, peft
        gc.collect()
    report_offline(results, work, dtypes, args)
    return results


def report_offline(results: dict[str, Any], work: dict[str, list[dict[str, Any]]], dtypes: list[str],
                   args: argparse.Namespace) -> None:
    print()
    print(f"machine: {machine_line()}")
    print(f"(A) offline: tiny Llama {TINY}, 4 PEFT adapters r8/16 on q,v; greedy; median of {args.repeats} runs")
    engines = [e for e in ("ours", "vllm", "peft") if any(e in results[d] for d in dtypes)]
    for dtype in dtypes:
        meta = results[dtype].get("vllm_meta")
        if meta:
            print(f"  vLLM {meta['version']} ({dtype}): engine start-up {meta['startup_s']:.1f} s (not timed)")
    print()
    hdr = f"{'dtype':9} {'workload':14}" + "".join(f"{e + ' tok/s':>13}" for e in engines)
    hdr += f"{'ours/vLLM':>11}{'ours/PEFT':>11}"
    print(hdr)
    tput: dict[tuple[str, str, str], float] = {}
    for dtype in dtypes:
        for k, reqs in work.items():
            n_tokens = sum(r["max_tokens"] for r in reqs)
            row = f"{dtype:9} {k:14}"
            for e in engines:
                if e in results[dtype]:
                    t = statistics.median(results[dtype][e][k]["times"])
                    tput[(dtype, k, e)] = n_tokens / t
                    row += f"{n_tokens / t:13.1f}"
                else:
                    row += f"{'-':>13}"
            for peer in ("vllm", "peft"):
                if (dtype, k, peer) in tput:
                    row += f"{tput[(dtype, k, 'ours')] / tput[(dtype, k, peer)]:10.2f}x"
                else:
                    row += f"{'-':>11}"
            print(row)
    print()
    print("LoRA overhead (mixed-adapter time / base-only time, medians):")
    for dtype in dtypes:
        for size in sorted({k.rsplit("-", 1)[0] for k in work}, key=lambda s: int(s.split("x")[0])):
            cells = []
            for e in engines:
                if e in results[dtype]:
                    mixed = statistics.median(results[dtype][e][f"{size}-mixed"]["times"])
                    base = statistics.median(results[dtype][e][f"{size}-base"]["times"])
                    cells.append(f"{e} {mixed / base:.3f}")
            print(f"  {dtype:9} {size:8} " + "   ".join(cells))
    print()
    print("Token equality, greedy fp32, against PEFT one request at a time:")
    for k, oracle in results.get("oracle", {}).items():
        n = len(oracle)
        for e in ("ours", "vllm", "peft"):
            if e in results["float32"]:
                label = "PEFT static batch" if e == "peft" else e
                print(f"  {k:14} {label:18} {compare(results['float32'][e][k]['tokens'][:n], oracle)}")
    _report_steal()
    if args.json:
        slim = {d: {e: {k: v["times"] for k, v in r.items()} for e, r in results[d].items() if e != "vllm_meta"}
                for d in dtypes}
        Path(args.json).write_text(json.dumps({"offline_times_s": slim}, indent=1))


def _report_steal() -> None:
    if stolen_runs:
        print(f"Runs during which the hypervisor took > {MAX_STEAL:.0%} of the CPU ({len(stolen_runs)}; redone up to "
              f"{RETRIES} times): " + "; ".join(stolen_runs))
    else:
        print(f"No run lost more than {MAX_STEAL:.0%} of the CPU to the hypervisor (steal).")


# ------------------------------------------------------------------------------------------------
# (B) online
# ------------------------------------------------------------------------------------------------


def online(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from chameleon.clock import MonotonicClock
    from chameleon.harness.driver import run_workload, warm_up
    from chameleon.harness.metrics import RequestRecord, summarize
    from chameleon.harness.workload import slora_workload

    model = make_tiny_model(root / "model")
    rates = sorted(args.rates or ([8.0, 32.0] if args.quick else [4.0, 8.0, 16.0, 32.0]))
    duration = args.duration or (10.0 if args.quick else 12.0)
    repeats = 1 if args.quick else args.online_repeats
    workloads = {(rate, rep): slora_workload(num_adapters=args.adapters, alpha=0.3, rate=rate, cv=1.0, duration_s=duration,
                                             input_range=(8, 256), output_range=(8, 128), ranks=(8, 16, 32, 64), seed=rep)
                 for rate in rates for rep in range(repeats)}
    specs = next(iter(workloads.values())).adapters
    adapters = make_online_adapters(model, root / "adapters", [(a.name, a.rank) for a in specs], ONLINE_TARGETS)
    max_loras = len(adapters) + 1
    print(f"(B) {len(adapters)} adapters, rates {rates} req/s, {duration:.0f} s each, {repeats} run(s) per rate", flush=True)
    runs: dict[str, dict[float, list[Any]]] = {}

    why = peer_available(args.peer_python)
    if why:
        print(f"!! vLLM peer ABSENT: {why}. Running ours only.", flush=True)
    else:
        spec = {"engine": vllm_engine_args(model, "float32", max_loras=max_loras, max_lora_rank=64, max_num_seqs=128,
                                           targets=ONLINE_TARGETS),
                "adapters": {k: str(v) for k, v in adapters.items()},
                "skip_rates_above_slo_s": SLO_TTFT_S,
                "online": [{"key": f"{rate}-{rep}", "rate": rate,
                            "requests": [{"id": r.request_id, "arrival_s": r.arrival_s, "prompt": [1] * r.prompt_len,
                                          "max_tokens": r.output_len, "adapter": r.adapter} for r in w.requests]}
                           for (rate, rep), w in workloads.items()]}
        print(f"vLLM AsyncLLM ({args.vllm_bind} bind) ...", flush=True)
        try:
            out = run_vllm(args.peer_python, spec, args.vllm_bind, args.log, timeout_s=60 + 3 * duration * len(workloads) + 120)
            runs["vllm"] = {}
            stolen_runs.extend(out.get("stolen", []))
            for (rate, rep) in workloads:
                if f"{rate}-{rep}" not in out:
                    continue  # skipped: vLLM had already missed the SLO at a lower rate
                recs = [RequestRecord(request_id=r["id"], adapter=r["adapter"], arrival_s=r["arrival_s"],
                                      first_scheduled_s=None, first_token_s=r["first_token_s"], finish_s=r["finish_s"],
                                      prompt_len=r["prompt_len"], output_len=r["output_len"],
                                      token_times_s=r["token_times_s"],
                                      finish_reason="length" if r["finish_s"] is not None else "abort")
                        for r in out[f"{rate}-{rep}"]]
                runs["vllm"].setdefault(rate, []).append(summarize(recs, slo_ttft_s=SLO_TTFT_S, slo_tbt_s=0.15))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"!! vLLM failed: {exc}", flush=True)

    for policy, (sched, cache) in {"ours-chameleon": ("chameleon", "chameleon"), "ours-slora": ("fifo", "slora")}.items():
        print(f"{policy} ...", flush=True)
        runs[policy] = {}
        for (rate, rep), w in workloads.items():

            def one_run(w: Any = w, sched: str = sched, cache: str = cache) -> tuple[Any, Any]:
                clock = MonotonicClock()
                core = build_core(model, EngineConfig(dtype="float32", scheduler=sched, adapter_cache=cache,
                                                      max_loras=max_loras, max_lora_rank=64, max_num_seqs=128,
                                                      max_num_batched_tokens=MAX_BATCHED_TOKENS,
                                                      enable_prefix_caching=False), clock=clock)
                for name, path in adapters.items():
                    core.add_adapter(name, str(path))
                warm_up(core)
                try:
                    return run_workload(core, w, clock), core.stats()
                finally:
                    gc.unfreeze()
                    del core
                    gc.collect()

            recs, stats = without_steal(f"{policy} {rate} req/s run {rep}", one_run)
            runs[policy].setdefault(rate, []).append(
                summarize(recs, slo_ttft_s=SLO_TTFT_S, slo_tbt_s=0.15, adapter_hit_rate=stats.adapters.hit_rate))
    report_online(runs, rates, duration, repeats, len(adapters), args)
    return runs


def report_online(runs: dict[str, dict[float, list[Any]]], rates: list[float], duration: float, repeats: int,
                  n_adapters: int, args: argparse.Namespace) -> None:
    print()
    print(f"machine: {machine_line()}")
    print(f"(B) online: {n_adapters} adapters r8-64 on q,k,v,o, S-LoRA power law alpha=0.3, Poisson arrivals, "
          f"prompts U[8,256), outputs U[8,128), {duration:.0f} s per run, fp32; median of {repeats} run(s)")
    keys = [("ttft_p50_s", "TTFT P50 s", 1.0), ("ttft_p99_s", "TTFT P99 s", 1.0), ("tbt_p99_s", "TBT P99 ms", 1000.0),
            ("throughput_rps", "req/s", 1.0), ("tokens_per_s", "tok/s", 1.0)]
    print(f"{'rate':>5} {'engine':16}" + "".join(f"{label:>12}" for _, label, _ in keys))
    for rate in rates:
        for engine in runs:
            sums = runs[engine].get(rate)
            if not sums:
                continue
            cells = "".join(f"{statistics.median(getattr(s, k) for s in sums) * scale:12.3f}" for k, _, scale in keys)
            print(f"{rate:5.1f} {engine:16}{cells}")
    if "vllm" in runs:
        print()
        print(f"P99 TTFT ours / vLLM at each rate (goal: < 1 wherever vLLM meets the {SLO_TTFT_S:.0f} s TTFT SLO):")
        for rate in rates:
            if rate not in runs["vllm"]:
                print(f"  {rate:5.1f} req/s: vLLM not run (it missed the SLO at a lower rate)")
                continue
            v = statistics.median(s.ttft_p99_s for s in runs["vllm"][rate])
            cells = []
            for engine in ("ours-chameleon", "ours-slora"):
                o = statistics.median(s.ttft_p99_s for s in runs[engine][rate])
                cells.append(f"{engine} {o / v:.2f}" if v > 0 else f"{engine} -")
            slo = "meets SLO" if v <= SLO_TTFT_S else "misses SLO"
            print(f"  {rate:5.1f} req/s: vLLM P99 {v:.3f} s ({slo}); " + ", ".join(cells))
    _report_steal()
    if args.json:
        Path(args.json).write_text(json.dumps({e: {str(r): [s.as_dict() for s in v] for r, v in by.items()}
                                               for e, by in runs.items()}, indent=1, default=str))


# ------------------------------------------------------------------------------------------------
# Profile: where our time goes on (A)
# ------------------------------------------------------------------------------------------------


class _Timer:
    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self._originals: list[tuple[Any, str, Any]] = []

    def restore(self) -> None:
        for owner, attr, fn in reversed(self._originals):
            if attr in vars(owner) and owner is not None and fn is None:
                delattr(owner, attr)
            elif fn is not None:
                setattr(owner, attr, fn)
        self._originals.clear()

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        fn = getattr(owner, attr)
        self._originals.append((owner, attr, vars(owner).get(attr) if isinstance(owner, type) else fn))

        def timed(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.total[label] = self.total.get(label, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)


def profile(args: argparse.Namespace, root: Path) -> None:
    """Wall time per component (accumulated timers around the functions named below)."""
    from transformers import AutoTokenizer

    import chameleon.executor.torch_executor as te
    import chameleon.lora.pool as pool
    import chameleon.model.llama as llama

    model = make_tiny_model(root / "model")
    adapters = {name: make_peft_adapter(model, root / name, r, OFFLINE_TARGETS, seed=10 + i)
                for i, (name, r) in enumerate(OFFLINE_ADAPTERS.items())}
    tok = AutoTokenizer.from_pretrained(model)
    n, m = (64, 16) if args.quick else (256, 64)
    for dtype in ("float32", "bfloat16"):
        core = ours_offline_core(model, adapters, dtype, 256)
        reqs = offline_requests(tok, n, m, [None, *adapters])
        for _ in range(2):  # warm-up: first-call costs of every shape
            ours_generate(core, reqs)
        timer = _Timer()
        ex = core.executor
        timer.wrap(core, "step", "step (all)")
        timer.wrap(core.scheduler, "schedule", "scheduler")
        timer.wrap(ex, "execute", "executor.execute")
        timer.wrap(core, "_process", "outputs: stop checks, detokenize")
        timer.wrap(te, "build_attention_metadata", "attention metadata")
        timer.wrap(ex.model.__class__, "__call__", "model: layers")
        timer.wrap(llama, "paged_attention", "  attention (cache write + attend)")
        timer.wrap(llama, "linear", "  linears (qkv, o, gate_up, down)")
        timer.wrap(pool.LoRABatch, "apply", "  LoRA deltas (o, down)")
        timer.wrap(pool.LoRABatch, "apply_group", "  LoRA deltas (q/k/v, gate/up: grouped)")
        timer.wrap(ex.model, "greedy_tokens", "LM head + greedy argmax")
        t, _ = ours_generate(core, reqs)
        print(f"\nprofile, ours, {dtype}, {n}x{m} mixed: {n * m / t:.0f} tok/s ({t:.2f} s incl. timer overhead)")
        step = timer.total["step (all)"]
        for label, v in timer.total.items():
            print(f"  {label:40} {v:7.3f} s  {v / step:6.1%}")
        timer.restore()
        del core
    print(f"\nmachine: {machine_line()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["offline", "online", "profile", "all"], nargs="?", default="offline")
    parser.add_argument("--peer-python", default=DEFAULT_PEER, help="python of the venv with vllm-cpu")
    parser.add_argument("--quick", action="store_true", help="smaller workloads, fewer runs (~3 minutes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--online-repeats", type=int, default=3)
    parser.add_argument("--rates", type=float, nargs="*", help="online request rates (req/s)")
    parser.add_argument("--duration", type=float)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--oracle-requests", type=int, default=64, help="requests per workload checked against PEFT")
    parser.add_argument("--vllm-bind", choices=["all", "auto"], default="all",
                        help="all: vLLM's OpenMP threads on every core; auto: vLLM's default (one core reserved)")
    parser.add_argument("--json", help="also write the raw numbers here")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "bench_peers_vllm.log",
                        help="vLLM's own output goes here")
    args = parser.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.oracle_requests = min(args.oracle_requests, 32)
    print(f"machine: {machine_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        root = Path(tmp)
        if args.what in ("offline", "all"):
            offline(args, root / "a")
        if args.what in ("online", "all"):
            online(args, root / "b")
        if args.what == "profile":
            profile(args, root / "p")


if __name__ == "__main__":
    main()
