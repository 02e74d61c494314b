"""FastServe's skip-join MLFQ policy on hand-built scenarios: a fake view, explicit clock values."""

from __future__ import annotations

import attrs
import pytest

from chameleon.sampling_params import SamplingParams
from chameleon.sched import make_policy
from chameleon.sched.mlfq import DEFAULT_PREFILL_S_PER_TOKEN, EMA_WEIGHT, MLFQPolicy
from chameleon.sched.options import SchedulerOptions
from chameleon.sched.request import Request, RequestStatus

# Quanta: level 0: 0.05 s, 1: 0.1 s, 2: 0.2 s, 3: 0.4 s. Default prefill cost 1e-4 s/token.
OPTIONS = SchedulerOptions(mlfq_levels=4, mlfq_base_quantum_s=0.05, mlfq_promote_after_s=0.3)


@attrs.define
class FakeView:
    running: list[Request] = attrs.field(factory=list)
    kv_capacity_tokens: int = 10_000
    max_model_len: int = 4096

    def adapter_rank(self, name: str) -> int:
        return 8

    def max_adapter_rank(self) -> int:
        return 8

    def adapter_available(self, name: str, now: float) -> bool:
        return True

    def adapter_token_cost(self, name: str | None) -> int:
        return 0


def req(rid: str, prompt: int, t: float = 0.0) -> Request:
    return Request(rid, [1] * prompt, SamplingParams(max_tokens=8), arrival_time=t)


def policy_and_view(options: SchedulerOptions = OPTIONS) -> tuple[MLFQPolicy, FakeView]:
    view = FakeView()
    policy = MLFQPolicy(options)
    policy.bind(view)
    return policy, view


def admit(policy: MLFQPolicy, view: FakeView, now: float, limit: int | None = None) -> list[str]:
    """The scheduler's admission walk with room for `limit` more requests."""
    taken: list[str] = []
    walk = policy.walk(now)
    while limit is None or len(taken) < limit:
        request = walk.next()
        if request is None:
            break
        walk.accept(now)
        request.status = RequestStatus.RUNNING
        view.running.append(request)
        taken.append(request.request_id)
    walk.close()
    return taken


def preempt(policy: MLFQPolicy, view: FakeView, request: Request, now: float) -> None:
    view.running.remove(request)
    policy.left_running(request, now)
    request.status = RequestStatus.WAITING
    request.swapped = True
    policy.requeue(request, now)


def level_of(policy: MLFQPolicy, rid: str) -> int:
    return policy._jobs[rid].level


def test_make_policy_builds_it_with_swapping() -> None:
    policy = make_policy("mlfq", OPTIONS)
    assert isinstance(policy, MLFQPolicy) and policy.swap_preempted


# --- skip-join -------------------------------------------------------------------------------


def test_skip_join_enters_the_first_level_whose_quantum_covers_the_prefill() -> None:
    policy, _ = policy_and_view()
    assert policy.prefill_s_per_token == DEFAULT_PREFILL_S_PER_TOKEN
    for rid, prompt in [("a", 100), ("b", 500), ("c", 501), ("d", 1500), ("e", 4000), ("f", 100_000)]:
        policy.add(req(rid, prompt), 0.0)
    # Predicted prefill: a 0.01 s, b 0.05 s (= quantum 0), c 0.0501, d 0.15, e 0.4, f 10 s.
    assert [level_of(policy, r) for r in "abcdef"] == [0, 0, 1, 2, 3, 3]
    assert [r.request_id for r in policy.peek(0.0)] == list("abcdef")  # by level, then order
    assert [lv["joins"] for lv in policy.metrics()["levels"]] == [2, 1, 1, 2]


def test_prefill_cost_is_learned_from_iterations_with_prefill_work() -> None:
    policy, view = policy_and_view()
    a = req("a", 1000)
    policy.add(a, 0.0)
    admit(policy, view, 0.0)
    policy.on_iteration([a], 1.0, 1.0)  # 1000 prefill tokens in 1 s: 1e-3 s/token
    expected = DEFAULT_PREFILL_S_PER_TOKEN + EMA_WEIGHT * (1e-3 - DEFAULT_PREFILL_S_PER_TOKEN)
    assert policy.prefill_s_per_token == pytest.approx(expected)
    a.num_computed_tokens = 1000
    a.output_token_ids = [5]
    policy.on_iteration([a], 5.0, 6.0)  # decode only: not a prefill measurement
    assert policy.prefill_s_per_token == pytest.approx(expected)
    policy.add(req("b", 100), 6.0)  # 100 * 1.9e-4 = 0.019 s: still level 0
    policy.add(req("c", 400), 6.0)  # 0.076 s: level 1 now (it was level 0 with the default cost)
    assert level_of(policy, "b") == 0 and level_of(policy, "c") == 1


# --- demotion and promotion ------------------------------------------------------------------


def test_demotion_when_the_quantum_is_used_up() -> None:
    policy, view = policy_and_view()
    a = req("a", 10)
    policy.add(a, 0.0)
    admit(policy, view, 0.0)
    a.num_computed_tokens = 10  # decoding from now on: the prefill estimate stays put
    a.output_token_ids = [1]
    policy.on_iteration([a], 0.03, 0.03)
    assert level_of(policy, "a") == 0
    policy.on_iteration([a], 0.03, 0.06)  # 0.06 s > 0.05 s quantum
    assert level_of(policy, "a") == 1 and policy._jobs["a"].level_time_s == 0.0
    for t in range(1, 30):
        policy.on_iteration([a], 0.11, 0.06 + 0.11 * t)
    assert level_of(policy, "a") == 3  # the last level keeps it
    assert [lv["demotions"] for lv in policy.metrics()["levels"]] == [1, 1, 1, 0]


def test_promotion_to_level_0_after_waiting_alpha() -> None:
    policy, view = policy_and_view()
    low = req("low", 1500)  # level 2
    policy.add(low, 0.0)
    policy.preemptions(0.29)
    assert level_of(policy, "low") == 2
    policy.preemptions(0.3)
    assert level_of(policy, "low") == 0 and policy._jobs["low"].level_time_s == 0.0
    assert policy.metrics()["levels"][2]["promotions"] == 1


def test_promotion_clock_restarts_when_a_job_runs_and_is_requeued() -> None:
    policy, view = policy_and_view()
    a = req("a", 1500)  # level 2
    policy.add(a, 0.0)
    admit(policy, view, 0.1)
    policy.on_iteration([a], 0.1, 0.2)
    preempt(policy, view, a, 0.25)
    policy.preemptions(0.5)  # waited 0.25 s since it last ran: not yet
    assert level_of(policy, "a") == 2
    policy.preemptions(0.55)
    assert level_of(policy, "a") == 0


def test_promoted_jobs_keep_their_place_in_line() -> None:
    policy, view = policy_and_view()
    policy.add(req("old", 1500), 0.0)  # level 2
    policy.add(req("new", 10), 0.2)  # level 0
    assert [r.request_id for r in policy.peek(0.2)] == ["new", "old"]
    assert [r.request_id for r in policy.peek(0.3)] == ["old", "new"]  # promoted, older


# --- preemption ------------------------------------------------------------------------------


def running_low_jobs(policy: MLFQPolicy, view: FakeView) -> list[Request]:
    jobs = [req("r1", 1500, 0.0), req("r2", 1500, 0.01), req("r3", 600, 0.02)]  # levels 2, 2, 1
    for j in jobs:
        policy.add(j, j.arrival_time)
    admit(policy, view, 0.05)
    return jobs


def test_preemption_of_lower_priority_running_jobs_when_better_ones_wait() -> None:
    policy, view = policy_and_view()
    r1, r2, r3 = running_low_jobs(policy, view)
    policy.add(req("hi1", 10, 0.1), 0.1)
    policy.add(req("hi2", 10, 0.1), 0.1)
    assert policy.preemptions(0.1) == []  # new arrivals get a chance to be admitted first
    assert admit(policy, view, 0.1, limit=0) == []  # the batch is full: no room for them
    # Two contenders at level 0: the two worst running jobs go, latest arrival first.
    assert policy.preemptions(0.12) == [r2, r1]
    assert [lv["preemptions"] for lv in policy.metrics()["levels"]] == [0, 0, 2, 0]
    for r in (r2, r1):
        preempt(policy, view, r, 0.12)
    assert admit(policy, view, 0.12, limit=2) == ["hi1", "hi2"]


def test_no_preemption_for_equal_or_lower_priority_waiters() -> None:
    policy, view = policy_and_view()
    running_low_jobs(policy, view)
    policy.add(req("same", 1500, 0.1), 0.1)  # level 2: not better than the worst running job
    admit(policy, view, 0.1, limit=0)
    assert policy.preemptions(0.12) == []


def test_one_preemption_per_contender_and_only_while_it_is_better() -> None:
    policy, view = policy_and_view()
    r1, r2, r3 = running_low_jobs(policy, view)
    policy.add(req("mid", 600, 0.1), 0.1)  # level 1: beats the level-2 jobs only
    policy.add(req("lo", 4000, 0.1), 0.1)  # level 3: beats nobody
    admit(policy, view, 0.1, limit=0)
    assert policy.preemptions(0.12) == [r2]


def test_a_preempted_job_keeps_its_level_and_service_and_queues_behind() -> None:
    policy, view = policy_and_view()
    r1, r2, r3 = running_low_jobs(policy, view)
    policy.on_iteration([r1, r2, r3], 0.08, 0.13)
    policy.add(req("w", 1500, 0.13), 0.13)  # level 2
    preempt(policy, view, r2, 0.14)
    assert level_of(policy, "r2") == 2 and policy._jobs["r2"].level_time_s == pytest.approx(0.08)
    assert [r.request_id for r in policy.peek(0.14)] == ["w", "r2"]


# --- victim and metrics ----------------------------------------------------------------------


def test_victim_is_the_lowest_priority_latest_arrival() -> None:
    policy, view = policy_and_view()
    r1, r2, r3 = running_low_jobs(policy, view)
    assert policy.victim(view.running) is r2  # level 2, arrived after r1
    policy.on_iteration([r3], 0.2, 0.3)  # r3: level 1 -> 2 (0.2 s > 0.1 s)
    assert policy.victim(view.running) is r3  # level 2 now, and the latest arrival


def test_metrics_per_level() -> None:
    policy, view = policy_and_view()
    running_low_jobs(policy, view)
    policy.add(req("hi", 10, 0.1), 0.1)
    admit(policy, view, 0.1, limit=0)
    policy.preemptions(0.12)
    m = policy.metrics()
    assert len(m["levels"]) == 4 and m["waiting"] == 1
    assert [lv["quantum_s"] for lv in m["levels"]] == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert [lv["joins"] for lv in m["levels"]] == [1, 1, 2, 0]
    assert [lv["admissions"] for lv in m["levels"]] == [0, 1, 2, 0]
    assert m["levels"][2]["queue_time_s"] == pytest.approx(0.05 + 0.04)
    assert m["levels"][2]["preemptions"] == 1
    assert {"demotions", "promotions"} <= m["levels"][0].keys()


def test_aborts_and_completions_leave_no_state_behind() -> None:
    policy, view = policy_and_view()
    a, b, c = req("a", 10), req("b", 10), req("c", 10)
    for r in (a, b, c):
        policy.add(r, 0.0)
    admit(policy, view, 0.0, limit=2)
    policy.remove(c)  # aborted while waiting
    view.running.remove(a)
    policy.left_running(a, 0.1)
    policy.completed(a, 0.1)
    view.running.remove(b)
    policy.left_running(b, 0.1)  # aborted while running: no completion follows
    policy.preemptions(0.2)
    assert len(policy) == 0 and not policy._jobs
