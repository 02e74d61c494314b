"""What the core and the user know about a registered adapter (no tensors)."""

from __future__ import annotations

import attrs


@attrs.frozen
class AdapterInfo:
    name: str
    path: str
    rank: int  # the adapter config's r
    max_rank: int  # largest rank over its modules (rank_pattern); rows it occupies on the device
    target_modules: tuple[str, ...]
    host_bytes: int  # its weights in host memory
    device_bytes: int  # what it occupies in the device pool when resident
    content_hash: str
    pinned: bool = False
