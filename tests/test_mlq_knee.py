"""Our MLQ rules for the knee (issue 13): charges recounted from holdings with an adapter counted
once per queue, work conservation (phase 3), seat shares. The paper's literal rules: test_policy_mlq;
the SLO rules (urgency, triage): test_mlq_slo."""

from __future__ import annotations

import attrs
from test_policy_mlq import FakeView, long, req, small, walk

from chameleon.sched.mlq.clustering import QueueLayout
from chameleon.sched.mlq.policy import MLQPolicy
from chameleon.sched.options import SchedulerOptions
from chameleon.sched.predictors import make_predictor


@attrs.define
class SeatView(FakeView):
    max_num_seqs: int = 128


def policy(view: FakeView, quotas: tuple[int, ...], cutoffs: tuple[float, ...] = (), **options: object) -> MLQPolicy:
    """Our MLQ; the SLO rules (urgency, triage) off unless asked for: test_mlq_slo.py tests them."""
    options = {"urgent_fraction": None, "triage": False, **options}
    p = MLQPolicy(make_predictor("oracle"), SchedulerOptions(predictor="oracle", early_first_refresh=False, **options))  # type: ignore[arg-type]
    p.bind(view)
    p.apply_layout(QueueLayout(cutoffs), quotas)
    return p


def test_held_charges_an_adapter_once_per_queue() -> None:
    def admitted(charge: str) -> int:
        view = SeatView(ranks={"a": 8}, tokens_per_rank=10)  # the adapter: 80 KV tokens
        p = policy(view, (200,), quota_charge=charge, work_conserving=False, seat_shares=False)
        for i in range(8):
            p.add(req(f"s{i}", 10, 10, adapter="a"), 0.0)
        return len(walk(p, view, 1.0))

    assert admitted("upfront") == 2  # 100 each: 20 of KV + the whole adapter, every time
    assert admitted("held") == 6  # 100 for the first, 20 for each one sharing its adapter


def test_recount_follows_what_running_requests_hold() -> None:
    view = SeatView()
    p = policy(view, (100,), work_conserving=False, seat_shares=False)
    p.add(req("a", 10, 40), 0.0)
    assert walk(p, view, 0.0) == ["a"]
    p.add(req("b", 10, 40), 0.0)
    walk(p, view, 0.1)
    assert p.ledger.held(0) == 100  # a: 10 + 40 predicted; b: 50
    view.running[0].output_token_ids = [7] * 60  # a outgrew its prediction: it holds 70 now
    p.add(req("c", 10, 5), 0.0)
    assert walk(p, view, 0.2) == []  # the recount sees 120 held: no quota left
    assert p.ledger.held(0) == 120


def test_work_conservation_admits_what_quotas_leave_oldest_first() -> None:
    view = SeatView()
    literal = policy(view, (40, 600), (0.25,), quota_charge="upfront", work_conserving=False, seat_shares=False)
    ours = policy(SeatView(), (40, 600), (0.25,), seat_shares=False)
    for p in (literal, ours):
        p.add(long("L0", 0.0), 0.0)
        p.add(long("L1", 0.1), 0.1)
        for i in range(4):
            p.add(small(f"s{i}", 0.2 + i), 0.2 + i)
    assert walk(literal, view, 5.0) == ["s0", "s1", "L0"]
    assert walk(ours, ours.view, 5.0) == ["s0", "s1", "L0", "L1", "s2", "s3"]  # phase 3: oldest first


def test_seat_shares_bound_a_queue_in_phase_one() -> None:
    view = SeatView(max_num_seqs=10)
    p = policy(view, (200, 800), (0.25,), work_conserving=False)
    for i in range(5):
        p.add(small(f"s{i}", 0.1 * i), 0.1 * i)
    p.add(long("L0", 1.0), 1.0)
    # Queue 0 holds 20% of the quota: 2 of 10 seats in phase 1; L0 goes next, then phase 2.
    assert walk(p, view, 2.0) == ["s0", "s1", "L0", "s2", "s3", "s4"]
