"""`chameleon serve MODEL_DIR ...`: the engine and uvicorn on one event loop."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from chameleon.errors import ConfigError


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a local Hugging Face model directory")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="register an adapter at startup")
    p.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        metavar="DIR",
        help="directories /v1/load_lora_adapter may read adapters from (none: loading over HTTP is off)",
    )
    p.add_argument("--served-model-name", help="the base model's name in the API (default: MODEL as given)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("CHAMELEON_API_KEY"), help="require Authorization: Bearer KEY")
    p.add_argument("--max-queued-requests", type=int, help="in-flight requests beyond which the server answers 429")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens when a request sets none")
    p.add_argument("--log-level", default="info")
    p.add_argument("--replicas", type=int, default=0, help="serve N engine replicas on Ray Serve (needs the ray extra)")
    p.add_argument("--ray-address", help="join this Ray cluster (default with --replicas: start a local one)")


def parse_adapters(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter wants NAME=PATH, got {item!r}")
        out[name] = path
    return out


def run_serve(args: argparse.Namespace) -> int:
    """Build the engine and the app, then serve until interrupted (on Ray Serve with --replicas)."""
    if args.replicas:
        from chameleon.serve.ray import run_ray_serve

        return run_ray_serve(args)
    import uvicorn

    from chameleon import AsyncEngine, EngineConfig
    from chameleon.serve.app import build_app

    engine = AsyncEngine.from_pretrained(args.model, EngineConfig())
    app = build_app(
        engine,
        served_model_name=args.served_model_name or args.model,
        api_key=args.api_key,
        adapter_roots=args.adapter_root,
        max_queued_requests=args.max_queued_requests,
        adapters=parse_adapters(args.adapter),
        default_max_tokens=args.max_tokens,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
