"""`chameleon bench` output: the JSON document, the printed table and the plots.

Every simulated figure says so (`"simulated": true`, a SIMULATED banner and plot titles).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # types only: bench.py imports this module
    from chameleon.harness.bench import Bench, EngineFactory


def _finite(value: Any) -> Any:
    """Strict JSON: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


def results_json(
    args: argparse.Namespace,
    factory: EngineFactory,
    table: Mapping[str, tuple[str, str]],
    policies: Sequence[str],
    rates: Sequence[float],
    bench: Bench,
    tput: Mapping[str, float],
) -> dict[str, Any]:
    per_policy: dict[str, dict[str, Any]] = {}
    for policy in policies:
        runs = sorted((r for (p, _), r in bench.results.items() if p == policy), key=lambda r: r.rate)
        per_policy[policy] = {_rate_key(r.rate): {**r.summary.as_dict(), **r.extra} for r in runs}
    return _finite(
        {
            "simulated": factory.simulated,
            "label": factory.label,
            "executor": args.executor,
            **factory.description,
            "workload": {
                "kind": args.workload,
                "trace": args.trace,
                "duration_s": args.duration,
                "adapters": args.adapters,
                "alpha": args.alpha,
                "cv": args.cv,
                "seed": args.seed,
                "max_prompt_len": min(args.max_prompt_len or factory.max_model_len - 1, factory.max_model_len - 1),
                "max_output_len": args.max_output_len,
                "length_scale": bench.length_scale,
                "system_prompt_len": getattr(args, "system_prompt_len", 0),
            },
            "kv": {
                "prefix_caching": getattr(args, "prefix_caching", None),
                "kv_cache_dtype": getattr(args, "kv_cache_dtype", "auto"),
            },
            "slo": {"ttft_s": args.slo_ttft, "tbt_s": args.slo_tbt},
            "rates": list(rates),
            "policies": {p: {"scheduler": table[p][0], "adapter_cache": table[p][1]} for p in policies},
            "results": per_policy,
            "throughput_at_slo": dict(tput),
        }
    )


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value * scale:.{digits}f}"


def _sig(value: float | None) -> str:
    """Seconds, in a column that lines up: milliseconds below 10 s (a tiny model's TTFTs), tenths above
    (overloaded runs reach minutes)."""
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def format_table(
    title: str, bench: Bench, policies: Sequence[str], rates: Sequence[float], tput: Mapping[str, float]
) -> str:
    head = (
        f"{'policy':<20} {'rate':>6} {'TTFT p50':>9} {'p90':>8} {'p99':>8} {'TBT p99ms':>8} "
        f"{'thpt':>6} {'SLO%':>6} {'hit%':>6} {'queue%':>7} {'pfx%':>6} {'run':>6}"
    )
    lines = [title, head, "-" * len(head)]
    for policy in policies:
        for rate in rates:
            result = bench.results[(policy, rate)]
            s, extra = result.summary, result.extra
            lines.append(
                f"{policy:<20} {rate:>6g} {_sig(s.ttft_p50_s):>9} {_sig(s.ttft_p90_s):>8} {_sig(s.ttft_p99_s):>8} "
                f"{_fmt(s.tbt_p99_s, 1e3, 0):>8} {_fmt(s.throughput_rps):>6} {_fmt(s.slo_attainment, 100, 1):>6} "
                f"{_fmt(s.adapter_hit_rate, 100, 1):>6} {_fmt(s.queue_share, 100, 1):>7} "
                f"{_fmt(extra.get('prefix_hit_rate'), 100, 1):>6} {_fmt(extra.get('mean_running'), 1, 1):>6}"
            )
    lines.append(
        "TTFT in seconds, TBT in ms, throughput in requests/s; hit%: adapter hits, pfx%: prompt tokens found in the "
        "prefix cache, run: mean requests running per iteration. Throughput at SLO (P99 TTFT <= SLO): "
        + ", ".join(f"{p} {tput[p]:.2f} rps" for p in policies)
    )
    return "\n".join(lines)


def write_plots(
    directory: Path, title: str, bench: Bench, policies: Sequence[str], rates: Sequence[float]
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    # TTFT CDFs per policy, one panel per rate. Unserved requests (TTFT = inf) keep a curve below 1.
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        for policy in policies:
            ttft = sorted(r.ttft_s for r in bench.results[(policy, rate)].records)
            n = len(ttft)
            finite = [t for t in ttft if math.isfinite(t)]
            ax.step(finite, [(i + 1) / n for i in range(len(finite))], where="post", label=policy)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("TTFT (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{rate:g} rps")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title}\nTTFT CDF", fontsize=9)
    paths.append(_save(fig, directory / "ttft_cdf.png"))
    for key, ylabel, name, log in (
        ("ttft_p99_s", "P99 TTFT (s)", "p99_ttft_vs_rate.png", True),
        ("adapter_hit_rate", "adapter hit rate", "hit_rate_vs_rate.png", False),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for policy in policies:
            runs = sorted((r for (p, _), r in bench.results.items() if p == policy), key=lambda r: r.rate)
            ys = [getattr(r.summary, key) for r in runs]
            ax.plot(
                [r.rate for r in runs],
                [math.nan if y is None or math.isinf(y) else y for y in ys],
                marker="o",
                label=policy,
            )
        if not log:
            ax.set_ylim(0.0, 1.05)
        if log:
            ax.set_yscale("log")
            ax.axhline(bench.args.slo_ttft, color="grey", linestyle="--", label="TTFT SLO")
        ax.set_xlabel("request rate (rps)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{ylabel} vs rate", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend()
        paths.append(_save(fig, directory / name))
    from chameleon.harness.report_memory import memory_plot

    path = memory_plot(directory / "memory_over_time.png", title, bench, policies, rates)
    if path is not None:
        paths.append(path)
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------
