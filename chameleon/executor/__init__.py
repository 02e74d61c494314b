"""Executors run a scheduled batch: the real model (`TorchExecutor`) or a cost model (`chameleon.sim`)."""
