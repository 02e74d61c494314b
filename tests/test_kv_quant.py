"""Quantized KV: the block count for one budget, round-trip error, and engine outputs (docs/kv_cache.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chameleon import EngineConfig
from chameleon.engine.factory import build_core, memory_budget
from chameleon.errors import ConfigError
from chameleon.model.kv_quant import QuantizedKVCache, fp8_supported, read_kv, write_kv
from chameleon.model.loader import load_hf_config
from chameleon.model.spec import model_spec_from_config
from tests.test_model_parity import run_core, workload


def test_int8_block_count_for_the_same_budget(smollm2_path: Path) -> None:
    spec = model_spec_from_config(load_hf_config(smollm2_path))
    cpu = torch.device("cpu")

    def blocks(dtype: torch.dtype, kv: str) -> int:
        cfg = EngineConfig(device_memory_bytes=512 << 20, kv_cache_dtype=kv)  # type: ignore[arg-type]
        return memory_budget(cfg, spec, dtype, cpu, reserve=0)[1]

    int8, fp16, fp32 = blocks(torch.float32, "int8"), blocks(torch.float16, "auto"), blocks(torch.float32, "auto")
    assert int8 >= 1.9 * fp16 and int8 >= 3.8 * fp32, (int8, fp16, fp32)


@pytest.mark.parametrize("mode", ["int8", "fp8_e4m3"])
def test_round_trip_error_is_small(mode: str) -> None:
    if mode == "fp8_e4m3" and not fp8_supported(torch.device("cpu")):
        pytest.skip("no float8 in this torch")
    torch.manual_seed(0)
    cache = QuantizedKVCache(32, 2, 64, mode, torch.device("cpu"))  # type: ignore[arg-type]
    x = torch.randn(8, 2, 64) * torch.logspace(-3, 2, 8)[:, None, None]  # scales per token vary widely
    slots = torch.tensor([3, 9, 1, 30, 31, 0, 7, 12])
    write_kv(cache, slots, x)
    back = read_kv(cache, slots, torch.float32)
    rel = ((back - x).norm(dim=-1) / x.norm(dim=-1)).max().item()
    assert rel < (0.01 if mode == "int8" else 0.05), rel


def test_int8_engine_runs_and_mostly_agrees(tiny_llama: Path) -> None:
    """Random tiny weights are a harsh case; the quality figures on SmolLM2 are in docs/benchmarks.md."""
    exact = build_core(tiny_llama, EngineConfig(dtype="float32", block_size=4))
    quant = build_core(tiny_llama, EngineConfig(dtype="float32", block_size=4, kv_cache_dtype="int8"))
    assert quant.blocks.num_blocks > 3 * exact.blocks.num_blocks
    prompts, max_tokens = workload(exact.limits.vocab_size, n=8)
    a, b = run_core(exact, prompts, max_tokens), run_core(quant, prompts, max_tokens)
    first = sum(x[0] == y[0] for x, y in zip(a, b, strict=True))
    assert first >= 6, (a, b)
    assert quant.stats().kv.blocks_in_use == 0


def test_fp8_refused_where_unsupported(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import chameleon.model.kv_quant as kq

    monkeypatch.setattr(kq, "fp8_supported", lambda device: False)
    with pytest.raises(ConfigError):
        build_core(tiny_llama, EngineConfig(dtype="float32", kv_cache_dtype="fp8_e4m3"))
