"""Our MLQ rules for the TTFT SLO (issue 13): urgency (a request waiting longer than a share of the
SLO goes first, oldest first) and triage (a request that already missed the SLO goes last, within a
budget of the recent arrivals). docs/scheduling.md, "MLQ and the TTFT SLO"."""

from __future__ import annotations

import pytest
from test_mlq_knee import SeatView, policy
from test_policy_mlq import FakeView, finish, long, preempt, small, walk

from chameleon.errors import ConfigError
from chameleon.sched.mlq.policy import MLQPolicy
from chameleon.sched.options import SchedulerOptions


def one_seat(view: FakeView) -> object:
    return lambda r: len(view.running) < 1


def first(p: MLQPolicy, view: FakeView, now: float) -> list[str]:
    return walk(p, view, now, one_seat(view))  # type: ignore[arg-type]


def test_urgency_puts_a_long_wait_ahead_of_the_quotas() -> None:
    def order(urgent_fraction: float | None, now: float) -> list[str]:
        view = SeatView()
        p = policy(view, (200, 800), (0.25,), urgent_fraction=urgent_fraction)
        p.add(long("L0", 0.0), 0.0)
        p.add(small("s0", now - 0.1), now - 0.1)
        return first(p, view, now)

    assert order(0.2, 0.5) == ["s0"]  # L0 waited 0.5 s < 0.2 x 5 s: queue 0 first, as MLQ says
    assert order(0.2, 2.0) == ["L0"]  # 2 s > 1 s: urgent, before any quota
    assert order(None, 2.0) == ["s0"]  # the rule off: MLQ's order


def test_urgent_requests_go_oldest_first_across_queues() -> None:
    view = SeatView()
    p = policy(view, (200, 800), (0.25,), urgent_fraction=0.2)
    p.add(small("s0", 0.3), 0.3)
    p.add(long("L0", 0.2), 0.2)
    p.add(small("s1", 0.1), 0.1)
    assert walk(p, view, 3.0) == ["s1", "L0", "s0"]


def test_triage_puts_a_missed_request_after_those_that_can_still_make_it() -> None:
    view = SeatView()
    p = policy(view, (200, 800), (0.25,), urgent_fraction=0.2, triage=True, triage_budget=0.5)
    p.add(long("L0", 0.0), 0.0)  # will have waited 6 s: missed the 5 s SLO
    p.add(small("s0", 3.0), 3.0)
    p.add(small("s1", 5.5), 5.5)
    assert first(p, view, 6.0) == ["s0"]  # 1 miss in 3 arrivals <= 50%: L0 goes last
    assert p.triage.active and p.metrics()["slo_misses"] == 1
    finish(p, view, view.running[0], 6.1)
    assert first(p, view, 6.2) == ["s1"]
    finish(p, view, view.running[0], 6.3)
    assert first(p, view, 6.4) == ["L0"]  # never starved: admitted when no one else waits


def test_triage_switches_off_beyond_its_budget() -> None:
    view = SeatView()
    p = policy(view, (200, 800), (0.25,), urgent_fraction=0.2, triage=True, triage_budget=0.5)
    p.add(long("L0", 0.0), 0.0)
    p.add(long("L1", 0.5), 0.5)
    p.add(small("s0", 5.8), 5.8)
    # At 6 s two of three arrivals missed the SLO (> 50%): the oldest goes first, FIFO.
    assert first(p, view, 6.0) == ["L0"]
    assert not p.triage.active and p.metrics()["triage_on"] is False


def test_a_preempted_request_with_a_first_token_never_counts_as_missed() -> None:
    view = SeatView()
    p = policy(view, (200, 800), (0.25,), urgent_fraction=0.2, triage=True, triage_budget=1.0)
    r = long("L0", 0.0)
    p.add(r, 0.0)
    assert walk(p, view, 0.0) == ["L0"]
    r.first_token_time = 0.1
    preempt(p, view, r, 0.2)
    p.add(small("s0", 7.9), 7.9)
    assert first(p, view, 8.0) == ["L0"]  # old and urgent, but not missed: it resumes first
    assert p.triage.misses == 0


def test_the_papers_literal_mlq_has_neither_rule() -> None:
    from chameleon.sched import make_policy

    literal = make_policy("chameleon-paper")
    assert isinstance(literal, MLQPolicy)
    assert literal.options.urgent_fraction is None and not literal.options.triage
    ours = make_policy("chameleon")
    assert isinstance(ours, MLQPolicy)
    assert ours.options.urgent_fraction == 0.2 and ours.options.triage and ours.options.triage_budget == 0.01


@pytest.mark.parametrize("field,value", [("urgent_fraction", 1.5), ("urgent_fraction", -0.1), ("triage_budget", 2.0)])
def test_slo_rule_options_are_validated(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        SchedulerOptions(**{field: value})  # type: ignore[arg-type]
