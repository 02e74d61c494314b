"""`python -m chameleon.check_gpu --dry-run` end to end: the GPU check's own code paths on CPU.

The real Triton kernels run under the interpreter and the real engine runs on CPU, so a broken
check script is found here rather than on a lent GPU machine, where time is scarce.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~17 s of CPU, 35 s wall on a loaded 2-core machine
def test_dry_run_passes(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "chameleon.check_gpu", "--dry-run", "--json", str(out)],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["passed"] is True
    assert res["kernels"] and all(k["passed"] for k in res["kernels"])
    assert all(k["errors"]["apply_rel"] <= k["tol_rel"] for k in res["kernels"])
    assert res["parity"]["passed"] is True and res["parity"]["mismatched_requests"] == []
    assert res["throughput"]["base_tok_s"] > 0 and res["throughput"]["mixed_tok_s"] > 0
    assert "DRY RUN" in proc.stdout
