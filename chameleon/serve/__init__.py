"""The OpenAI-compatible HTTP server (`chameleon serve`); needs the `serve` extra.

`build_app` is imported lazily, so `chameleon.serve.main` (the CLI's argument parser) loads
without FastAPI installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_app"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from chameleon.serve.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
