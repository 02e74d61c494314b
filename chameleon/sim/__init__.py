"""Simulation at paper scale (SPEC §5): the real engine core over a simulated GPU.

`cost_model` (hardware and model presets, the analytic roofline calibrated to the paper, measured
profiles), `executor` (`SimulatedExecutor`, the `Executor` protocol on a virtual clock) and
`runner` (the open-loop driver shared with real runs, `build_sim_engine`, the policy table).
Nothing here imports torch. A simulated result is always labelled as one.
"""

from chameleon.sim.cost_model import (
    A40_LLAMA7B_CALIBRATION,
    GPUS,
    MODELS,
    AnalyticCostModel,
    BatchShape,
    Calibration,
    CostProfile,
    GPUSpec,
    ModelCost,
)
from chameleon.sim.executor import SimulatedExecutor, synthetic_path
from chameleon.sim.runner import POLICIES, build_sim_engine, run_workload

__all__ = [
    "A40_LLAMA7B_CALIBRATION",
    "GPUS",
    "MODELS",
    "POLICIES",
    "AnalyticCostModel",
    "BatchShape",
    "Calibration",
    "CostProfile",
    "GPUSpec",
    "ModelCost",
    "SimulatedExecutor",
    "build_sim_engine",
    "run_workload",
    "synthetic_path",
]
