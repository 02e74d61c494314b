"""Chameleon: serve one base LLM with many LoRA adapters at low tail latency."""

from chameleon.async_engine import AsyncEngine, RequestStream
from chameleon.config import EngineConfig
from chameleon.engine_core import EngineCore, EngineStats
from chameleon.outputs import RequestMetrics, RequestOutput
from chameleon.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineCore",
    "EngineStats",
    "RequestMetrics",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
    "__version__",
]
