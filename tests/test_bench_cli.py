"""`chameleon bench` end to end on the simulator: valid JSON with every key, a table, plots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from chameleon.harness.bench import add_bench_arguments, run_bench
from chameleon.harness.metrics import HEADLINE_KEYS
from chameleon.sim.profile import CostProfile, ProfileEngine


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def _strict_json(path: Path) -> dict:
    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_short_sim_bench_writes_results_table_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, plots = tmp_path / "results.json", tmp_path / "plots"
    args = _args(
        "--executor", "sim", "--gpu", "A40", "--model", "llama-7b",
        "--policies", "slora,fifo-lru", "--policy", "fifo-lru=fifo:lru",
        "--rates", "1,3", "--duration", "20", "--workload", "slora", "--adapters", "20", "--alpha", "0.5",
        "--refine-steps", "1", "--seed", "7", "--out", str(out), "--plots", str(plots), "--no-progress",
    )  # fmt: skip
    assert run_bench(args) == 0
    table = capsys.readouterr().out
    assert table.startswith("SIMULATED")
    assert "slora" in table and "fifo-lru" in table and "Throughput at SLO" in table

    data = _strict_json(out)
    assert data["simulated"] is True and "SIMULATED" in data["label"]
    assert data["policies"] == {
        "slora": {"scheduler": "fifo", "adapter_cache": "slora"},
        "fifo-lru": {"scheduler": "fifo", "adapter_cache": "lru"},
    }
    for policy in ("slora", "fifo-lru"):
        runs = data["results"][policy]
        assert {"1", "3"} <= set(runs)
        for run in runs.values():
            assert set(HEADLINE_KEYS) <= set(run)
            assert run["num_requests"] > 0
            assert 0.0 <= run["adapter_hit_rate"] <= 1.0
        assert isinstance(data["throughput_at_slo"][policy], float)
    # An idle cache can only help the hit rate (same workload, same seed).
    assert data["results"]["fifo-lru"]["3"]["adapter_hit_rate"] >= data["results"]["slora"]["3"]["adapter_hit_rate"]
    assert data["results"]["slora"]["3"]["adapter_hit_rate"] < 1.0
    names = {p.name for p in plots.iterdir()}
    assert names == {"ttft_cdf.png", "p99_ttft_vs_rate.png", "hit_rate_vs_rate.png", "memory_over_time.png"}
    assert all((plots / n).stat().st_size > 1000 for n in names)


def test_bench_with_a_cost_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "profile.json"
    CostProfile(
        prefill_a_s=1e-3,
        prefill_b_s_per_token=5e-6,
        decode_c_s=1e-3,
        decode_d_s_per_seq=2e-4,
        decode_e_s_per_ctx_token=1e-8,
        lora_s_per_token_rank=1e-8,
        load_Bps=2e9,
        engine=ProfileEngine(4096, 16, 8192, 8192, 512, 512, 1000, 32, 2048),
    ).to_json(profile)
    out = tmp_path / "r.json"
    args = _args(
        "--profile", str(profile), "--policies", "slora", "--rates", "20", "--duration", "2",
        "--workload", "slora", "--adapters", "4", "--input-range", "8,64", "--output-range", "4,16",
        "--refine-steps", "0", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert run_bench(args) == 0
    data = _strict_json(out)
    assert data["simulated"] is True and data["cost_model"] == "profile"
    assert data["results"]["slora"]["20"]["num_finished"] == data["results"]["slora"]["20"]["num_requests"]
    assert "SIMULATED" in capsys.readouterr().out


def test_unknown_policy_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_bench(_args("--policies", "nope", "--no-progress")) == 2
    assert "unknown policies" in capsys.readouterr().err


def test_paper_workload_needs_a_multiple_of_five_adapters(capsys: pytest.CaptureFixture[str]) -> None:
    args = _args("--policies", "slora", "--adapters", "7", "--duration", "5", "--rates", "1", "--no-progress")
    assert run_bench(args) == 2
    assert "multiple of 5" in capsys.readouterr().err


def test_real_executor_needs_a_model_dir(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_bench(_args("--executor", "real", "--policies", "slora", "--no-progress")) == 2
    assert "--model" in capsys.readouterr().err


def test_real_executor_with_an_adapter_dir(
    tmp_path: Path, tiny_llama: Path, tiny_adapters: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--executor real`: the tiny model and real PEFT adapters, bound onto the workload's names."""
    adapter_dir = next(iter(tiny_adapters.values())).parent
    out = tmp_path / "real.json"
    args = _args(
        "--executor", "real", "--model", str(tiny_llama), "--adapter-dir", str(adapter_dir),
        "--policies", "slora,chameleon", "--workload", "slora", "--adapters", "6", "--rates", "4",
        "--duration", "2", "--input-range", "8,32", "--output-range", "4,12", "--refine-steps", "0",
        "--seed", "3", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert run_bench(args) == 0
    table = capsys.readouterr().out
    assert table.startswith("REAL") and "SIMULATED" not in table
    data = _strict_json(out)
    assert data["simulated"] is False and data["adapter_dir"] == str(adapter_dir)
    for policy in ("slora", "chameleon"):
        run = data["results"][policy]["4"]
        assert run["num_requests"] > 0 and run["num_finished"] == run["num_requests"]
        assert run["adapter_hits"] + run["adapter_misses"] > 0  # adapters were really used


def test_real_executor_refuses_a_dir_without_adapters(
    tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args("--executor", "real", "--model", str(tiny_llama), "--adapter-dir", str(tmp_path), "--no-progress")
    assert run_bench(args) == 2
    assert "no PEFT adapter subdirectories" in capsys.readouterr().err


def test_table_seconds_line_up() -> None:
    from chameleon.harness.report import _sig

    assert [_sig(v) for v in (0.0123, 0.784, 9.9994, 12.04, 112.0, float("inf"), None)] == [
        "0.012", "0.784", "9.999", "12.0", "112.0", "inf", "-",
    ]  # fmt: skip
