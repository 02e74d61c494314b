"""Chameleon on Ray Serve: N engine replicas behind one ingress, routed by adapter affinity.

Layout (why): Ray's HTTP proxy routes before it reads a body, so it cannot see the OpenAI
`model` field that names the adapter. A thin `Ingress` deployment therefore reads the body and
forwards the raw HTTP request through a handle to an `EngineReplica`, with
`multiplexed_model_id=adapter`. Each replica hosts the *unchanged* `build_app` app and runs the
request through it in-process (ASGI), streaming the response back; the ingress copies it out and
adds `x-chameleon-replica`. Routing is a custom Ray Serve `RequestRouter` (`AffinityRequestRouter`)
that feeds each replica's `record_routing_stats` (device- and host-resident adapters, queue, free
memory) to `chameleon.serve.routing.AffinityRouter`, the same code the simulator uses.

Ray's LRU defers to Chameleon's cache: the deployment uses no `@serve.multiplexed` loader, so Ray
never evicts; the multiplexed model id only carries the adapter to the router. Chameleon's cache
decides residency from real device memory, adapter ranks and frequency; a count-based LRU beside
it would unload adapters the cache still wants. Adapter loads and unloads go into an ordered op
log that every replica replays before it serves its next request (a broadcast that also reaches
replicas Ray starts later). A replica that dies mid-request ends the request with a typed
`replica_unavailable` error (503, or an SSE error event); Ray replaces the replica.
"""

# No `from __future__ import annotations` here: `serve.ingress` rewrites the route functions, and
# FastAPI must see `Request` as a class, not a string it can no longer resolve.
import asyncio
import importlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from chameleon.serve.ray_metrics import render_fleet_metrics
from chameleon.serve.routing import AffinityRouter, ReplicaState

log = logging.getLogger("ray.serve")  # Serve configures and files this one
REPLICA_HEADER = "x-chameleon-replica"
ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
_LIVE_ROUTERS: "list[AffinityRequestRouter]" = []  # routers in this process (the ingress reads their stats)


@attrs.frozen
class Forwarded:
    """One HTTP request as the ingress hands it to a replica."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@attrs.frozen
class AdminOp:
    """A successful adapter load or unload, replayed on every replica in log order."""

    seq: int
    request: Forwarded


# --- the router ------------------------------------------------------------------------------


class AffinityRequestRouter(RequestRouter):
    """Ray Serve request router over `AffinityRouter`, with stats refreshed by routing outcomes.

    Replica stats arrive every `request_routing_stats_period_s`; between reports the router
    counts the requests it sent (and assumes a replica it sent an adapter to now holds it), so a
    burst does not all go to the replica that looked emptiest at the last report.
    """

    def initialize_state(self, spread_queue: int = 4, max_imbalance: int = 8) -> None:  # type: ignore[override]  # Ray passes these as kwargs
        self.policy = AffinityRouter(spread_queue=spread_queue, max_imbalance=max_imbalance)
        self.sent: dict[str, dict[str, int]] = {}  # replica -> adapter -> requests routed, unfinished
        self.assumed: dict[str, set[str]] = {}  # replica -> adapters sent there since its last report
        self.request_adapter: dict[str, tuple[str, str]] = {}
        # Serve ships this class by value; register in the imported module's list, not a copy.
        importlib.import_module(__name__)._LIVE_ROUTERS.append(self)
        log.info("affinity request router started (spread_queue=%d)", spread_queue)

    def state_of(self, r: RunningReplica) -> ReplicaState:
        rid = r.replica_id.unique_id
        stats = dict(r.routing_stats or {})
        base = ReplicaState.from_stats(rid, stats)
        sent = self.sent.get(rid, {})
        queue = dict(base.adapter_queue)
        for a, n in sent.items():
            queue[a] = max(queue.get(a, 0), n)
        return attrs.evolve(
            base,
            device=base.device | self.assumed.get(rid, set()),
            queue=max(base.queue, sum(sent.values())),
            adapter_queue=queue,
        )

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        adapter = pending_request.metadata.multiplexed_model_id if pending_request else ""
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        pick = self.policy.choose(adapter or None, [self.state_of(r) for r in candidate_replicas])
        rest = [r for rid, r in by_id.items() if rid != pick]
        return [[by_id[pick]], rest] if rest else [[by_id[pick]]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        rid, adapter = replica_id.unique_id, pending_request.metadata.multiplexed_model_id or ""
        self.sent.setdefault(rid, {}).setdefault(adapter, 0)
        self.sent[rid][adapter] += 1
        if adapter:
            self.assumed.setdefault(rid, set()).add(adapter)
        self.request_adapter[pending_request.metadata.internal_request_id] = (rid, adapter)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        rid, adapter = self.request_adapter.pop(internal_request_id, (replica_id.unique_id, ""))
        counts = self.sent.get(rid, {})
        if counts.get(adapter, 0) > 0:
            counts[adapter] -= 1

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        for r in replicas:  # a fresh report supersedes what the router assumed
            self.assumed.pop(r.replica_id.unique_id, None)

    def fleet_stats(self) -> dict[str, dict[str, Any]]:
        return {rid.unique_id: dict(r.routing_stats or {}) for rid, r in self.curr_replicas.items()}


def fleet_stats() -> dict[str, dict[str, Any]]:
    """Every replica's last routing stats, from the routers of this process.

    Serve ships the router and ingress classes by value, each with its own copy of the module's
    globals; both go through the imported module so they share one `_LIVE_ROUTERS`.
    """
    fleet: dict[str, dict[str, Any]] = {}
    for router in importlib.import_module(__name__)._LIVE_ROUTERS:
        fleet.update(router.fleet_stats())
    return fleet


# --- one engine replica ----------------------------------------------------------------------


class EngineReplica:
    """One `AsyncEngine` and the OpenAI app over it; serves forwarded requests through the app."""

    async def __init__(self, model: str, engine_kwargs: dict[str, Any], app_kwargs: dict[str, Any]) -> None:  # type: ignore[misc]  # Ray Serve awaits an async __init__
        from chameleon import AsyncEngine, EngineConfig
        from chameleon.serve.app import build_app

        self.engine = AsyncEngine.from_pretrained(model, EngineConfig(**engine_kwargs))
        self.app = build_app(self.engine, manage_engine=True, **app_kwargs)
        self._stop = asyncio.Event()
        self._lifespan = asyncio.create_task(self._run_lifespan(ready := asyncio.Event()))
        await ready.wait()
        if self._lifespan.done():  # the engine failed to start: raise its error
            self._lifespan.result()
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.actor_name = ctx.replica_id.to_full_id_str()
        self.applied = 0  # admin ops replayed so far
        self.sync_lock = asyncio.Lock()

    async def _run_lifespan(self, ready: asyncio.Event) -> None:
        """The app's lifespan (engine start, startup adapters, stop) in one task, as anyio needs."""
        try:
            async with self.app.router.lifespan_context(self.app):
                ready.set()
                await self._stop.wait()
        finally:
            ready.set()

    async def handle(self, req: Forwarded, ops: list[AdminOp], op_seq: int | None) -> AsyncIterator[Any]:
        """Replay unseen admin ops, then stream the app's answer: a header dict, then body bytes."""
        await self._replay(ops, op_seq)
        async for item in _call_asgi(self.app, req):
            if isinstance(item, dict):
                item = {**item, "replica": self.replica_id}
                if op_seq is not None and item["status"] == 200:
                    self.applied = op_seq + 1
            yield item

    async def _replay(self, ops: list[AdminOp], upto: int | None) -> None:
        async with self.sync_lock:
            for op in ops:
                if op.seq >= self.applied and (upto is None or op.seq < upto):
                    status = await _status_of(self.app, op.request)
                    if status != 200:
                        log.warning("replica %s: replaying %s gave %d", self.replica_id, op.request.path, status)
                    self.applied = op.seq + 1

    def record_routing_stats(self) -> dict[str, Any]:
        """What the router sees: Chameleon's cache tiers, queue, free memory, and /metrics text."""
        server = self.app.state.server
        s = self.engine.stats()
        executor = getattr(self.engine.core, "_executor", None)
        in_flight = server.in_flight
        per_adapter = {
            a: in_flight.waiting[a] + in_flight.running[a] for a in set(in_flight.waiting) | set(in_flight.running)
        }
        return {
            "device": sorted(e.name for e in list(self.engine.core.adapter_cache.resident())),
            "host": sorted(getattr(executor, "host_adapters", {})),
            "queue": max(s["requests"]["waiting"] + s["requests"]["running"], in_flight.total),
            "free_bytes": s["memory"]["free_bytes"],
            "adapter_queue": {a: n for a, n in per_adapter.items() if a and n > 0},
            "actor_name": self.actor_name,
            "metrics": server.metrics.render().decode(),
            "at": time.time(),
        }

    async def __del__(self) -> None:
        self._stop.set()
        await self._lifespan


async def _call_asgi(app: Any, req: Forwarded) -> AsyncIterator[Any]:
    """Run one request through an ASGI app in-process: yields the start message, then chunks."""
    out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(_scope(req), receive, out.put)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    try:
        while (msg := await out.get()) is not None:
            if msg["type"] == "http.response.start":
                yield {"status": msg["status"], "headers": [(k.decode(), v.decode()) for k, v in msg["headers"]]}
            elif msg["type"] == "http.response.body" and msg.get("body"):
                yield msg["body"]
        await task
    finally:
        gone.set()  # the caller left: the app sees a disconnect and closes its engine streams
        if not task.done():
            task.cancel()


def _scope(req: Forwarded) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": req.method,
        "scheme": "http",
        "path": req.path,
        "raw_path": req.path.encode(),
        "query_string": req.query,
        "root_path": "",
        "headers": req.headers,
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
    }


async def _status_of(app: Any, req: Forwarded) -> int:
    status = 500
    async for item in _call_asgi(app, req):
        if isinstance(item, dict):
            status = item["status"]
    return status


# --- the ingress -----------------------------------------------------------------------------

proxy_app = FastAPI(title="Chameleon on Ray Serve")


def replica_unavailable(message: str) -> dict[str, Any]:
    """The typed error body a request gets when its replica dies or cannot be reached."""
    return {"error": {"message": message, "type": "replica_unavailable", "param": None, "code": "replica_died"}}


@serve.ingress(proxy_app)
class Ingress:
    """Reads `model` from the body, forwards to an engine replica, copies the answer back."""

    def __init__(self, engines: Any, served_model_name: str, retries: int = 2) -> None:
        self.engines = engines
        self.name = served_model_name
        self.retries = retries
        self.ops: list[AdminOp] = []
        self.admin_lock = asyncio.Lock()
        self.served: dict[str, int] = {}  # replica -> requests answered
        self.failed = 0

    @proxy_app.get("/metrics")
    async def metrics(self) -> Response:
        text = render_fleet_metrics(fleet_stats(), self.served, self.failed)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @proxy_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def forward(self, request: Request) -> Response:
        body = await request.body()
        req = Forwarded(request.method, request.url.path, request.url.query.encode(), list(request.headers.raw), body)
        if req.path in ADMIN_PATHS:
            async with self.admin_lock:
                seq = len(self.ops)
                response = await self._send(req, "", seq, buffer=True)
                if response.status_code == 200:
                    self.ops.append(AdminOp(seq, req))
                return response
        return await self._send(req, self._adapter_of(body), None, buffer=False)

    def _adapter_of(self, body: bytes) -> str:
        try:
            model = json.loads(body).get("model") if body else None
        except (ValueError, AttributeError):
            return ""
        return model if isinstance(model, str) and model != self.name else ""

    async def _send(self, req: Forwarded, adapter: str, seq: int | None, buffer: bool) -> Response:
        """Forward; retry on another replica while nothing has come back yet."""
        for attempt in range(self.retries + 1):
            handle = self.engines.options(stream=True, multiplexed_model_id=adapter)
            gen = handle.handle.remote(req, list(self.ops), seq)
            try:
                head = await gen.__anext__()
            except (ray.exceptions.RayError, asyncio.CancelledError, StopAsyncIteration) as exc:
                log.warning("replica unavailable (attempt %d): %r", attempt, exc)
                continue
            self.served[head["replica"]] = self.served.get(head["replica"], 0) + 1
            return await self._respond(head, gen, buffer)
        self.failed += 1
        return JSONResponse(replica_unavailable("no replica could take the request"), status_code=503)

    async def _respond(self, head: dict[str, Any], gen: Any, buffer: bool) -> Response:
        headers = {k: v for k, v in head["headers"] if k.lower() not in ("content-length", "content-type")}
        headers[REPLICA_HEADER] = head["replica"]
        media = {k.lower(): v for k, v in head["headers"]}.get("content-type")
        streaming = media is not None and media.startswith("text/event-stream")
        if not streaming or buffer:
            try:
                chunks = [c async for c in gen]
            except ray.exceptions.RayError as exc:
                self.failed += 1
                body = replica_unavailable(f"replica {head['replica']} died mid-request: {type(exc).__name__}")
                return JSONResponse(body, status_code=503, headers={REPLICA_HEADER: head["replica"]})
            return Response(b"".join(chunks), status_code=head["status"], headers=headers, media_type=media)
        return StreamingResponse(self._relay(head, gen), status_code=head["status"], headers=headers, media_type=media)

    async def _relay(self, head: dict[str, Any], gen: Any) -> AsyncIterator[bytes]:
        try:
            async for chunk in gen:
                yield chunk
        except ray.exceptions.RayError as exc:
            self.failed += 1
            error = replica_unavailable(f"replica {head['replica']} died mid-stream: {type(exc).__name__}")
            yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            gen.cancel()


# --- building and running --------------------------------------------------------------------


def build_deployment(
    model: str,
    *,
    replicas: int,
    served_model_name: str,
    engine_kwargs: dict[str, Any] | None = None,
    app_kwargs: dict[str, Any] | None = None,
    replica_cpus: float = 0.5,
    stats_period_s: float = 0.25,
    max_ongoing_requests: int = 64,
) -> Any:
    """The Serve application: `Ingress` over `replicas` engine replicas with affinity routing."""
    engine = serve.deployment(
        EngineReplica,
        name="ChameleonEngine",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=max_ongoing_requests,
        health_check_period_s=1.0,
        # Ray's pydantic model types these fields loosely; the values are what its docs ask for.
        request_router_config=RequestRouterConfig(
            request_router_class=AffinityRequestRouter,  # type: ignore[arg-type]
            request_routing_stats_period_s=stats_period_s,  # type: ignore[arg-type]
            request_routing_stats_timeout_s=5.0,  # type: ignore[arg-type]
        ),
    )
    # The ingress only forwards: it must admit what every replica can (Ray's default is 5 in all).
    ingress = serve.deployment(
        Ingress,
        name="ChameleonIngress",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=replicas * max_ongoing_requests,
    )
    apps = {"served_model_name": served_model_name, **(app_kwargs or {})}
    # serve.deployment returns a Deployment here; Ray's stubs type it as a decorator too.
    replica = engine.bind(model, dict(engine_kwargs or {}), apps)  # type: ignore[attr-defined]
    return ingress.bind(replica, served_model_name)  # type: ignore[attr-defined]


def run_ray_serve(args: Any) -> int:
    """`chameleon serve MODEL --replicas N [--ray-address ADDR]`: start or join, serve, block."""
    from chameleon.serve.main import parse_adapters

    ray.init(address=args.ray_address, include_dashboard=False) if args.ray_address else ray.init(
        include_dashboard=False
    )
    serve.start(http_options={"host": args.host, "port": args.port})
    app_kwargs = {
        "api_key": args.api_key,
        "adapter_roots": args.adapter_root,
        "max_queued_requests": args.max_queued_requests,
        "adapters": parse_adapters(args.adapter),
        "default_max_tokens": args.max_tokens,
    }
    name = args.served_model_name or args.model
    app = build_deployment(args.model, replicas=args.replicas, served_model_name=name, app_kwargs=app_kwargs)
    serve.run(app, name="chameleon", route_prefix="/", blocking=True)
    return 0
