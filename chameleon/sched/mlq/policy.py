"""Chameleon's quota-based multi-level queue (paper §4.3) behind the `AdmissionPolicy` interface.

Requests are sized by WRS, queued by K-means cut-offs, and admitted from per-queue M/M/1 quotas,
then the leftover (phases in `docs/scheduling.md`, MLQ). A head whose adapter cannot fit may be
bypassed by a younger request predicted to finish first (squashed if memory frees first).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

from chameleon.sched.mlq.clustering import QueueLayout
from chameleon.sched.mlq.entry import Entry as _Entry
from chameleon.sched.mlq.entry import Offer as _Offer
from chameleon.sched.mlq.entry import Outcome as _Outcome
from chameleon.sched.mlq.entry import QueueCounters as _QueueCounters
from chameleon.sched.mlq.entry import remaining_predicted
from chameleon.sched.mlq.estimators import ArrivalRateEstimator
from chameleon.sched.mlq.quotas import QuotaLedger, assign_quotas
from chameleon.sched.mlq.sizing import weighted_request_size
from chameleon.sched.mlq.triage import SloTriage
from chameleon.sched.options import SchedulerOptions
from chameleon.sched.policy import GeneratorWalk, PolicyBase, SchedulingView, Walk
from chameleon.sched.prediction import observe, predict
from chameleon.sched.predictors import OutputLengthPredictor
from chameleon.sched.request import Request

__all__ = ["BYPASS_SCAN", "MLQPolicy"]

BYPASS_SCAN = 64  # younger requests of a blocked head's queue considered as bypassers
PHASE3_SCAN = 256  # oldest waiting requests phase 3 offers in one iteration


class MLQPolicy(PolicyBase):
    """Chameleon's MLQ (module docstring; the rules in docs/scheduling.md)."""

    swap_preempted = False

    def __init__(self, predictor: OutputLengthPredictor, options: SchedulerOptions | None = None) -> None:
        super().__init__()
        self.predictor = predictor
        self.options = options or SchedulerOptions()
        self.layout = QueueLayout()
        self.ledger = QuotaLedger([0])
        self._entries: dict[str, _Entry] = {}
        self._queues: list[list[_Entry]] = [[]]
        self._left: dict[str, _Entry] = {}  # left running, not (yet) requeued or completed
        self._bypassers: dict[str, _Entry] = {}
        self._offer: _Offer | None = None
        self._queue_adapters: set[tuple[int, str | None]] = set()  # (queue, adapter) held by running
        self._wrs_window: deque[float] = deque(maxlen=self.options.wrs_window)
        self._events: deque[tuple[float, float, float, bool]] = deque()  # (t, wrs, tokens|service, arrival?)
        o = self.options
        self.triage = SloTriage(o.slo_ttft_s, o.triage_budget, o.rate_window_s, enabled=o.triage)
        self._estimators: list[ArrivalRateEstimator] = []
        self._estimator_layout = self.layout  # the layout the estimators classify by
        self._counters: list[_QueueCounters] = [_QueueCounters()]
        self._order = itertools.count()
        self._min_rank_seen: int | None = None
        self._start: float | None = None
        self._now = float("-inf")
        self._next_refresh = float("inf")
        self.bypasses = 0
        self.squashes = 0
        self.refreshes = 0

    def bind(self, view: SchedulingView) -> None:
        super().bind(view)
        self.ledger = QuotaLedger([view.kv_capacity_tokens])

    # --- arrivals and departures -------------------------------------------------------------

    def add(self, request: Request, now: float) -> None:
        now = self._tick(now)
        predicted = predict(self.predictor, request)
        wrs = self._wrs(request, predicted)
        queue = self.layout.queue_of(wrs)
        entry = _Entry(
            request=request,
            predicted=predicted,
            wrs=wrs,
            adapter_tokens=self.view.adapter_token_cost(request.adapter),
            key=(request.arrival_time, next(self._order)),
            queue=queue,
            enqueued_at=now,
        )
        self._left.pop(request.request_id, None)  # an earlier request under this id is gone for good
        self._entries[request.request_id] = entry
        self._insert(entry)
        self._wrs_window.append(wrs)
        self._log(now, wrs, entry.cost(), arrival=True)
        self._estimators[queue].record_arrival(now, entry.cost())
        self._counters[queue].arrivals += 1
        self.triage.arrived(entry, now)

    def requeue(self, request: Request, now: float) -> None:
        entry = self._left.pop(request.request_id, None) or self._entries[request.request_id]
        entry.queue = self.layout.queue_of(entry.wrs)
        entry.enqueued_at = now
        entry.waiting = True
        self._insert(entry)

    def remove(self, request: Request) -> None:
        entry = self._entries.pop(request.request_id, None)
        if entry is not None and entry.waiting:
            self._unlink(entry)
            entry.waiting = False

    def admitted(self, request: Request, now: float) -> None:
        entry = self._entries[request.request_id]
        offer, self._offer = self._offer, None
        if offer is None or offer.entry is not entry:  # outside a walk: charge what is left
            self.ledger.try_take(entry.queue, min(entry.cost(), self.ledger.remaining(entry.queue)), entry.rid)
            offer = _Offer(entry, leftover=False, bypassed=None)
        self._unlink(entry)
        entry.waiting = False
        self._note_adapter(entry)
        counters = self._counters[entry.queue]
        counters.admissions += 1
        counters.leftover_admissions += offer.leftover
        counters.queue_time_s += max(0.0, now - entry.enqueued_at)
        if offer.bypassed is not None:
            entry.bypassed = offer.bypassed
            self._bypassers[entry.rid] = entry
            self.bypasses += 1

    def left_running(self, request: Request, now: float) -> None:
        if request.request_id in self.ledger.charges:
            self.ledger.give_back(request.request_id)
        entry = self._entries.get(request.request_id)
        if entry is None:
            return
        self._bypassers.pop(entry.rid, None)
        entry.bypassed = None
        self._left[entry.rid] = entry

    def completed(self, request: Request, now: float) -> None:
        observe(self.predictor, request)
        entry = self._left.pop(request.request_id, None)
        self._entries.pop(request.request_id, None)
        if entry is None:
            return
        now = self._tick(now)
        started = request.first_scheduled_time
        service = max(0.0, now - started) if started is not None else 0.0
        self._log(now, entry.wrs, service, arrival=False)
        self._estimators[min(entry.queue, len(self._estimators) - 1)].record_service(now, service)

    # --- each iteration ----------------------------------------------------------------------

    def preemptions(self, now: float) -> list[Request]:
        now = self._tick(now)
        for rid, entry in list(self._left.items()):  # still here: aborted while running
            if self._entries.get(rid) is entry:  # not a later request that reuses the id
                del self._entries[rid]
            del self._left[rid]
        return self._squashes(now)

    def walk(self, now: float) -> Walk:
        now = self._tick(now)
        if self.options.quota_charge == "held":
            self._recount()
        self.triage.update(now, self._entries)
        return GeneratorWalk(self, self._offers(now))

    def _offers(self, now: float) -> Generator[Request, None, None]:
        spilled: list[int] = []  # queues stopped by their own quota: they go on in phase 2
        try:
            yield from self._urgent(now)
            for q in range(self.layout.num_queues):
                if (yield from self._phase1(q, now)):
                    spilled.append(q)
            for q in spilled:
                yield from self._phase2(q, now)
            if self.options.work_conserving:
                yield from self._oldest_first(now, late=False)
            if self.triage.active:
                yield from self._oldest_first(now, late=True)
        finally:
            self._withdraw()

    def _recount(self) -> None:
        """`quota_charge="held"`: charges become holdings + predicted remainder (docs/scheduling.md)."""
        ledger = QuotaLedger(self.ledger.quotas)
        self._queue_adapters = set()
        for request in self.view.running:
            entry = self._entries.get(request.request_id)
            if entry is not None and entry.rid not in ledger.charges:
                ledger.force(entry.queue, self._charge(entry), entry.rid)
                self._note_adapter(entry)
        self.ledger = ledger

    def _note_adapter(self, entry: _Entry) -> None:
        if entry.request.adapter is not None:
            self._queue_adapters.add((entry.queue, entry.request.adapter))

    def _urgent(self, now: float) -> Generator[Request, None, None]:
        """`urgent_fraction` (ours): a request that waited longer than that share of the TTFT SLO
        is offered before any quota, oldest first (EDF under one SLO), without quota; the recount
        charges it to its queue. Missed requests are urgent too while triage is off."""
        fraction = self.options.urgent_fraction
        if fraction is not None:
            cut = now - fraction * self.options.slo_ttft_s
            yield from self._offer_oldest(lambda e: not self.triage.last(e), while_=lambda e: e.key[0] <= cut)

    def _oldest_first(self, now: float, *, late: bool) -> Generator[Request, None, None]:
        """Work conservation (ours, phase 3): whatever the quotas left unadmitted may still run,
        oldest first across all queues, while the mechanism has seats, tokens and memory; nothing is
        charged beyond what the next recount sees it hold. Under triage the requests that can still
        meet the TTFT SLO go first (`late=False`), then, in a last pass, those that missed it."""
        yield from self._offer_oldest(lambda e: self.triage.last(e) == late)

    def _offer_oldest(
        self, keep: Callable[[_Entry], bool], *, while_: Callable[[_Entry], bool] | None = None
    ) -> Generator[Request, None, None]:
        """Offer up to PHASE3_SCAN waiting requests that `keep` admits, oldest first across queues,
        no quota taken. `while_`: each queue is read in FIFO order only while it holds."""

        def pick(queue: list[_Entry]) -> Iterator[_Entry]:
            for entry in queue:
                if while_ is not None and not while_(entry):
                    return
                if keep(entry):
                    yield entry

        chosen = list(itertools.islice(heapq.merge(*map(pick, self._queues), key=lambda e: e.key), PHASE3_SCAN))
        for entry in chosen:
            if entry.waiting:
                yield from self._try(entry, 0, [entry.queue], None)

    def _on_time(self, q: int) -> list[_Entry]:
        """Queue q's waiting requests in FIFO order, without those triage puts last. Bounded: a
        phase admits at most `max_num_seqs` per iteration."""
        limit = self.view.max_num_seqs + BYPASS_SCAN + 1
        return list(itertools.islice((e for e in self._queues[q] if not self.triage.last(e)), limit))

    def skip_blocked(self, request: Request) -> bool:
        return True

    def victim(self, running: Sequence[Request]) -> Request:
        def key(item: tuple[int, Request]) -> tuple[int, int, int]:
            position, request = item
            entry = self._entries.get(request.request_id)
            return (entry.queue if entry is not None else -1, remaining_predicted(entry), position)

        return max(enumerate(running), key=key)[1]

    def metrics(self) -> dict[str, Any]:
        queues = []
        for q, c in enumerate(self._counters):
            current = q < self.layout.num_queues
            queues.append(
                {
                    "arrivals": c.arrivals,
                    "admissions": c.admissions,
                    "leftover_admissions": c.leftover_admissions,
                    "queue_time_s": c.queue_time_s,
                    "quota": self.ledger.quotas[q] if current else 0,
                    "held": self.ledger.held(q) if current else 0,
                    "waiting": len(self._queues[q]) if current else 0,
                }
            )
        return {
            "k": self.layout.num_queues,
            "cutoffs": list(self.layout.cutoffs),
            "queues": queues,
            "bypasses": self.bypasses,
            "squashes": self.squashes,
            "refreshes": self.refreshes,
            "slo_misses": self.triage.misses,
            "triage_on": self.triage.active,
            "waiting": len(self),
        }

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues)

    # --- the walk ----------------------------------------------------------------------------

    def _phase1(self, q: int, now: float) -> Generator[Request, None, bool]:
        """Offer queue q's requests FIFO from its own quota. Returns True if its quota stopped it."""
        candidates = self._on_time(q)
        for i, head in enumerate(candidates):
            cost = self._charge(head)
            if cost > self.ledger.remaining(q) or not self._seat_left(q):
                return True
            if self._adapter_blocked(head, now):
                yield from self._bypass(head, candidates[i + 1 : i + 1 + BYPASS_SCAN], now)
                return False
            if (yield from self._try(head, cost, None, None)) is not _Outcome.ADMITTED:
                return False
        return False

    def _phase2(self, q: int, now: float) -> Generator[Request, None, None]:
        """Offer queue q's requests FIFO from the leftover of idle queues (and its own remainder)."""
        for head in self._on_time(q):
            lenders = [i for i, waiting in enumerate(self._queues) if not waiting and i != q] + [q]
            if (yield from self._try(head, self._charge(head), lenders, None)) is not _Outcome.ADMITTED:
                return

    def _bypass(self, head: _Entry, younger: list[_Entry], now: float) -> Generator[Request, None, None]:
        """Offer younger requests of head's queue that should finish before memory for `head` frees."""
        horizon = self._memory_horizon()
        if horizon is None:
            return
        for entry in younger:
            if not entry.waiting or remaining_predicted(entry) >= horizon:
                continue
            if entry.request.adapter is not None and not self.view.adapter_available(entry.request.adapter, now):
                continue
            if (yield from self._try(entry, self._charge(entry), None, head)) is not _Outcome.ADMITTED:
                return

    def _try(
        self, entry: _Entry, cost: int, lenders: list[int] | None, bypassed: _Entry | None
    ) -> Generator[Request, None, _Outcome]:
        """Take quota tentatively and offer the request; the take stands only if it is admitted."""
        if lenders is None:
            took = self.ledger.try_take(entry.queue, cost, entry.rid)
        else:
            took = self.ledger.try_take_leftover(entry.queue, cost, entry.rid, lenders)
        if not took:
            return _Outcome.NO_QUOTA
        self._offer = _Offer(entry, leftover=lenders is not None, bypassed=bypassed)
        yield entry.request
        if self._offer is not None and self._offer.entry is entry:  # pulled on without admitting it
            self._withdraw()
            return _Outcome.REFUSED
        return _Outcome.ADMITTED

    def _withdraw(self) -> None:
        """Give back the tentative take of an offer that was not admitted."""
        offer, self._offer = self._offer, None
        if offer is not None and offer.entry.rid in self.ledger.charges:
            self.ledger.give_back(offer.entry.rid)

    def _charge(self, entry: _Entry) -> int:
        """The request's cost, capped at its queue's whole quota (module docstring). Under
        `quota_charge="held"` an adapter another request of the queue already holds costs nothing."""
        cost = entry.cost()
        if self.options.quota_charge == "held" and (entry.queue, entry.request.adapter) in self._queue_adapters:
            cost -= entry.adapter_tokens
        return min(cost, self.ledger.quotas[entry.queue])

    def _seat_left(self, q: int) -> bool:
        """`seat_shares` (ours): a queue holds at most its quota's share of `max_num_seqs` seats."""
        if not self.options.seat_shares or self.layout.num_queues == 1:
            return True
        total = sum(self.ledger.quotas) or 1
        share = max(1, math.ceil(self.view.max_num_seqs * self.ledger.quotas[q] / total))
        used = sum(1 for c in self.ledger.charges.values() if c.queue == q)
        return used < share

    # --- bypass and squash -------------------------------------------------------------------

    def _adapter_blocked(self, entry: _Entry, now: float) -> bool:
        adapter = entry.request.adapter
        return self.options.bypass and adapter is not None and not self.view.adapter_available(adapter, now)

    def _memory_horizon(self) -> int | None:
        """Predicted tokens until memory frees for a blocked head (module docstring), None: never."""
        running = self.view.running
        holders = [r for r in running if r.adapter is not None] or list(running)
        return min((remaining_predicted(self._entries.get(r.request_id)) for r in holders), default=None)

    def _squashes(self, now: float) -> list[Request]:
        if not self._bypassers:
            return []
        out = []
        running = set(map(id, self.view.running))
        for rid, entry in list(self._bypassers.items()):
            head = entry.bypassed
            if head is None or not head.waiting or head.rid not in self._entries:
                entry.bypassed = None
                del self._bypassers[rid]
                continue
            adapter = head.request.adapter
            if id(entry.request) in running and adapter is not None and self.view.adapter_available(adapter, now):
                out.append(entry.request)
                self.squashes += 1
        return out

    # --- sizes, layout, quotas ---------------------------------------------------------------

    def _wrs(self, request: Request, predicted: int) -> float:
        view = self.view
        max_rank = view.max_adapter_rank()
        rank = None
        if request.adapter is not None:
            rank = view.adapter_rank(request.adapter)
            self._min_rank_seen = rank if self._min_rank_seen is None else min(self._min_rank_seen, rank)
        return weighted_request_size(
            len(request.prompt_token_ids),
            predicted,
            rank,
            max_input=view.max_model_len,
            max_output=view.max_model_len,
            max_adapter=max_rank if max_rank > 0 else None,
            min_adapter=self._min_rank_seen or max_rank or None,
            input_weight=self.options.input_weight,
            output_weight=self.options.output_weight,
        )

    def _tick(self, now: float) -> float:
        """Monotonic clock; starts the estimators and runs a due refresh. Returns the clock."""
        self._now = max(self._now, now)
        if self._start is None:
            self._start = self._now
            self._next_refresh = self._now + self.options.refresh_period_s
            self._estimators = [self.options.estimator(self._start) for _ in range(self.layout.num_queues)]
            self._estimator_layout = self.layout
        first = self.refreshes == 0 and len(self._wrs_window) >= self.options.min_cluster_samples
        if (self._now >= self._next_refresh or (first and self.options.early_first_refresh)) and self._offer is None:
            self.refresh(self._now)
        return self._now

    def refresh(self, now: float) -> None:
        """Refit the layout on the WRS window, then `apply_layout` with quotas from the estimators."""
        self._next_refresh = now + self.options.refresh_period_s
        self.refreshes += 1
        layout = self.options.fit_layout(list(self._wrs_window)) if self._wrs_window else QueueLayout()
        self._replay(layout, now)
        demand = [0] * layout.num_queues
        for entry in self._entries.values():
            demand[layout.queue_of(entry.wrs)] += entry.cost()
        total = self.view.kv_capacity_tokens
        if self.options.k_rule == "static":  # Ch-Static: equal token quotas
            k = layout.num_queues
            quotas: Sequence[int] = [total // k + (q < total % k) for q in range(k)]
        else:
            stats = [e.stats(now, demand[q]) for q, e in enumerate(self._estimators)]
            quotas = assign_quotas(total, stats, slo_s=self.options.slo_ttft_s)
        self.apply_layout(layout, quotas)

    def apply_layout(self, layout: QueueLayout, quotas: Sequence[int]) -> None:
        """Impose a layout and its quotas: re-place every request by WRS, reset the ledger (in-flight
        charges move in full to their request's new queue). `refresh` ends here; tests and
        experiments may call it directly."""
        if len(quotas) != layout.num_queues:
            raise ValueError(f"{layout.num_queues} queues but {len(quotas)} quotas")
        self.layout = layout
        self._queues = [[] for _ in range(layout.num_queues)]
        for entry in sorted(self._entries.values(), key=lambda e: e.key):
            entry.queue = layout.queue_of(entry.wrs)
            if entry.waiting:
                self._queues[entry.queue].append(entry)
        homes = {h: self._entries[h].queue for h in self.ledger.charges if h in self._entries}
        self.ledger.reset(quotas, requeue=homes)
        self._counters += [_QueueCounters() for _ in range(layout.num_queues - len(self._counters))]
        if self._start is not None and self._estimator_layout != layout:
            self._replay(layout, self._now)

    def _replay(self, layout: QueueLayout, now: float) -> None:
        """Per-queue estimators for `layout`, rebuilt from the events of the last `rate_window_s`."""
        assert self._start is not None
        self._estimators = [self.options.estimator(self._start) for _ in range(layout.num_queues)]
        self._estimator_layout = layout
        self._prune(now)
        for t, wrs, value, arrival in self._events:
            estimator = self._estimators[layout.queue_of(wrs)]
            if arrival:
                estimator.record_arrival(t, int(value))
            else:
                estimator.record_service(t, value)

    def _log(self, t: float, wrs: float, value: float, *, arrival: bool) -> None:
        self._events.append((t, wrs, value, arrival))
        self._prune(t)

    def _prune(self, now: float) -> None:
        horizon = now - self.options.rate_window_s
        while self._events and self._events[0][0] <= horizon:
            self._events.popleft()

    # --- queue lists -------------------------------------------------------------------------

    def _insert(self, entry: _Entry) -> None:
        bisect.insort(self._queues[entry.queue], entry, key=lambda e: e.key)

    def _unlink(self, entry: _Entry) -> None:
        queue = self._queues[entry.queue]
        i = bisect.bisect_left(queue, entry.key, key=lambda e: e.key)
        if i < len(queue) and queue[i] is entry:
            del queue[i]
        else:  # not where its key says: should not happen, but never leave a ghost behind
            queue.remove(entry)
