"""The simulator's memory model knows the KV cache techniques (issue 16): shared prefixes from the
workload hit the real prefix cache and the cost model charges only the uncached tokens; the KV dtype
sets the bytes per token; a bounded window's evicted tokens are not read. No torch here."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from chameleon.config import EngineConfig, KVWindow
from chameleon.executor.base import StepInput
from chameleon.harness.bench import add_bench_arguments, run_bench
from chameleon.harness.bench_workload import clip_lengths
from chameleon.harness.driver import prompt_tokens, run_workload
from chameleon.harness.workload import AdapterSpec, Workload, WorkloadRequest, slora_workload, with_system_prompts
from chameleon.sampling_params import SamplingParams
from chameleon.sim.engine import build_sim_engine
from chameleon.sim.hardware import LLAMA_7B


def _req(rid: str, prompt: int, adapter: str | None = "a", **kw: object) -> WorkloadRequest:
    return WorkloadRequest(rid, 0.0, prompt, 4, adapter, **kw)  # type: ignore[arg-type]


# --- workloads with shared prefixes ------------------------------------------------------------------


def test_system_prompts_are_shared_per_adapter_and_prompts_are_otherwise_distinct() -> None:
    w = Workload([_req("r1", 300), _req("r2", 100), _req("r3", 300, "b"), _req("r4", 300, None), _req("r5", 1)],
                 [AdapterSpec("a", 8), AdapterSpec("b", 8)])  # fmt: skip
    s = with_system_prompts(w, 200)
    r1, r2, r3, r4, r5 = s.requests
    assert (r1.prefix_id, r1.prefix_len, r2.prefix_len) == ("system:a", 200, 99)  # r2 keeps one token of its own
    assert r3.prefix_id == "system:b" and r4.prefix_id == "system:<base>" and r5.prefix_id is None
    assert [r.prompt_len for r in s.requests] == [r.prompt_len for r in w.requests]
    p1, p2, p3 = (prompt_tokens(r, 32000) for r in (r1, r2, r3))
    assert p1[:99] == p2[:99] and p1[99] != p2[99] and p1[200:] != prompt_tokens(r3, 32000)[200:]
    assert p1[:200] != p3[:200]
    assert len(p1) == 300 and all(2 <= t < 32000 for t in p1)
    assert prompt_tokens(_req("x", 50), 32000) != prompt_tokens(_req("y", 50), 32000)  # no accidental sharing
    assert prompt_tokens(r1, 32000) == p1  # reproducible
    assert with_system_prompts(w, 0) is w
    with pytest.raises(ValueError):
        with_system_prompts(w, -1)


def test_prefix_fields_round_trip_validate_and_clip() -> None:
    w = with_system_prompts(Workload([_req("r1", 300), _req("r2", 40)], [AdapterSpec("a", 8)]), 64)
    buf = io.StringIO()
    w.write_jsonl(buf)
    buf.seek(0)
    assert Workload.read_jsonl(buf) == w
    old = '{"request_id": "x", "arrival_s": 0.0, "prompt_len": 5, "output_len": 2, "adapter": null}'
    assert Workload.read_jsonl(
        io.StringIO(json.dumps({"type": "chameleon.harness.workload", "adapters": []}) + "\n" + old)
    )
    for bad in ({"prefix_len": 5}, {"prefix_id": "p"}, {"prefix_id": "p", "prefix_len": 300}):
        with pytest.raises(ValueError, match="prefix"):
            Workload([_req("r", 300, **bad)], [AdapterSpec("a", 8)])
    clipped = clip_lengths(w, 32, None).requests
    assert [(r.prompt_len, r.prefix_len) for r in clipped] == [(32, 31), (32, 31)]
    assert clip_lengths(w, 1, None).requests[0].prefix_id is None


# --- the simulator -------------------------------------------------------------------------------


def _sim(**kw: object) -> tuple[object, object]:
    config = EngineConfig(max_num_batched_tokens=4096, **kw)  # type: ignore[arg-type]
    return build_sim_engine("A40", "llama-7b", config, adapters=[AdapterSpec("a", 16)])


def test_sim_costs_only_the_uncached_prefill_tokens() -> None:
    core, clock = _sim(enable_prefix_caching=True)
    shapes: list[StepInput] = []
    core.observe_steps(shapes.append)  # type: ignore[attr-defined]
    prompt = list(range(2, 1002))
    times = []
    for rid in ("first", "second"):
        core.add_request(rid, prompt, SamplingParams(max_tokens=1), adapter="a")  # type: ignore[attr-defined]
        start = clock.now()  # type: ignore[attr-defined]
        while core.has_unfinished_requests():  # type: ignore[attr-defined]
            core.step()  # type: ignore[attr-defined]
        times.append(clock.now() - start)  # type: ignore[attr-defined]
    first, second = shapes[0].sequences[0], shapes[-1].sequences[0]
    assert len(first.token_ids) == 1000 and first.start_pos == 0
    assert len(second.token_ids) == 1000 - 992 and second.start_pos == 992  # 62 blocks of 16 hit
    shape = core.executor.batch_shape(shapes[-1])  # type: ignore[attr-defined]
    assert shape.prefill_tokens == 8 and shape.context_tokens == 1000  # the cached prefix is read, not computed
    assert times[1] < times[0] / 3
    assert core.stats().prefix.hit_tokens == 992  # type: ignore[attr-defined]


def test_sim_bytes_per_kv_token_follow_the_kv_dtype() -> None:
    auto, _ = _sim()
    blocks = {kv: _sim(kv_cache_dtype=kv)[0].blocks.num_blocks for kv in ("int8", "fp8_e4m3")}  # type: ignore[attr-defined]
    base = auto.blocks.num_blocks  # type: ignore[attr-defined]
    g = LLAMA_7B.geometry
    assert g.kv_cache_bytes_per_token(2, "int8") == 2 * 32 * 32 * 130  # codes + fp16 scales
    assert blocks["int8"] == blocks["fp8_e4m3"] and blocks["int8"] / base >= 1.95  # 256 / 130 = 1.97x of fp16
    with pytest.raises(ValueError):
        g.kv_cache_bytes_per_token(2, "int4")


def test_sim_reads_only_the_window() -> None:
    core, _clock = _sim(kv_window=KVWindow(recent_tokens=64))
    shapes: list[StepInput] = []
    core.observe_steps(shapes.append)  # type: ignore[attr-defined]
    core.add_request("r", list(range(2, 202)), SamplingParams(max_tokens=300, ignore_eos=True))  # type: ignore[attr-defined]
    while core.has_unfinished_requests():  # type: ignore[attr-defined]
        core.step()  # type: ignore[attr-defined]
    last = core.executor.batch_shape(shapes[-1])  # type: ignore[attr-defined]
    assert last.decode_seqs == 1 and last.context_tokens <= 16 + 64 + 16 + 1  # sinks + window, not 500 tokens
    assert core.stats().kv.window_evicted_blocks > 0 and core.blocks.num_in_use == 0  # type: ignore[attr-defined]


def test_workload_prefixes_hit_in_the_sim_and_save_prefill_time() -> None:
    base = slora_workload(num_adapters=4, alpha=1.0, rate=4.0, cv=1.0, duration_s=30, input_range=(300, 600),
                          output_range=(8, 32), ranks=(16,), seed=3)  # fmt: skip
    shared = with_system_prompts(base, 256)
    busy, hits = {}, {}
    for name, w, on in (("off", shared, False), ("plain", base, True), ("on", shared, True)):
        core, clock = build_sim_engine("A40", "llama-7b", EngineConfig(enable_prefix_caching=on), adapters=w.adapters)
        records = run_workload(core, w, clock)
        assert all(r.finish_reason == "length" for r in records)
        busy[name], hits[name] = core.executor.stats.busy_s, core.stats().prefix.hit_tokens
    assert hits["plain"] == 0  # unique prompts never share by accident
    assert hits["on"] > 0.3 * sum(r.prefix_len for r in shared.requests)
    assert busy["on"] < busy["off"]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_reports_prefix_hits_blocks_and_requests_in_flight(tmp_path: Path) -> None:
    common = ("--workload", "slora", "--adapters", "8", "--rates", "2", "--duration", "20", "--refine-steps", "0",
              "--no-progress", "--policies", "chameleon", "--system-prompt-len", "128")  # fmt: skip
    runs = {}
    for name, extra in (
        ("off", ("--prefix-caching", "off")),
        ("int8", ("--prefix-caching", "on", "--kv-cache-dtype", "int8")),
    ):
        out = tmp_path / f"{name}.json"
        assert run_bench(_args(*common, *extra, "--out", str(out))) == 0
        data = json.loads(out.read_text())
        assert data["kv"]["kv_cache_dtype"] == ("int8" if name == "int8" else "auto")
        runs[name] = data["results"]["chameleon"]["2"]
    assert runs["off"]["prefix_hit_rate"] is None and runs["int8"]["prefix_hit_rate"] > 0
    assert runs["int8"]["kv_blocks"] > 1.9 * runs["off"]["kv_blocks"]
    assert runs["off"]["mean_running"] > 0 and runs["off"]["max_running"] >= 1
    with pytest.raises(SystemExit):
        _args("--kv-cache-dtype", "int4")


def test_kv_option_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from chameleon.sim.profile import CostProfile, ProfileEngine

    profile = CostProfile(
        prefill_a_s=1e-3, prefill_b_s_per_token=5e-6, decode_c_s=1e-3, decode_d_s_per_seq=2e-4,
        decode_e_s_per_ctx_token=1e-8, lora_s_per_token_rank=1e-8, load_Bps=2e9,
        engine=ProfileEngine(4096, 16, 8192, 8192, 512, 512, 1000, 32, 2048),
    )  # fmt: skip
    with pytest.raises(ValueError, match="kv_cache_dtype"):  # a profile fixes the block size it measured
        build_sim_engine(None, None, EngineConfig(kv_cache_dtype="int8"), profile=profile)
    bad = ("--workload", "slora", "--adapters", "2", "--rates", "1", "--duration", "2", "--no-progress")
    assert run_bench(_args(*bad, "--system-prompt-len", "-1")) == 2
    assert "system prompt" in capsys.readouterr().err
