"""The OpenAI-compatible HTTP server (`chameleon serve`); needs the `serve` extra."""

from chameleon.serve.app import build_app

__all__ = ["build_app"]
