"""N simulated replicas behind one router: plan a fleet with the routing code Ray Serve runs.

Each replica is a real `EngineCore` over the simulated executor, on its own `ManualClock`.
Requests are dispatched in arrival order: before one is routed, every replica is stepped up to its
arrival time, so the router (`chameleon.serve.routing`, the same classes `chameleon.serve.ray`
uses) sees each replica's device-resident adapters, queue and free memory as of that instant.
Replicas never share state, so stepping them independently between arrivals is exact.
The adapter hit rate is the fleet's cache hits over hits + misses (a miss loads an adapter).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from chameleon.clock import ManualClock
from chameleon.engine.core import EngineCore
from chameleon.harness.driver import prompt_tokens
from chameleon.harness.metrics import RequestRecord
from chameleon.harness.workload import Workload, WorkloadRequest
from chameleon.outputs import RequestOutput
from chameleon.sampling_params import SamplingParams
from chameleon.serve.routing import ReplicaState, make_router


@attrs.define
class SimReplica:
    """One simulated replica and what the fleet driver tracks about it."""

    replica_id: str
    core: EngineCore[Any]
    clock: ManualClock
    in_flight: dict[str, str] = attrs.field(factory=dict)  # request id -> adapter ("" = base)

    def state(self) -> ReplicaState:
        s = self.core.stats().as_dict()
        per: dict[str, int] = {}
        for a in self.in_flight.values():
            per[a] = per.get(a, 0) + 1
        return ReplicaState(
            self.replica_id,
            device=frozenset(e.name for e in self.core.adapter_cache.resident()),
            queue=len(self.in_flight),
            free_bytes=int(s["memory"]["free_bytes"]),
            adapter_queue=per,
        )

    def run_until(self, t: float, on_output: Callable[[RequestOutput, float], None]) -> None:
        """Step until this replica's clock reaches `t` (idle time is skipped)."""
        while self.clock.now() < t:
            if not self.core.has_unfinished_requests():
                self.clock.advance(t - self.clock.now())
                return
            before = self.clock.now()
            for out in self.core.step():
                on_output(out, self.clock.now())
            if self.clock.now() == before:  # nothing could run: wait for the next arrival
                self.clock.advance(t - before)

    def drain(self, on_output: Callable[[RequestOutput, float], None]) -> None:
        """Step until every request this replica holds has finished."""
        while self.core.has_unfinished_requests():
            before = self.clock.now()
            outs = self.core.step()
            for out in outs:
                on_output(out, self.clock.now())
            if self.clock.now() == before and not outs:
                break


@attrs.frozen
class FleetResult:
    records: list[RequestRecord]
    hit_rate: float
    per_replica: dict[str, int]  # requests routed to each replica


def run_fleet(replicas: Sequence[SimReplica], workload: Workload, router_name: str) -> FleetResult:
    """Replay `workload` open-loop over `replicas`, routed by `router_name`."""
    router = make_router(router_name)
    by_id = {r.replica_id: r for r in replicas}
    records: dict[str, RequestRecord] = {}
    routed: dict[str, int] = {r.replica_id: 0 for r in replicas}

    def make_sink(rep: SimReplica) -> Callable[[RequestOutput, float], None]:
        def sink(out: RequestOutput, now: float) -> None:
            if out.finished:
                adapter = rep.in_flight.pop(out.request_id, "")
                records[out.request_id] = RequestRecord.from_metrics(
                    out.request_id, adapter or None, out.metrics, finish_reason=out.finish_reason
                )

        return sink

    sinks = {r.replica_id: make_sink(r) for r in replicas}
    for req in workload.requests:
        for r in replicas:
            r.run_until(req.arrival_s, sinks[r.replica_id])
        pick = by_id[router.choose(req.adapter, [r.state() for r in replicas])]
        routed[pick.replica_id] += 1
        _submit(pick, req)
    for r in replicas:
        r.drain(sinks[r.replica_id])
    hits = sum(r.core.adapter_cache.stats.hits for r in replicas)
    misses = sum(r.core.adapter_cache.stats.misses for r in replicas)
    ordered = [records[q.request_id] for q in workload.requests if q.request_id in records]
    return FleetResult(ordered, hits / max(1, hits + misses), routed)


def _submit(rep: SimReplica, req: WorkloadRequest) -> None:
    sp = SamplingParams(max_tokens=max(1, req.output_len), ignore_eos=True, temperature=0.0)
    rep.core.add_request(
        req.request_id,
        prompt_tokens(req, rep.core.limits.vocab_size),
        sp,
        adapter=req.adapter,
        arrival_time=req.arrival_s,
    )
    rep.in_flight[req.request_id] = req.adapter or ""


def run_fleet_bench(
    args: Any,
    sim_factory: Callable[[Any], Any],
    table: dict[str, tuple[str, str]],
    policies: list[str],
    rates: list[float],
) -> int:
    """`chameleon bench --replicas N --router R[,R...]`: one row per policy, rate and router."""
    from chameleon.harness.bench import make_workload
    from chameleon.harness.metrics import summarize

    if args.executor != "sim":
        print("error: --replicas is simulator-only (use `chameleon serve --replicas` for real ones)")
        return 2
    factory = sim_factory(args)
    routers = [r.strip() for r in args.router.split(",") if r.strip()]
    print(f"{factory.label} · {args.replicas} replicas · {args.workload} workload · {args.duration:g} s")
    print(f"{'policy':<12} {'rate':>6} {'router':<12} {'hit rate':>9} {'P99 TTFT s':>11} {'SLO att.':>9}")
    for policy in policies:
        scheduler, cache = table[policy]
        for rate in rates:
            for router in routers:
                w = make_workload(args, rate)
                reps = [SimReplica(f"r{i}", *factory.build(scheduler, cache, w)[:2]) for i in range(args.replicas)]
                res = run_fleet(reps, w, router)
                s = summarize(res.records, slo_ttft_s=args.slo_ttft, slo_tbt_s=args.slo_tbt)
                print(
                    f"{policy:<12} {rate:>6g} {router:<12} {res.hit_rate:>9.3f} {s.ttft_p99_s:>11.3f} {s.slo_attainment:>9.3f}"
                )
    return 0
