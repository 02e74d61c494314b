"""The OpenAI-compatible FastAPI app over one `AsyncEngine`, as vLLM serves it.

`build_app` holds every endpoint; `chameleon serve` runs it under uvicorn and a Ray Serve
deployment can wrap the same app. With `manage_engine=True` the app's lifespan starts and stops
the engine on the server's own event loop and registers the startup adapters.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from chameleon import AsyncEngine
from chameleon.chat import render_chat
from chameleon.engine.token_text import TokenText
from chameleon.errors import ChameleonError, EngineOverloadedError
from chameleon.serve.errors import APIError, from_chameleon, model_not_found
from chameleon.serve.metrics import InFlight, ServerMetrics
from chameleon.serve.paths import resolve_adapter_path
from chameleon.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    _Sampled,
)
from chameleon.serve.responses import Envelope, Kind, collect, full_body, sse_stream
from chameleon.serve.runs import Run, start_run


class OpenAIServer:
    """State shared by the endpoints: the engine, the names it answers to, the books."""

    def __init__(
        self,
        engine: AsyncEngine,
        served_model_name: str,
        adapter_roots: Sequence[str],
        max_queued_requests: int | None,
        default_max_tokens: int,
    ) -> None:
        self.engine = engine
        self.name = served_model_name
        self.adapter_roots = tuple(adapter_roots)
        self.max_queued = max_queued_requests
        self.default_max_tokens = default_max_tokens
        self.adapter_paths: dict[str, str] = {}
        self.created = int(time.time())
        self.in_flight = InFlight()
        self.token_text = TokenText(engine.tokenizer)  # logprobs' token strings and bytes
        self.metrics = ServerMetrics(
            engine.stats, lambda: [a.name for a in engine.adapters()], self.in_flight, served_model_name
        )

    def adapter_for(self, model: str) -> str | None:
        """None for the base model, the adapter's name for an adapter; 404 for anything else."""
        if model == self.name:
            return None
        if model in {a.name for a in self.engine.adapters()}:
            return model
        raise model_not_found(model)

    def check_capacity(self, n: int) -> None:
        if self.max_queued is not None and self.in_flight.total + n > self.max_queued:
            raise EngineOverloadedError(
                f"the server is at its limit of {self.max_queued} in-flight requests; retry later"
            )

    def start(self, req: _Sampled, prompt: str | list[int]) -> Run:
        """One engine request for all `n` choices (the library runs them, `SamplingParams.n`)."""
        adapter = self.adapter_for(req.model)
        self.check_capacity(req.n)
        stream = self.engine.generate(prompt, req.to_sampling(self.default_max_tokens), adapter=adapter)
        return start_run(stream, req.n, adapter, self.in_flight, self.metrics)

    def envelope(self, kind: Kind, req: _Sampled) -> Envelope:
        return Envelope(kind, req.model, req.num_logprobs, self.token_text)

    def models(self) -> dict[str, Any]:
        card = {"object": "model", "created": self.created, "owned_by": "chameleon", "permission": []}
        data = [{**card, "id": self.name, "root": self.name, "parent": None}]
        for a in self.engine.adapters():
            data.append({**card, "id": a.name, "root": self.adapter_paths.get(a.name, a.name), "parent": self.name})
        return {"object": "list", "data": data}


def build_app(
    engine: AsyncEngine,
    *,
    served_model_name: str,
    api_key: str | None = None,
    adapter_roots: Sequence[str | os.PathLike[str]] = (),
    max_queued_requests: int | None = None,
    adapters: Mapping[str, str | os.PathLike[str]] | None = None,
    manage_engine: bool = True,
    default_max_tokens: int = 16,
) -> FastAPI:
    """The app. `adapters` (trusted, from the command line) are registered at startup.

    `adapter_roots` bound what /v1/load_lora_adapter may read; `max_queued_requests` caps the
    in-flight requests (429 beyond); `api_key` protects every /v1 route (Bearer).
    """
    server = OpenAIServer(
        engine, served_model_name, [str(r) for r in adapter_roots], max_queued_requests, default_max_tokens
    )
    app = FastAPI(title="Chameleon", lifespan=_lifespan(server, dict(adapters or {}), manage_engine))
    app.state.server = server
    _install_error_handlers(app, server)
    auth = [Depends(_auth_dependency(api_key))]
    _add_generation_routes(app, server, auth)
    _add_admin_routes(app, server, auth)
    return app


def _lifespan(server: OpenAIServer, adapters: dict[str, Any], manage_engine: bool):  # type: ignore[no-untyped-def]
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if not manage_engine:
            yield
            return
        async with server.engine:
            for name, path in adapters.items():
                await server.engine.add_adapter(name, path)
                server.adapter_paths[name] = str(path)
            yield

    return lifespan


def _auth_dependency(api_key: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "Incorrect or missing API key (send Authorization: Bearer KEY).",
                "authentication_error",
                "invalid_api_key",
            )

    return check


def _install_error_handlers(app: FastAPI, server: OpenAIServer) -> None:
    async def api_error(_r: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        server.metrics.observe_rejected(exc.status)
        return exc.response()

    async def chameleon_error(r: Request, exc: Exception) -> Response:
        assert isinstance(exc, ChameleonError)
        return await api_error(r, from_chameleon(exc))

    async def validation_error(r: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return await api_error(r, APIError(400, message or "invalid request", code="invalid_request", param=param))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(ChameleonError, chameleon_error)
    app.add_exception_handler(RequestValidationError, validation_error)


async def _respond(env: Envelope, run: Run, stream: bool, include_usage: bool) -> Response:
    if stream:
        # The background task also closes a run whose body never started (client gone at once).
        body = sse_stream(env, run, include_usage)
        return StreamingResponse(body, media_type="text/event-stream", background=BackgroundTask(run.aclose))
    await collect(run)
    return JSONResponse(full_body(env, run))


def _add_generation_routes(app: FastAPI, server: OpenAIServer, auth: list[Any]) -> None:
    engine = server.engine

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest) -> Response:
        server.adapter_for(req.model)  # 404 before any other check
        run = server.start(req, req.single_prompt())
        return await _respond(server.envelope("completion", req), run, req.stream, req.include_usage)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatCompletionRequest) -> Response:
        server.adapter_for(req.model)
        prompt = render_chat(engine.tokenizer, req.chat_messages(), req.chat_template)
        run = server.start(req, prompt)
        return await _respond(server.envelope("chat", req), run, req.stream, req.include_usage)


def _add_admin_routes(app: FastAPI, server: OpenAIServer, auth: list[Any]) -> None:
    engine = server.engine

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return server.models()

    @app.post("/v1/load_lora_adapter", dependencies=auth)
    async def load_lora_adapter(req: LoadLoRAAdapterRequest) -> Response:
        if req.lora_name == server.name:
            raise APIError(400, f"{req.lora_name!r} is the base model's name", code="adapter_exists", param="lora_name")
        path = resolve_adapter_path(req.lora_path, server.adapter_roots)
        await engine.add_adapter(req.lora_name, path)
        server.adapter_paths[req.lora_name] = path
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=auth)
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest) -> Response:
        engine.remove_adapter(req.lora_name)
        server.adapter_paths.pop(req.lora_name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
