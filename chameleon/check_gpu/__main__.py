"""GPU readiness check (SPEC §8): kernels vs reference, kernel roofline, engine parity, throughput.

    python -m chameleon.check_gpu [--dry-run] [--json OUT] [--quick]

On a CUDA machine it (a) checks the Triton SGMV shrink/expand kernels against the float64
reference and the torch path in fp16 and bf16 on mixed-rank segment batches, (b) times them with
`triton.testing.do_bench` (median) against the HBM roofline, the bandwidth being measured in the
same run by a large device-to-device copy, (c) runs the real engine on CUDA (Triton LoRA backend)
and compares its greedy tokens with transformers' `generate` on a tiny random Llama built in a
temp dir (LoRA adapters merged into transformers' weights), and (d) measures engine tokens/s.
`--dry-run` runs the same code on CPU, Triton interpreted, fp32, tiny shapes, perf_counter timing;
every number it prints is marked as a dry run. Needs only torch, triton, transformers,
safetensors, attrs. Exit 1 if a correctness check fails, 2 if there is no CUDA (without --dry-run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chameleon.check_gpu.engine import run_parity, run_throughput
from chameleon.check_gpu.kernels import run_kernel_checks
from chameleon.check_gpu.mode import Mode, make_mode, measure_bandwidth


def table_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(check, case, value, status) rows for the one printed table."""
    bw = res["bandwidth"]
    nominal = f" (nominal {bw['nominal_gbps']:.0f})" if bw["nominal_gbps"] else ""
    rows = [("bandwidth", f"D2D copy {bw['copy_mib']} MiB", f"{bw['measured_gbps']:.1f} GB/s{nominal}", "")]
    for k in res["kernels"]:
        case = f"{k['dtype']} T={k['tokens']} {k['in']}->{k['out']}"
        e = k["errors"]
        rows.append(
            (
                "kernel error",
                case,
                (
                    f"shrink {e['shrink_rel']:.1e} apply {e['apply_rel']:.1e} "
                    f"(tol {k['tol_rel']:.0e}; vs torch {e['triton_vs_torch_rel']:.1e})"
                ),
                "PASS" if k["passed"] else "FAIL",
            )
        )
        for op in ("shrink", "expand", "apply"):
            tr, to = k["timings"][f"triton_{op}"], k["timings"][f"torch_{op}"]
            rows.append(
                (
                    "kernel time",
                    f"{case} {op}",
                    (
                        f"triton {tr['ms'] * 1e3:.1f} us {tr['gbps']:.3g} GB/s "
                        f"= {100 * tr['roofline_frac']:.3g}% roofline | torch {to['ms'] * 1e3:.1f} us"
                    ),
                    "",
                )
            )
    p = res["parity"]
    rows.append(
        (
            "engine parity",
            f"fp32 {p['requests']} req x {p['new_tokens']} tok, base + r8/r16",
            f"{p['identical']}/{p['requests']} token-identical",
            "PASS" if p["passed"] else "FAIL",
        )
    )
    t = res["throughput"]
    rows.append(
        (
            "throughput",
            f"{t['dtype']} {t['requests']} req x {t['new_tokens']} tok",
            (
                f"base {t['base_tok_s']:.1f} tok/s, mixed {t['mixed_tok_s']:.1f} tok/s "
                f"(LoRA overhead {t['lora_overhead']:.2f}x)"
            ),
            "",
        )
    )
    return rows


def print_table(res: dict[str, Any]) -> None:
    """One table; every row carries DRY in its status column in a dry run."""
    rows = table_rows(res)
    dry = res["dry_run"]
    head = f"chameleon check_gpu on {res['device_name']}" + (
        " -- DRY RUN (CPU, Triton interpreted, numbers are NOT GPU numbers)" if dry else ""
    )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print(head)
    for check, case, value, status in rows:
        tag = (status + " DRY").strip() if dry else status
        print(f"{check:<{widths[0]}} | {case:<{widths[1]}} | {value:<{widths[2]}} | {tag}")
    print(f"overall: {'PASS' if res['passed'] else 'FAIL'}" + (" (dry run)" if dry else ""))


# --- main ---------------------------------------------------------------------------------------


def ensure_interpreter(dry_run: bool) -> None:
    """In a dry run the kernels must be defined under TRITON_INTERPRET=1: set it, or re-exec if
    chameleon.lora.triton_ops was already imported without it."""
    if not dry_run:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    mod = sys.modules.get("chameleon.lora.triton_ops")
    if mod is not None and not getattr(mod, "INTERPRETED", False):
        os.execv(sys.executable, [sys.executable, "-m", "chameleon.check_gpu", *sys.argv[1:]])


def quiet_transformers() -> None:
    """No progress bars or info lines from transformers: the table is the output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chameleon.check_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes, fp32")
    p.add_argument("--json", type=Path, help="write every number here")
    p.add_argument("--quick", action="store_true", help="fewer shapes and a shorter throughput run")
    return p.parse_args(argv)


def run_all(mode: Mode) -> dict[str, Any]:
    """All four checks; `passed` is the conjunction of the correctness checks."""
    clock = [time.perf_counter()]
    elapsed: dict[str, float] = {}

    def lap(name: str) -> None:
        clock.append(time.perf_counter())
        elapsed[name] = clock[-1] - clock[-2]

    bw = measure_bandwidth(mode)
    kernels = run_kernel_checks(mode, bw["measured_gbps"])
    lap("kernels_s")
    with tempfile.TemporaryDirectory(prefix="chameleon-check-gpu-") as tmp:
        parity = run_parity(Path(tmp), mode)
        lap("parity_s")
        tput = run_throughput(Path(tmp), mode)
        lap("throughput_s")
    name = "cpu (dry run)" if mode.dry_run else torch.cuda.get_device_name(mode.device)
    passed = all(k["passed"] for k in kernels) and parity["passed"]
    return {
        "dry_run": mode.dry_run,
        "quick": mode.quick,
        "device_name": name,
        "torch": torch.__version__,
        "bandwidth": bw,
        "kernels": kernels,
        "parity": parity,
        "throughput": tput,
        "elapsed": elapsed,
        "passed": passed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_interpreter(args.dry_run)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_transformers()
    if not args.dry_run and not torch.cuda.is_available():
        print("check_gpu: no CUDA device here; use --dry-run to exercise the same code on CPU", file=sys.stderr)
        return 2
    from chameleon.lora import triton_ops

    if args.dry_run != triton_ops.INTERPRETED:
        print("check_gpu: triton_ops was defined with the wrong TRITON_INTERPRET setting", file=sys.stderr)
        return 2
    with torch.inference_mode():
        res = run_all(make_mode(args.dry_run, args.quick))
    print_table(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
