"""Chameleon's MLQ policy on hand-built scenarios: a fake `SchedulingView`, explicit clock values."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs
import pytest

from chameleon.sampling_params import SamplingParams
from chameleon.sched.fifo import FifoPolicy
from chameleon.sched.mlq.clustering import QueueLayout
from chameleon.sched.mlq.policy import MLQPolicy
from chameleon.sched.options import SchedulerOptions
from chameleon.sched.policy import AdmissionPolicy
from chameleon.sched.predictors import make_predictor
from chameleon.sched.request import Request, RequestStatus
from chameleon.sched.sjf import SjfPolicy

CAPACITY = 1000


@attrs.define
class FakeView:
    """The mechanism as a policy sees it; adapters are available unless named in `unavailable`."""

    running: list[Request] = attrs.field(factory=list)
    kv_capacity_tokens: int = CAPACITY
    max_model_len: int = 1000
    max_num_seqs: int = 1000
    ranks: dict[str, int] = attrs.field(factory=dict)
    unavailable: set[str] = attrs.field(factory=set)
    tokens_per_rank: int = 0

    def adapter_rank(self, name: str) -> int:
        return self.ranks[name]

    def max_adapter_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    def adapter_available(self, name: str, now: float) -> bool:
        return name not in self.unavailable

    def adapter_token_cost(self, name: str | None) -> int:
        return 0 if name is None else self.ranks[name] * self.tokens_per_rank


def req(rid: str, prompt: int, output: int, t: float = 0.0, adapter: str | None = None) -> Request:
    """A request whose true (and, under the oracle, predicted) output length is `output`."""
    sampling = SamplingParams(max_tokens=output, ignore_eos=True)
    return Request(rid, [1] * prompt, sampling, arrival_time=t, adapter=adapter)


def make_policy(view: FakeView, **options: object) -> MLQPolicy:
    # The paper's literal MLQ (these tests pin its rules); ours is tested in test_mlq_knee.py.
    literal = {
        "quota_charge": "upfront",
        "work_conserving": False,
        "seat_shares": False,
        "triage": False,
        "urgent_fraction": None,
        "early_first_refresh": False,
    }
    options = {"predictor": "oracle", **literal, **options}
    policy = MLQPolicy(make_predictor("oracle"), SchedulerOptions(**options))  # type: ignore[arg-type]
    policy.bind(view)
    return policy


def size(r: Request) -> int:
    return len(r.prompt_token_ids) + r.sampling.max_tokens


def walk(
    policy: AdmissionPolicy, view: FakeView, now: float, fits: Callable[[Request], bool] = lambda r: True
) -> list[str]:
    """What `Scheduler.schedule` step 2 does with the candidates: admit what fits, honour skip_blocked."""
    taken: list[str] = []
    walk = policy.walk(now)
    while (request := walk.next()) is not None:
        if fits(request):
            walk.accept(now)
            request.status = RequestStatus.RUNNING
            view.running.append(request)
            taken.append(request.request_id)
        else:
            walk.reject()
            if not policy.skip_blocked(request):
                break
    walk.close()
    return taken


def finish(policy: AdmissionPolicy, view: FakeView, request: Request, now: float) -> None:
    view.running.remove(request)
    request.output_token_ids = [7] * request.sampling.max_tokens
    policy.left_running(request, now)
    request.status = RequestStatus.FINISHED
    policy.completed(request, now)


def preempt(policy: AdmissionPolicy, view: FakeView, request: Request, now: float) -> None:
    view.running.remove(request)
    policy.left_running(request, now)
    request.status = RequestStatus.WAITING
    request.num_computed_tokens = 0
    policy.requeue(request, now)


def memory(view: FakeView, capacity: int = CAPACITY) -> Callable[[Request], bool]:
    """A mechanism with `capacity` KV tokens: a request needs prompt + max_tokens of them."""
    return lambda r: sum(size(x) for x in view.running) + size(r) <= capacity


def two_queues(policy: MLQPolicy, quotas: Iterable[int] = (200, 800)) -> None:
    """Small (WRS 0.01) and long (WRS >= 0.3) requests in separate queues."""
    policy.apply_layout(QueueLayout((0.25,)), tuple(quotas))


def small(rid: str, t: float = 0.0, adapter: str | None = None) -> Request:
    return req(rid, 10, 10, t, adapter)  # cost 20, WRS 0.01


def long(rid: str, t: float = 0.0) -> Request:
    return req(rid, 300, 300, t)  # cost 600, WRS 0.3


def assert_ledger_sane(policy: MLQPolicy) -> None:
    ledger = policy.ledger
    for q in range(ledger.num_queues):
        assert ledger.held(q) >= 0 and ledger.remaining(q) >= 0
    assert sum(ledger.held(q) for q in range(ledger.num_queues)) == sum(c.cost for c in ledger.charges.values())


# --- order -----------------------------------------------------------------------------------


def test_small_requests_go_ahead_of_a_long_one_that_arrived_first() -> None:
    view = FakeView()
    policy = make_policy(view)
    two_queues(policy)
    policy.add(long("L", 0.0), 0.0)
    for i in range(3):
        policy.add(small(f"s{i}", 0.1), 0.1)
    # Memory cannot hold the long one yet: the small ones still get in (no head-of-line blocking).
    assert walk(policy, view, 0.2, fits=lambda r: r.request_id != "L") == ["s0", "s1", "s2"]
    assert [r.request_id for r in policy.peek(0.3)] == ["L"]


def test_queues_are_walked_smallest_first() -> None:
    view = FakeView()
    policy = make_policy(view)
    two_queues(policy)
    policy.add(long("L", 0.0), 0.0)
    for i in range(3):
        policy.add(small(f"s{i}", 0.1), 0.1)
    assert walk(policy, view, 0.2) == ["s0", "s1", "s2", "L"]


def test_fifo_blocks_the_same_small_requests_behind_the_long_one() -> None:
    view = FakeView()
    fifo = FifoPolicy()
    fifo.bind(view)
    fifo.add(long("L", 0.0), 0.0)
    for i in range(3):
        fifo.add(small(f"s{i}", 0.1), 0.1)
    assert walk(fifo, view, 0.2, fits=lambda r: r.request_id != "L") == []


def test_a_queue_stopped_by_its_quota_does_not_stop_the_others() -> None:
    view = FakeView()
    policy = make_policy(view)
    two_queues(policy, (50, 950))  # queue 0 fits two small requests of its own
    policy.add(long("L1", 0.0), 0.0)
    for i in range(4):
        policy.add(small(f"s{i}", 0.0), 0.0)
    # Phase 1: s0, s1 from queue 0's quota, L1 from queue 1's; phase 2: queue 1 is idle now, so
    # s2 and s3 borrow its leftover.
    assert walk(policy, view, 0.0) == ["s0", "s1", "L1", "s2", "s3"]
    queues = policy.metrics()["queues"]
    assert queues[0]["leftover_admissions"] == 2
    assert policy.ledger.held(0) == 40 and policy.ledger.held(1) == 600 + 40


def test_leftover_of_a_queue_with_waiting_requests_is_not_lent() -> None:
    view = FakeView()
    policy = make_policy(view)
    two_queues(policy, (40, 960))
    policy.add(req("L1", 300, 300), 0.0)  # 600
    policy.add(req("L2", 300, 300), 0.0)  # 600: does not fit what queue 1 has left
    for i in range(4):
        policy.add(small(f"s{i}", 0.0), 0.0)
    assert walk(policy, view, 0.0) == ["s0", "s1", "L1"]  # queue 1 still waits: nothing to borrow
    assert policy.ledger.held(0) == 40


# --- starvation ------------------------------------------------------------------------------


def stream(policy: AdmissionPolicy, view: FakeView, *, iterations: int, per_iteration: int, long_at: int) -> int | None:
    """Small requests arrive every iteration and run 2 iterations; a long one arrives at `long_at`.
    Returns the iteration the long request was admitted in (None: never)."""
    fits = memory(view)
    started: dict[str, int] = {}
    admitted_at = None
    for it in range(iterations):
        now = float(it)
        for r in [r for r in view.running if it - started[r.request_id] >= 2]:
            finish(policy, view, r, now)
        for i in range(per_iteration):
            policy.add(small(f"s{it}.{i}", now), now)
        if it == long_at:
            policy.add(long("L", now), now)
        for rid in walk(policy, view, now, fits):
            started[rid] = it
            if rid == "L":
                admitted_at = it
        if isinstance(policy, MLQPolicy):
            assert_ledger_sane(policy)
    return admitted_at


def test_a_long_request_is_not_starved_by_a_stream_of_small_ones() -> None:
    view = FakeView()
    policy = make_policy(view)
    two_queues(policy)
    # 30 small requests a tick, each living 2 ticks: 1200 tokens of demand for 1000 of memory.
    admitted = stream(policy, view, iterations=40, per_iteration=30, long_at=5)
    assert admitted is not None and admitted - 5 <= 3  # bounded: its own queue's quota is there for it


def test_sjf_starves_the_same_long_request() -> None:
    view = FakeView()
    policy = SjfPolicy(make_predictor("oracle"))
    policy.bind(view)
    assert stream(policy, view, iterations=40, per_iteration=30, long_at=5) is None


# --- the ledger ------------------------------------------------------------------------------


def test_quotas_never_go_negative_and_return_in_full() -> None:
    view = FakeView()
    policy = make_policy(view)
    two_queues(policy, (300, 700))
    fits = memory(view)
    requests = [req(f"r{i}", 5 + (i * 37) % 200, 1 + (i * 53) % 150, float(i) / 10) for i in range(60)]
    for step in range(80):
        now = step / 10
        for r in requests[step : step + 1]:
            policy.add(r, r.arrival_time)
        policy.preemptions(now)
        walk(policy, view, now, fits)
        assert_ledger_sane(policy)
        if view.running and step % 7 == 3:  # memory ran short: the policy's victim is preempted
            preempt(policy, view, policy.victim(view.running), now)
        if view.running and step % 11 == 5:  # an abort while running
            r = view.running[0]
            view.running.remove(r)
            policy.left_running(r, now)
            r.status = RequestStatus.FINISHED
        for r in list(view.running)[:2]:
            finish(policy, view, r, now)
        assert_ledger_sane(policy)
    while len(policy) or view.running:
        now += 0.1
        walk(policy, view, now)
        for r in list(view.running):
            finish(policy, view, r, now)
    policy.preemptions(now + 1)
    ledger = policy.ledger
    assert not ledger.charges
    assert [ledger.held(q) for q in range(2)] == [0, 0]
    assert [ledger.remaining(q) for q in range(2)] == list(ledger.quotas)
    assert sum(ledger.quotas) == CAPACITY


def test_a_closed_walk_gives_back_its_tentative_take() -> None:
    view = FakeView()
    policy = make_policy(view)
    two_queues(policy)
    a, b = small("a"), long("b")
    policy.add(a, 0.0)
    policy.add(b, 0.0)
    walk = policy.walk(0.0)
    assert walk.next() is a
    assert policy.ledger.held(0) == 20  # tentatively taken
    walk.reject()
    assert walk.next() is b  # a was not admitted: its take went back before b's was taken
    assert policy.ledger.held(0) == 0 and policy.ledger.held(1) == 600
    assert list(policy.ledger.charges) == ["b"]
    walk.close()
    assert policy.ledger.held(1) == 0 and not policy.ledger.charges
    assert len(policy) == 2


def test_the_take_of_an_admitted_request_stands() -> None:
    view = FakeView()
    policy = make_policy(view)
    a = small("a")
    policy.add(a, 0.0)
    walk = policy.walk(0.0)
    assert walk.next() is a
    walk.accept(0.0)
    walk.close()
    assert list(policy.ledger.charges) == ["a"] and policy.ledger.held(0) == 20
    policy.left_running(a, 1.0)
    assert policy.ledger.held(0) == 0


def test_a_request_larger_than_its_queue_quota_runs_alone() -> None:
    view = FakeView()
    policy = make_policy(view)
    two_queues(policy, (200, 100))
    policy.add(long("L1"), 0.0)
    policy.add(long("L2"), 0.0)
    for i in range(12):  # queue 0 keeps requests waiting: it lends nothing
        policy.add(small(f"s{i}"), 0.0)
    taken = walk(policy, view, 0.0)
    assert taken == [f"s{i}" for i in range(10)] + ["L1"]  # L1 is charged queue 1's whole quota (100), not 600
    assert policy.ledger.held(1) == 100
    finish(policy, view, view.running[-1], 1.0)
    assert walk(policy, view, 1.0) == ["L2"]


# --- refresh ---------------------------------------------------------------------------------


def test_refresh_fits_the_layout_and_re_places_waiting_requests() -> None:
    view = FakeView()
    policy = make_policy(view, refresh_period_s=1.0)
    early = long("early", 0.0)
    policy.add(early, 0.0)
    assert walk(policy, view, 0.0) == ["early"]
    for i in range(40):
        policy.add(small(f"s{i}", 0.1), 0.1)
        policy.add(long(f"l{i}", 0.1), 0.1)
    assert policy.layout.num_queues == 1 and policy.refreshes == 0
    policy.peek(0.9)  # not yet due
    assert policy.refreshes == 0

    policy.preemptions(1.0)  # a refresh is due at 1.0 s
    assert policy.refreshes == 1 and policy.layout.num_queues == 2
    (cutoff,) = policy.layout.cutoffs
    assert 0.01 < cutoff < 0.3
    queues = policy.metrics()["queues"]
    assert [q["waiting"] for q in queues] == [40, 40]
    assert sum(q["quota"] for q in queues) == CAPACITY
    assert policy.ledger.held(1) == 600 and policy.ledger.held(0) == 0  # early's charge moved with it
    assert policy.peek(1.0)[0].request_id == "s0"  # the small queue goes first
    policy.left_running(early, 1.5)
    assert policy.ledger.held(1) == 0


def test_quotas_at_refresh_follow_the_mm1_minimum() -> None:
    view = FakeView(kv_capacity_tokens=100_000)
    policy = make_policy(view, refresh_period_s=10.0, slo_ttft_s=5.0)
    for i in range(40):
        policy.add(small(f"s{i}", 0.0), 0.0)
        policy.add(long(f"l{i}", 0.0), 0.0)
    policy.preemptions(10.0)
    # lambda = 40 arrivals / 10 s; D = 1 s before any finish; S = 20 and 600 tokens.
    minima = [20 * 1.0 * (1 / 5 + 4), 600 * 1.0 * (1 / 5 + 4)]
    quotas = policy.ledger.quotas
    assert quotas[0] >= minima[0] and quotas[1] >= minima[1]
    assert sum(quotas) == 100_000
    assert quotas[1] > quotas[0]  # leftover follows demand (40*600 vs 40*20 tokens)


# --- bypass and squash -----------------------------------------------------------------------


def bypass_scene(**options: object) -> tuple[MLQPolicy, FakeView, dict[str, Request]]:
    """R runs with adapter c (10 tokens to go); head H waits for adapter a, which cannot fit."""
    view = FakeView(ranks={"a": 8, "b": 8, "c": 8}, unavailable={"a"})
    policy = make_policy(view, **options)
    r = req("R", 10, 10, 0.0, "c")
    policy.add(r, 0.0)
    assert walk(policy, view, 0.0) == ["R"]
    reqs = {
        "R": r,
        "H": req("H", 10, 5, 1.0, "a"),
        "Y_long": req("Y_long", 10, 50, 1.1, "b"),  # would outlive R: may not bypass
        "Y_a": req("Y_a", 10, 3, 1.2, "a"),  # its adapter is the blocked one
        "Y": req("Y", 10, 5, 1.3, "b"),  # predicted to finish before R: may bypass
    }
    for name in ("H", "Y_long", "Y_a", "Y"):
        policy.add(reqs[name], 1.0)
    return policy, view, reqs


def test_bypass_only_under_the_stated_condition() -> None:
    policy, view, reqs = bypass_scene()
    assert [r.request_id for r in policy.peek(2.0)] == ["Y"]
    assert walk(policy, view, 2.0) == ["Y"]
    assert policy.metrics()["bypasses"] == 1
    assert policy.preemptions(3.0) == []  # a's memory has not freed: Y keeps running


def test_no_bypass_when_disabled_or_when_the_head_is_not_blocked() -> None:
    policy, view, _ = bypass_scene(bypass=False)
    # The head is offered (the mechanism will refuse it); FIFO inside the queue means nobody passes.
    assert walk(policy, view, 2.0, fits=lambda r: r.adapter != "a") == []
    assert policy.metrics()["bypasses"] == 0

    policy, view, _ = bypass_scene()
    view.unavailable.clear()
    assert walk(policy, view, 2.0) == ["H", "Y_long", "Y_a", "Y"]
    assert policy.metrics()["bypasses"] == 0


def test_no_bypass_when_the_head_does_not_fit_its_quota() -> None:
    policy, view, _ = bypass_scene()
    policy.apply_layout(QueueLayout(), (25,))  # R holds 20: H (15) does not fit what is left
    assert walk(policy, view, 2.0) == []


def test_no_bypass_without_a_running_request_to_free_memory() -> None:
    policy, view, reqs = bypass_scene()
    finish(policy, view, reqs["R"], 1.5)
    assert walk(policy, view, 2.0) == []


def test_squash_when_memory_for_the_head_frees_first() -> None:
    policy, view, reqs = bypass_scene()
    assert walk(policy, view, 2.0) == ["Y"]
    view.unavailable.clear()  # memory freed before Y finished
    assert policy.preemptions(3.0) == [reqs["Y"]]
    assert policy.metrics()["squashes"] == 1
    preempt(policy, view, reqs["Y"], 3.0)  # what the mechanism does with it: recompute later
    assert policy.preemptions(3.0) == []  # the mark is gone with the squash
    assert walk(policy, view, 3.0) == ["H", "Y_long", "Y_a", "Y"]  # the head first again


def test_no_squash_once_the_head_was_admitted_or_the_bypasser_finished() -> None:
    policy, view, reqs = bypass_scene()
    walk(policy, view, 2.0)
    finish(policy, view, reqs["Y"], 2.5)
    view.unavailable.clear()
    assert policy.preemptions(3.0) == []

    policy, view, reqs = bypass_scene()
    walk(policy, view, 2.0)
    policy.remove(reqs["H"])  # the head was aborted
    view.unavailable.clear()
    assert policy.preemptions(3.0) == []
    assert policy.metrics()["squashes"] == 0


# --- victim and metrics ----------------------------------------------------------------------


def test_victim_is_in_the_largest_queue_with_the_most_remaining_work() -> None:
    view = FakeView()
    policy = make_policy(view)
    two_queues(policy, (1000, 2000))
    a, b, c, d = small("a"), req("b", 300, 300), req("c", 400, 200), req("d", 150, 100)
    for r in (a, b, c, d):
        policy.add(r, 0.0)
    assert walk(policy, view, 0.0) == ["a", "d", "b", "c"]  # queue 0: a, d; queue 1: b, c
    assert policy.victim(view.running) is b  # queue 1, 300 tokens to go
    b.output_token_ids = [1] * 250  # 50 to go now
    assert policy.victim(view.running) is c  # queue 1 (200 to go) beats d in queue 0 (100 to go)


def test_metrics_show_every_decision() -> None:
    policy, view, reqs = bypass_scene()
    walk(policy, view, 2.0)
    view.unavailable.clear()
    policy.preemptions(3.0)
    m = policy.metrics()
    assert m["k"] == 1 and m["cutoffs"] == [] and m["refreshes"] == 0
    assert m["bypasses"] == 1 and m["squashes"] == 1
    (q,) = m["queues"]
    assert q["arrivals"] == 5 and q["admissions"] == 2
    assert q["queue_time_s"] == pytest.approx(0.0 + (2.0 - 1.0))
    assert q["quota"] == CAPACITY and q["held"] == 20 + 15  # R and Y: prompt + output (no adapter cost here)
    assert q["waiting"] == 3 and m["waiting"] == 3


def test_adapter_memory_is_part_of_the_cost_and_sizes_scale_with_rank() -> None:
    view = FakeView(ranks={"small": 8, "big": 64}, tokens_per_rank=2)
    policy = make_policy(view)
    a, b, base = req("a", 100, 100, adapter="small"), req("b", 100, 100, adapter="big"), req("n", 100, 100)
    for r in (a, b, base):
        policy.add(r, 0.0)
    walk(policy, view, 0.0)
    assert policy.ledger.charges["a"].cost == 200 + 16
    assert policy.ledger.charges["b"].cost == 200 + 128
    assert policy.ledger.charges["n"].cost == 200
    wrs = {e.rid: e.wrs for e in policy._entries.values()}
    assert wrs["b"] == pytest.approx(8 * wrs["a"])
    assert wrs["n"] == pytest.approx(wrs["a"])  # base requests are sized like the smallest adapter
