"""Faults that used to change outputs, freeze or kill the process (issue 12): adapter files rewritten or
truncated after loading, and catastrophic-backtracking regexes in adapter configs. Whatever could
kill or freeze the interpreter runs in a subprocess with a timeout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

from chameleon.errors import AdapterLoadError, UnsafeAdapterPatternError
from chameleon.lora import safe_regex
from chameleon.lora.peft_adapter import BaseModelSpec, load_peft_adapter
from chameleon.lora.peft_config import _parse_config

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"q_proj": (16, 16), "k_proj": (16, 8), "v_proj": (16, 8), "o_proj": (16, 16),
          "gate_proj": (16, 32), "up_proj": (16, 32), "down_proj": (32, 16)}
BASE = BaseModelSpec(num_layers=2, module_shapes=SHAPES, dtype=torch.float32)
KEY = "base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight"
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(2):
        out[KEY.format(i=i, ab="A")] = torch.randn(2, 16, generator=g)
        out[KEY.format(i=i, ab="B")] = torch.randn(16, 2, generator=g)
    return out


def _write(path: Path, seed: int = 0, config: dict[str, object] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config or CONFIG))
    safetensors.torch.save_file(_tensors(seed), str(path / "adapter_model.safetensors"))
    return path


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


# --- adapter files changed after loading ---------------------------------------------------------


def test_rewriting_the_file_in_place_changes_nothing_loaded(tmp_path: Path) -> None:
    path = _write(tmp_path / "ad")
    adapter = load_peft_adapter("ad", path, BASE, max_lora_rank=8)
    before = {k: (w.a.clone(), w.b_t.clone()) for k, w in adapter.weights.items()}
    st_file = path / "adapter_model.safetensors"
    _write(tmp_path / "other", seed=1)
    new_bytes = (tmp_path / "other" / "adapter_model.safetensors").read_bytes()
    assert len(new_bytes) == st_file.stat().st_size  # same layout, other values
    with st_file.open("r+b") as f:  # in place: same inode, as a careless `cp` or an editor would
        f.write(new_bytes)
    for k, w in adapter.weights.items():
        assert torch.equal(w.a, before[k][0]) and torch.equal(w.b_t, before[k][1])
    # A reload from disk sees other bytes, so another hash: the executor refuses it (AdapterLoadError).
    assert load_peft_adapter("ad", path, BASE, max_lora_rank=8).content_hash != adapter.content_hash


def test_truncating_the_file_after_loading_does_not_kill_the_process(tmp_path: Path) -> None:
    path = _write(tmp_path / "ad")
    result = _run(f"""
        import os, torch
        from chameleon.lora.peft_adapter import BaseModelSpec, load_peft_adapter
        base = BaseModelSpec(num_layers=2, module_shapes={SHAPES!r}, dtype=torch.float32)
        adapter = load_peft_adapter("ad", {str(path)!r}, base, max_lora_rank=8)
        total = sum(float(w.a.sum()) + float(w.b_t.sum()) for w in adapter.weights.values())
        os.truncate({str(path / "adapter_model.safetensors")!r}, 0)
        again = sum(float(w.a.sum()) + float(w.b_t.sum()) for w in adapter.weights.values())
        print("OK" if again == total else "CHANGED")
    """)
    assert result.returncode == 0, f"rc {result.returncode} (-7 is SIGBUS): {result.stderr[-2000:]}"
    assert result.stdout.strip() == "OK"


def test_truncated_or_grown_file_is_a_load_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "ad")
    st_file = path / "adapter_model.safetensors"
    data = st_file.read_bytes()
    st_file.write_bytes(data + b"\0" * 64)  # more bytes than the header describes
    with pytest.raises(AdapterLoadError):
        load_peft_adapter("ad", path, BASE, max_lora_rank=8)
    st_file.write_bytes(data[: len(data) - 10])
    with pytest.raises(AdapterLoadError):
        load_peft_adapter("ad", path, BASE, max_lora_rank=8)


# --- hostile regexes ----------------------------------------------------------------------------

NESTED = r"(a+)+$"
COUNTED = r"(.*a){20}"
OVERLAP = r"(.|.)*_\d"  # passes the guard (no nested repeat); only the match timeout stops it
HOSTILE = {
    "nested": {"target_modules": NESTED},
    "counted": {"target_modules": COUNTED},
    "overlap_timeout": {"target_modules": OVERLAP},
    "rank_pattern": {"rank_pattern": {"(x+x+)+y": 4}},
    "alpha_pattern_timeout": {"alpha_pattern": {OVERLAP: 4}},
    "layers_pattern": {"layers_to_transform": [0], "layers_pattern": "(a*)*"},
    "exclude_timeout": {"exclude_modules": OVERLAP},
    "backreference": {"target_modules": r"(q)\1_proj"},
    "huge_count": {"target_modules": r"a{100000}"},
    "too_long": {"target_modules": "q" * 5000},
}


def test_pathological_patterns_are_refused_quickly_in_a_subprocess(tmp_path: Path) -> None:
    """On the old code several of these freeze the interpreter (the subprocess then times out)."""
    paths = {name: str(_write(tmp_path / name, config={**CONFIG, **extra})) for name, extra in HOSTILE.items()}
    result = _run(f"""
        import time, torch
        from chameleon.lora.peft_adapter import BaseModelSpec, load_peft_adapter
        base = BaseModelSpec(num_layers=2, module_shapes={SHAPES!r}, dtype=torch.float32)
        for name, path in {paths!r}.items():
            t = time.perf_counter()
            try:
                load_peft_adapter(name, path, base, max_lora_rank=8)
                outcome = "loaded"
            except Exception as e:
                outcome = type(e).__name__
            print(name, outcome, round(time.perf_counter() - t, 3))
    """, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split() for line in result.stdout.strip().splitlines()]
    assert [n for n, _, _ in lines] == list(HOSTILE)
    for name, outcome, seconds in lines:
        assert outcome == "UnsafeAdapterPatternError", (name, outcome)
        assert float(seconds) < 5.0, (name, seconds)


def test_unsafe_pattern_error_names_the_adapter_and_is_a_validation_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "ad", config={**CONFIG, "target_modules": NESTED})
    with pytest.raises(UnsafeAdapterPatternError, match=r"'ad'.*nested inside a repeat"):
        load_peft_adapter("ad", path, BASE, max_lora_rank=8)
    path = _write(tmp_path / "slow", config={**CONFIG, "target_modules": OVERLAP})
    with pytest.raises(UnsafeAdapterPatternError, match=r"'slow'.*timed out"):
        load_peft_adapter("slow", path, BASE, max_lora_rank=8)


NAMES = [f"model.layers.{i}.{p}.{m}" for i in (0, 1, 12) for p, m in
         [("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj"), ("mlp", "up_proj")]]


@pytest.mark.parametrize("pattern", [r".*\.(q|v)_proj", r"model\.layers\.1\.(self_attn\.(q|k)|mlp\.up)_proj",
                                     r".*layers\.\d+\.mlp\..*", r"(?!.*down).*_proj"])
def test_legitimate_patterns_keep_re_fullmatch_semantics(pattern: str) -> None:
    config = _parse_config({"peft_type": "LORA", "target_modules": pattern}, "who")
    assert [config.targets(n) for n in NAMES] == [re.fullmatch(pattern, n) is not None for n in NAMES]


def test_rank_pattern_keeps_peft_get_pattern_key_semantics() -> None:
    raw = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "down_proj"],
           "rank_pattern": {r"layers\.1\.mlp\.down_proj": 4, "q_proj": 2}}
    config = _parse_config(raw, "who")
    assert config.rank_for("model.layers.1.mlp.down_proj") == 4
    assert config.rank_for("model.layers.12.mlp.down_proj") == 8  # `(.*\.)?(key)$` is anchored at a dot
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 2


def test_all_matches_of_one_load_share_one_budget() -> None:
    with safe_regex.deadline(5.0):
        assert safe_regex.fullmatch(r".*_proj", "model.layers.0.self_attn.q_proj")
    with safe_regex.deadline(0.0), pytest.raises(UnsafeAdapterPatternError, match="took too long"):
        safe_regex.fullmatch(r".*_proj", "model.layers.0.self_attn.q_proj")
    assert safe_regex.fullmatch(r".*_proj", "model.layers.0.self_attn.q_proj")  # budget ends with the block
