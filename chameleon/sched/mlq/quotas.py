"""M/M/1 token quotas per queue, leftover shared by demand, and the ledger of in-flight charges.

Rules and their reasons: `docs/scheduling.md` (Quotas, Quota ledger).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from fractions import Fraction
from types import MappingProxyType
from typing import Any

import attrs


def mm1_min_tokens(
    max_request_tokens: float, expected_service_time_s: float, slo_s: float, arrival_rate: float
) -> float:
    """The paper's M/M/1 bound on a queue's token quota: `S * D * (1/SLO + lambda)`."""
    if max_request_tokens < 0 or expected_service_time_s < 0 or arrival_rate < 0:
        raise ValueError("S, D and lambda must be >= 0")
    if not slo_s > 0:
        raise ValueError(f"the SLO must be > 0, got {slo_s!r}")
    return max_request_tokens * expected_service_time_s * (1.0 / slo_s + arrival_rate)


def _non_negative_finite(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"QueueStats.{attribute.name} must be finite and >= 0, got {value!r}")


@attrs.frozen
class QueueStats:
    """What `assign_quotas` needs to know about one queue."""

    max_request_tokens: float = attrs.field(validator=_non_negative_finite)  # S
    expected_service_s: float = attrs.field(validator=_non_negative_finite)  # D
    arrival_rate: float = attrs.field(validator=_non_negative_finite)  # lambda, 1/s
    demand_tokens: float = attrs.field(validator=_non_negative_finite)  # tokens its requests want now

    def min_tokens(self, slo_s: float, *, floor_at_max_request: bool = True) -> int:
        """The queue's integer minimum quota (module docstring)."""
        bound = mm1_min_tokens(self.max_request_tokens, self.expected_service_s, slo_s, self.arrival_rate)
        minimum = math.ceil(bound - 1e-9)  # 1e-9: float noise must not add a whole token
        if floor_at_max_request:
            minimum = max(minimum, math.ceil(self.max_request_tokens - 1e-9))
        return max(0, minimum)


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` in proportion to `weights` (sum > 0): largest remainder, exact, ties to lower index."""
    exact = [Fraction(w) for w in weights]
    scale = Fraction(total) / sum(exact)
    shares = [w * scale for w in exact]
    floors = [math.floor(s) for s in shares]
    short = total - sum(floors)
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - floors[i]), i))
    for i in order[:short]:
        floors[i] += 1
    return floors


def assign_quotas(
    total_tokens: int,
    queue_stats: Sequence[QueueStats],
    *,
    slo_s: float,
    floor_at_max_request: bool = True,
) -> tuple[int, ...]:
    """Integer token quotas per queue, summing exactly to `total_tokens` (module docstring)."""
    if not queue_stats:
        raise ValueError("need at least one queue")
    if not isinstance(total_tokens, int) or total_tokens < 0:
        raise ValueError(f"total_tokens must be an int >= 0, got {total_tokens!r}")
    minima = [s.min_tokens(slo_s, floor_at_max_request=floor_at_max_request) for s in queue_stats]
    if sum(minima) >= total_tokens:
        if sum(minima) == 0:  # total is 0 too
            return tuple(0 for _ in queue_stats)
        return tuple(_apportion(total_tokens, minima))  # scaled down by total / sum(minima)
    leftover = total_tokens - sum(minima)
    weights: Sequence[float] = [s.demand_tokens for s in queue_stats]
    if sum(weights) == 0:
        weights = minima if sum(minima) > 0 else [1.0] * len(minima)
    return tuple(m + extra for m, extra in zip(minima, _apportion(leftover, weights)))


# --- quota ledger ----------------------------------------------------------------------------


@attrs.frozen
class Charge:
    """Tokens one in-flight request holds: `parts` are (queue whose quota pays, tokens)."""

    holder: Hashable
    queue: int  # the request's own queue
    parts: tuple[tuple[int, int], ...]

    @property
    def cost(self) -> int:
        return sum(tokens for _, tokens in self.parts)

    @property
    def borrowed(self) -> bool:
        """Whether another queue's leftover paid for part of it (a phase-2 admission)."""
        return any(q != self.queue for q, _ in self.parts)


class QuotaLedger:
    """Per-queue token quotas, the tokens in-flight requests hold from them, and phase-2 lending.

    Invariants: `held(q) >= 0` and `remaining(q) >= 0` for every queue; `held` always equals the sum
    of the live charges' parts; `give_back` returns exactly what was taken.
    """

    def __init__(self, quotas: Sequence[int]) -> None:
        self._quotas: tuple[int, ...] = ()
        self._held: list[int] = []
        self._charges: dict[Hashable, Charge] = {}
        self.reset(quotas)

    # -- views --

    @property
    def quotas(self) -> tuple[int, ...]:
        return self._quotas

    @property
    def num_queues(self) -> int:
        return len(self._quotas)

    @property
    def charges(self) -> Mapping[Hashable, Charge]:
        """Live charges by holder (read-only view)."""
        return MappingProxyType(self._charges)

    def held(self, queue: int) -> int:
        """Tokens of `queue`'s quota in use: its own requests' and those lent to borrowers."""
        return self._held[self._index(queue)]

    def remaining(self, queue: int) -> int:
        return max(0, self._quotas[self._index(queue)] - self._held[queue])

    def leftover(self, lenders: Iterable[int]) -> int:
        """Tokens phase 2 may borrow from these queues (duplicates count once)."""
        return sum(self.remaining(q) for q in dict.fromkeys(lenders))

    # -- admission and release --

    def try_take(self, queue: int, cost: int, holder: Hashable) -> bool:
        """Phase 1: charge `cost` to `queue`'s own quota if it has that much left."""
        self._check_new(holder, cost)
        if cost > self.remaining(queue):
            return False
        self._record(Charge(holder, queue, ((queue, cost),)))
        return True

    def try_take_leftover(self, queue: int, cost: int, holder: Hashable, lenders: Iterable[int]) -> bool:
        """Phase 2: a request of `queue` borrows `cost` from the lenders' remaining, in the given order.

        The lenders are normally the queues with nothing waiting; include `queue` itself to let the
        request use what its own queue has left as well. All or nothing.
        """
        self._check_new(holder, cost)
        self._index(queue)
        lenders = list(dict.fromkeys(lenders))
        if cost > self.leftover(lenders):
            return False
        parts, due = [], cost
        for lender in lenders:
            part = min(due, self.remaining(lender))
            if part > 0:
                parts.append((lender, part))
                due -= part
        self._record(Charge(holder, queue, tuple(parts) or ((queue, 0),)))
        return True

    def force(self, queue: int, cost: int, holder: Hashable) -> None:
        """Record what `holder` holds now, even past `queue`'s quota (a recount of holdings)."""
        self._check_new(holder, cost)
        self._record(Charge(holder, self._index(queue), ((queue, cost),)))

    def give_back(self, holder: Hashable) -> Charge:
        """Release everything `holder` took, to the queues it came from; returns that charge."""
        charge = self._charges.pop(holder, None)
        if charge is None:
            raise KeyError(f"{holder!r} holds no quota")
        for q, tokens in charge.parts:
            self._held[q] -= tokens
        return charge

    def reset(self, quotas: Sequence[int], *, requeue: Mapping[Any, int] | None = None) -> None:
        """New quotas (possibly a new number of queues); in-flight charges carry over (module docstring)."""
        quotas = tuple(quotas)
        if not quotas or any(not isinstance(q, int) or q < 0 for q in quotas):
            raise ValueError(f"quotas must be a non-empty sequence of ints >= 0, got {quotas!r}")
        requeue = requeue or {}
        homes = {h: requeue.get(h, min(c.queue, len(quotas) - 1)) for h, c in self._charges.items()}
        if any(not 0 <= home < len(quotas) for home in homes.values()):
            raise IndexError(f"requeue names a queue outside 0..{len(quotas) - 1}: {requeue!r}")
        self._quotas = quotas
        self._held = [0] * len(quotas)
        old, self._charges = self._charges, {}
        for holder, charge in old.items():  # each charge now counts, in full, against its new queue
            self._record(Charge(holder, homes[holder], ((homes[holder], charge.cost),)))

    # -- internals --

    def _index(self, queue: int) -> int:
        if not 0 <= queue < len(self._quotas):
            raise IndexError(f"queue {queue!r} out of range 0..{len(self._quotas) - 1}")
        return queue

    def _check_new(self, holder: Hashable, cost: int) -> None:
        if holder in self._charges:
            raise ValueError(f"{holder!r} already holds quota; give it back first")
        if not isinstance(cost, int) or cost < 0:
            raise ValueError(f"cost must be an int >= 0, got {cost!r}")

    def _record(self, charge: Charge) -> None:
        self._charges[charge.holder] = charge
        for q, tokens in charge.parts:
            self._held[q] += tokens
