"""`EngineCore`'s adapter registry: add, register, remove and pin adapters (a mixin of the core).

Kept apart from the iteration so `core.py` stays about one step. Reading an adapter is safe in a
worker thread (`read_adapter` touches no core state); everything here runs between steps.
"""

from __future__ import annotations

import logging
from typing import Generic

import attrs

from chameleon.errors import AdapterExistsError, AdapterInUseError, InvalidRequestError
from chameleon.executor.base import AdapterT, Executor
from chameleon.memory.adapter_cache import AdapterCache
from chameleon.outputs import AdapterInfo
from chameleon.sched.request import Request

log = logging.getLogger(__name__)


class CoreAdapters(Generic[AdapterT]):
    """The adapter half of `EngineCore` (which sets these attributes in its `__init__`)."""

    _executor: Executor[AdapterT]
    adapters: dict[str, AdapterInfo]
    adapter_cache: AdapterCache
    requests: dict[str, Request]

    def add_adapter(self, name: str, path: str) -> AdapterInfo:
        """Validate and load a PEFT adapter into host memory (see `register_adapter`)."""
        self._check_new_adapter(name)
        return self.register_adapter(name, self._executor.read_adapter(name, path))

    def register_adapter(self, name: str, adapter: AdapterT) -> AdapterInfo:
        """Register an adapter `read_adapter` returned (reading is safe off-thread; this is not)."""
        self._check_new_adapter(name)
        try:
            info = self._executor.register_adapter(adapter)
            self.adapter_cache.register(info.name, info.max_rank)
        except BaseException:  # refused (e.g. AdapterMemoryError): the executor must keep nothing
            self._executor_forget(name)
            raise
        self.adapters[info.name] = info
        return info

    def _executor_forget(self, name: str) -> None:
        try:
            self._executor.unregister_adapter(name)
        except Exception:  # never registered that far: nothing to forget
            log.debug("unregister after a refused registration of %r failed", name, exc_info=True)

    def _check_new_adapter(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"adapter names are non-empty strings, got {name!r}")
        if name in self.adapters:
            raise AdapterExistsError(f"an adapter named {name!r} is already registered")

    def remove_adapter(self, name: str) -> None:
        users = [r.request_id for r in self.requests.values() if r.adapter == name]
        if name in self.adapters and users:
            raise AdapterInUseError(f"adapter {name!r} is used by {len(users)} unfinished requests, e.g. {users[0]!r}")
        self.adapter_cache.unregister(name)  # raises AdapterNotFoundError for unknown names
        self._executor.unregister_adapter(name)
        del self.adapters[name]

    def pin_adapter(self, name: str, pinned: bool = True) -> None:
        """A pinned adapter is never evicted from the device once loaded."""
        self.adapter_cache.pin(name, pinned)  # raises AdapterMemoryError before anything changes
        self.adapters[name] = attrs.evolve(self.adapters[name], pinned=pinned)

