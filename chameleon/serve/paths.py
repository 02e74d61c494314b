"""Adapter paths a caller may name: only directories under the server's `--adapter-root` dirs.

The check is on the real path (symlinks and `..` resolved), so a caller can never make the
server read anything outside those roots. No roots: loading through the API is disabled.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from chameleon.serve.errors import APIError, bad_request


def resolve_adapter_path(path: str, roots: Sequence[str]) -> str:
    """The real path of `path` if it lies under one of `roots`; otherwise a 403 / 400 `APIError`.

    A relative `path` is taken relative to each root in turn (first existing match wins).
    """
    real_roots = [os.path.realpath(r) for r in roots]
    if not real_roots:
        raise APIError(
            403,
            "loading adapters over the API is disabled (start the server with --adapter-root DIR)",
            "permission_error",
            "adapter_root_required",
            "lora_path",
        )
    candidates = [path] if os.path.isabs(path) else [os.path.join(r, path) for r in real_roots]
    inside = [c for c in (os.path.realpath(c) for c in candidates) if any(_under(c, r) for r in real_roots)]
    if not inside:
        raise APIError(
            403,
            "lora_path is outside the allowed adapter roots",
            "permission_error",
            "adapter_path_forbidden",
            "lora_path",
        )
    for real in inside:
        if os.path.isdir(real):
            return real
    raise bad_request(f"no adapter directory at {path!r} under the adapter roots", "adapter_not_found", "lora_path")


def _under(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root
