"""One line describing the machine, printed by every benchmark."""

from __future__ import annotations

import os
import platform


def machine_line() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu} | {os.cpu_count()} cores, torch threads {torch.get_num_threads()} | {gpu} | "
        f"python {platform.python_version()} | torch {torch.__version__}"
    )


def steal_s() -> float:
    """CPU seconds the hypervisor has taken from this VM since boot (Linux /proc/stat 'steal')."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0
