"""Simulation at paper scale (SPEC §5): the real engine core over a simulated GPU.

`cost_model` (hardware and model presets, the analytic roofline calibrated to the paper, measured
profiles), `executor` (`SimulatedExecutor`, the `Executor` protocol on a virtual clock) and
`engine` (`build_sim_engine`: the real engine core over the simulated executor). The open-loop
driver shared with real runs lives in `chameleon.harness.driver`.
Nothing here imports torch. A simulated result is always labelled as one.
"""

from chameleon.sim.analytic import A40_LLAMA7B_CALIBRATION, AnalyticCostModel, Calibration
from chameleon.sim.engine import build_sim_engine
from chameleon.sim.executor import SimulatedExecutor, synthetic_path
from chameleon.sim.hardware import GPUS, MODELS, GPUSpec, ModelCost
from chameleon.sim.profile import CostProfile
from chameleon.sim.shape import BatchShape

__all__ = [
    "A40_LLAMA7B_CALIBRATION",
    "GPUS",
    "MODELS",
    "AnalyticCostModel",
    "BatchShape",
    "Calibration",
    "CostProfile",
    "GPUSpec",
    "ModelCost",
    "SimulatedExecutor",
    "build_sim_engine",
    "synthetic_path",
]
