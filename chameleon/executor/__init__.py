"""Executors run a scheduled batch: the real model (`TorchExecutor`) or, later, a cost model."""

from chameleon.executor.base import Executor

__all__ = ["Executor"]
