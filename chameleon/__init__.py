"""Chameleon: serve one base LLM with many LoRA adapters at low tail latency.

The exports are lazy (PEP 562): `import chameleon.sched` or `chameleon.sim` must not pull in torch,
transformers or triton, which only the async front end, the executor and the model need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AsyncEngine": "chameleon.engine.async_engine",
    "RequestStream": "chameleon.engine.stream",
    "EngineConfig": "chameleon.config",
    "EngineCore": "chameleon.engine.core",
    "EngineStats": "chameleon.engine.stats",
    "RequestMetrics": "chameleon.outputs",
    "RequestOutput": "chameleon.outputs",
    "CompletionOutput": "chameleon.outputs",
    "Logprob": "chameleon.outputs",
    "AdapterInfo": "chameleon.outputs",
    "SamplingParams": "chameleon.sampling_params",
}

if TYPE_CHECKING:
    from chameleon.config import EngineConfig
    from chameleon.engine.async_engine import AsyncEngine
    from chameleon.engine.core import EngineCore
    from chameleon.engine.stats import EngineStats
    from chameleon.engine.stream import RequestStream
    from chameleon.outputs import AdapterInfo, CompletionOutput, Logprob, RequestMetrics, RequestOutput
    from chameleon.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'chameleon' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "AdapterInfo",
    "AsyncEngine",
    "CompletionOutput",
    "EngineConfig",
    "EngineCore",
    "EngineStats",
    "Logprob",
    "RequestMetrics",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
    "__version__",
]
