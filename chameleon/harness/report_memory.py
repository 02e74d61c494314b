"""A Fig. 6-style plot: KV, adapter and idle device memory over time, one panel per policy.

The paper's Fig. 6 shows idle memory that is usually abundant and "drastically drops during load
spikes". We draw the runs of `slora` and `chameleon` (or, if absent, the first two policies) at
the highest rate, from the samples `Bench.run` takes with `--plots` (stacked: KV, adapters, idle).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chameleon.harness.bench import Bench

GiB = float(1 << 30)


def memory_plot(path: Path, title: str, bench: Bench, policies: Sequence[str], rates: Sequence[float]) -> Path | None:
    """Write the plot; None when no run has memory samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in ("slora", "chameleon") if p in policies] or list(policies[:2])
    rate = max(rates)
    runs = [bench.results[(p, rate)] for p in shown if (p, rate) in bench.results]
    runs = [r for r in runs if r.memory]
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3 * len(runs)), squeeze=False, sharex=True)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        t = [m[0] for m in run.memory]
        kv, adapters, idle = ([m[i] / GiB for m in run.memory] for i in (1, 2, 3))
        ax.stackplot(t, kv, adapters, idle, labels=("KV cache", "adapters", "idle"), alpha=0.8)
        ax.set_ylabel("GiB")
        ax.set_title(f"{run.policy} @ {rate:g} rps", fontsize=9)
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(f"{title}\ndevice memory over time (cf. the paper's Fig. 6)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
