"""Policy math of Chameleon's multi-level-queue (MLQ) scheduler (paper §4.3), as pure functions.

Request sizes, queue cut-offs, token quotas, the quota ledger and the per-queue load estimators.
Nothing here imports torch, the model or anything async, and nothing reads a clock: time comes in as
arguments, so the engine and the simulator run this same code.

Weighted request size (WRS)
---------------------------
`WRS = (w_in * input/max_input + w_out * pred_output/max_output) * adapter_size/max_adapter`, with
the paper's weights w_in = 0.4, w_out = 0.6. Adapter sizes may be ranks or bytes, as long as all
three sizes use the same unit. Ratios are not clipped: a value over its max keeps its order.
* Base-model requests (no adapter) get the factor `min_adapter/max_adapter`: they are sized like a
  request for the smallest registered adapter. They carry no adapter to load, so they must never
  rank above an adapter request of the same lengths; a factor of 0 would instead make every base
  request the same size and lose their length ordering. The caller passes `min_adapter`.
* When no adapter is registered at all (`max_adapter=None`) the factor is 1 for every request.

K-means over WRS values
-----------------------
`kmeans_1d` is exact: the optimal 1-D k-means partition is a split of the sorted values into
contiguous runs, found by dynamic programming over prefix sums (O(k n^2), vectorised with numpy).
It needs no random start, so `seed` is accepted for interface compatibility and ignored. It returns
`min(k, number of distinct values)` sorted centroids. More than `MAX_CLUSTER_POINTS` (2048) values
are first reduced to that many evenly spaced order statistics, which keeps the distribution's shape
and bounds the cost (~35 MB, tens of ms) of a refresh.

Choosing K (the paper's "minimal WCSS" always picks K_max)
-----------------------------------------------------------
1. K = 1 when there are fewer than `min_samples` values (default 64) or fewer than 2 distinct ones.
   Small samples of even uniform data score high silhouettes by chance (n=16: ~40% of uniform
   samples score >= 0.7; n=64: ~2%), hence the floor.
2. Otherwise, for every K in 2..min(k_max, distinct values), cluster exactly and compute the mean
   silhouette coefficient (a singleton cluster's point scores 0). Take the K with the highest mean
   silhouette, the smaller K on ties.
3. Keep it only if that silhouette is >= `min_silhouette` (default 0.70, Kaufman & Rousseeuw's
   "strong structure" mark); otherwise K = 1. Uniform, normal and exponential samples score
   ~0.55-0.67 at every K and get one queue; well-separated clusters score > 0.9 at their true K;
   a heavy-tailed mix of adapter ranks and lognormal lengths scores ~0.78 at K = 2.
Cut-offs are the midpoints between consecutive sorted centroids (K - 1 of them). A WRS equal to a
cut-off belongs to the smaller queue (`QueueLayout.queue_of` counts the cut-offs strictly below).

Quotas
------
* A queue is an M/M/1 queue: `Tok_min = S * D * (1/SLO + lambda)` (S: largest request of the queue in
  tokens, D: expected service time in s, lambda: arrival rate in 1/s). `assign_quotas` rounds it up
  and, by default, raises it to at least S, so that every queue can admit its largest request.
* When the minima fit in `total_tokens`, each queue gets its minimum and the leftover is shared in
  proportion to `demand_tokens`; queues with zero demand get only their minimum. If no queue has
  demand, the leftover follows the minima, and if those are all zero too it is shared equally.
* When the minima exceed `total_tokens`, every minimum is scaled down by the same factor
  (total / sum of minima) and nothing is left over.
* All splits use largest-remainder rounding in exact rational arithmetic (ties to the smaller
  queue), so the integer quotas always sum to exactly `total_tokens`.

Quota ledger
------------
`QuotaLedger` records one `Charge` per in-flight request (its holder key, e.g. the request id). A
phase-1 admission charges the request's own queue; a phase-2 admission borrows the leftover of the
queues the scheduler names as lenders (normally the queues with nothing waiting), taking from them
in the given order. `give_back(holder)` returns exactly what that holder took, to the queues it came
from, so quota returns in full by construction and no queue's holdings can go negative.
`remaining(q) = max(0, quota[q] - held[q])`, where `held[q]` counts every token of queue q's quota in
use, its own requests' and those lent to borrowers.
When quotas are recomputed, `reset(new_quotas, requeue=...)` keeps every in-flight charge: each is
re-attributed in full to the request's queue under the new layout (`requeue[holder]`, else its old
queue clamped to the new number of queues), loans included. A queue whose holdings exceed its new
quota has remaining 0 and admits nothing until enough tokens come back.

Load estimates
--------------
`ArrivalRateEstimator` keeps time-stamped events of one queue in a sliding window (default 60 s):
lambda = arrivals in (now - window, now] divided by the observed span `min(window, now - start)`,
floored at `min_span_s` (1 s) so the rate is not infinite right after start; D = mean service time
of the requests that finished in the window (the last one seen when none did, `default_service_s`
before any); S = largest request (tokens) that arrived in the window, 0 when none did. Timestamps
must never decrease.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from fractions import Fraction
from types import MappingProxyType
from typing import Any

import attrs
import numpy as np

from chameleon.errors import ConfigError

__all__ = [
    "MAX_CLUSTER_POINTS",
    "ArrivalRateEstimator",
    "Charge",
    "MLQConfig",
    "QueueLayout",
    "QueueStats",
    "QuotaLedger",
    "adapter_factor",
    "assign_quotas",
    "choose_k",
    "kmeans_1d",
    "mm1_min_tokens",
    "queue_cutoffs",
    "request_tokens",
    "weighted_request_size",
]

MAX_CLUSTER_POINTS = 2048
DEFAULT_MIN_SAMPLES = 64
DEFAULT_MIN_SILHOUETTE = 0.70


# --- configuration ---------------------------------------------------------------------------

Validator = Callable[[object, "attrs.Attribute[object]", object], None]


def _check(predicate: Callable[[float], bool], what: str) -> Validator:
    def check(_inst: object, attribute: attrs.Attribute[object], value: object) -> None:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and predicate(value)
        if not ok:
            raise ConfigError(f"MLQConfig.{attribute.name} must be {what}, got {value!r}")

    return check


def _int_at_least(low: int) -> Validator:
    def check(_inst: object, attribute: attrs.Attribute[object], value: object) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"MLQConfig.{attribute.name} must be an int >= {low}, got {value!r}")

    return check


_positive = _check(lambda v: math.isfinite(v) and v > 0, "a positive number")
_non_negative = _check(lambda v: math.isfinite(v) and v >= 0, "a non-negative number")


@attrs.frozen
class MLQConfig:
    """Knobs of the MLQ policy. Validated on construction (`ConfigError`)."""

    k_max: int = attrs.field(default=4, validator=_int_at_least(1))  # most queues
    refresh_period_s: float = attrs.field(default=300.0, validator=_positive)  # paper: 5 min
    wrs_window: int = attrs.field(default=1024, validator=_int_at_least(1))  # recent WRS values clustered
    min_cluster_samples: int = attrs.field(default=DEFAULT_MIN_SAMPLES, validator=_int_at_least(2))
    min_silhouette: float = attrs.field(
        default=DEFAULT_MIN_SILHOUETTE, validator=_check(lambda v: -1.0 <= v <= 1.0, "in [-1, 1]")
    )
    rate_window_s: float = attrs.field(default=60.0, validator=_positive)  # lambda, D and S window
    min_rate_span_s: float = attrs.field(default=1.0, validator=_positive)
    default_service_s: float = attrs.field(default=1.0, validator=_positive)  # D before any finish
    slo_ttft_s: float = attrs.field(default=5.0, validator=_positive)  # paper: TTFT SLO 5 s
    input_weight: float = attrs.field(default=0.4, validator=_non_negative)
    output_weight: float = attrs.field(default=0.6, validator=_non_negative)

    def __attrs_post_init__(self) -> None:
        if self.input_weight + self.output_weight <= 0:
            raise ConfigError("MLQConfig.input_weight + output_weight must be > 0")

    def fit_layout(self, values: Sequence[float]) -> QueueLayout:
        """Queue layout for recent WRS values under this config's K rule."""
        return QueueLayout.fit(
            values, k_max=self.k_max, min_samples=self.min_cluster_samples, min_silhouette=self.min_silhouette
        )

    def estimator(self, start_s: float) -> ArrivalRateEstimator:
        """A per-queue load estimator with this config's window, started at clock value `start_s`."""
        return ArrivalRateEstimator(
            start_s=start_s,
            window_s=self.rate_window_s,
            min_span_s=self.min_rate_span_s,
            default_service_s=self.default_service_s,
        )


# --- request size ----------------------------------------------------------------------------


def adapter_factor(adapter_size: float | None, *, max_adapter: float | None, min_adapter: float | None = None) -> float:
    """`adapter_size / max_adapter`; base-model requests (None) use `min_adapter` (module docstring)."""
    if max_adapter is None:  # no adapter registered: sizes reduce to the length terms
        if adapter_size is not None:
            raise ValueError("an adapter request needs max_adapter")
        return 1.0
    if not max_adapter > 0:
        raise ValueError(f"max_adapter must be > 0, got {max_adapter!r}")
    if adapter_size is None:
        if min_adapter is None:
            raise ValueError("sizing a base-model request needs min_adapter (the smallest adapter's size)")
        adapter_size = min_adapter
    if not adapter_size > 0:
        raise ValueError(f"adapter sizes must be > 0, got {adapter_size!r}")
    return adapter_size / max_adapter


def weighted_request_size(
    input_len: float,
    pred_output_len: float,
    adapter_rank_or_bytes: float | None,
    *,
    max_input: float,
    max_output: float,
    max_adapter: float | None,
    min_adapter: float | None = None,
    input_weight: float = 0.4,
    output_weight: float = 0.6,
) -> float:
    """The paper's WRS: `(0.4 in/max_in + 0.6 out/max_out) * adapter/max_adapter` (module docstring)."""
    if input_len < 0 or pred_output_len < 0:
        raise ValueError("lengths must be >= 0")
    if not (max_input > 0 and max_output > 0):
        raise ValueError("max_input and max_output must be > 0")
    length = input_weight * input_len / max_input + output_weight * pred_output_len / max_output
    return length * adapter_factor(adapter_rank_or_bytes, max_adapter=max_adapter, min_adapter=min_adapter)


def request_tokens(input_len: int, pred_output_len: int, adapter_bytes: int = 0, *, kv_bytes_per_token: int) -> int:
    """A request's quota cost: input + predicted output + adapter memory in KV-token equivalents.

    Pass `adapter_bytes=0` when the adapter's memory should not be charged (e.g. already resident).
    """
    if kv_bytes_per_token < 1:
        raise ValueError(f"kv_bytes_per_token must be >= 1, got {kv_bytes_per_token!r}")
    if min(input_len, pred_output_len, adapter_bytes) < 0:
        raise ValueError("token counts and bytes must be >= 0")
    return input_len + pred_output_len + -(-adapter_bytes // kv_bytes_per_token)  # ceil division


# --- exact 1-D k-means -----------------------------------------------------------------------


def _sorted_sample(values: Iterable[float]) -> np.ndarray:
    """Values as a sorted float array, reduced to MAX_CLUSTER_POINTS evenly spaced order statistics."""
    x = np.sort(np.asarray(list(values), dtype=np.float64))
    if x.size == 0:
        raise ValueError("need at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError("values must be finite")
    if x.size > MAX_CLUSTER_POINTS:
        x = x[np.round(np.linspace(0, x.size - 1, MAX_CLUSTER_POINTS)).astype(np.intp)]
    return x


def _segment_cost_matrix(x: np.ndarray) -> np.ndarray:
    """C[i, j] = within-run sum of squares of x[i:j] for i < j, +inf elsewhere."""
    centred = x - x.mean()  # less cancellation in S2 - S1^2/m
    s1 = np.concatenate(([0.0], np.cumsum(centred)))
    s2 = np.concatenate(([0.0], np.cumsum(centred * centred)))
    idx = np.arange(x.size + 1)
    count = (idx[None, :] - idx[:, None]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (s2[None, :] - s2[:, None]) - (s1[None, :] - s1[:, None]) ** 2 / count
    return np.where(count > 0, np.maximum(cost, 0.0), np.inf)


def _optimal_bounds(x: np.ndarray, k_max: int) -> dict[int, tuple[int, ...]]:
    """For each K in 1..k_max, the run boundaries (0, b1, ..., n) of the optimal K-partition of sorted x."""
    n = x.size
    cost = _segment_cost_matrix(x)
    best = [cost[0]]  # best[c][j]: least WCSS of x[:j] in c + 1 runs
    split: list[np.ndarray] = []
    for _ in range(1, k_max):
        total = best[-1][:, None] + cost  # [i, j]: first c runs on x[:i], the last run x[i:j]
        split.append(total.argmin(axis=0))  # first minimum: deterministic ties
        best.append(total.min(axis=0))
    bounds: dict[int, tuple[int, ...]] = {}
    for k in range(1, k_max + 1):
        cuts, j = [n], n
        for level in range(k - 1, 0, -1):
            j = int(split[level - 1][j])
            cuts.append(j)
        bounds[k] = (0, *reversed(cuts))
    return bounds


def _centroids(x: np.ndarray, bounds: tuple[int, ...]) -> tuple[float, ...]:
    return tuple(float(x[lo:hi].mean()) for lo, hi in zip(bounds, bounds[1:]))


def kmeans_1d(values: Sequence[float], k: int, *, seed: int = 0) -> tuple[float, ...]:
    """Sorted centroids of the optimal (least-WCSS) k-means partition of 1-D values.

    Exact dynamic programming, so deterministic; `seed` is ignored (kept for interface
    compatibility). Returns `min(k, number of distinct values)` centroids.
    """
    del seed  # exact method: nothing random
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    x = _sorted_sample(values)
    k = min(k, int(np.unique(x).size))
    return _centroids(x, _optimal_bounds(x, k)[k])


def _silhouette(x: np.ndarray, bounds: tuple[int, ...]) -> float:
    """Mean silhouette of sorted x split into contiguous runs, in O(n) per run with prefix sums."""
    n = x.size
    x = x - x.mean()  # distances are shift-invariant; centring keeps tiny gaps above rounding noise
    prefix = np.concatenate(([0.0], np.cumsum(x)))
    edges = np.asarray(bounds)
    idx = np.arange(n)
    label = np.searchsorted(edges[1:-1], idx, side="right")

    def distance_sum(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Sum of |x_i - x_j| over j in [lo, hi), for every i (i itself adds 0)."""
        below = np.clip(idx, lo, hi)  # j in [lo, below) lie left of i
        above = np.clip(idx + 1, lo, hi)  # j in [above, hi) lie right of i
        left = x * (below - lo) - (prefix[below] - prefix[lo])
        right = (prefix[hi] - prefix[above]) - x * (hi - above)
        return left + right

    lo, hi = edges[label], edges[label + 1]
    size = hi - lo
    a = distance_sum(lo, hi) / np.maximum(size - 1, 1)
    b = np.full(n, np.inf)
    for step in (-1, 1):  # runs are contiguous: the nearest other run (by mean distance) is adjacent
        other = label + step
        valid = (other >= 0) & (other < edges.size - 1)
        other = np.clip(other, 0, edges.size - 2)
        lo2, hi2 = edges[other], edges[other + 1]
        b = np.where(valid, np.minimum(b, distance_sum(lo2, hi2) / np.maximum(hi2 - lo2, 1)), b)
    spread = np.maximum(np.maximum(a, b), np.finfo(np.float64).tiny)
    score = np.where(size > 1, (b - a) / spread, 0.0)
    return float(score.mean())


def _fit(
    values: Sequence[float], k_max: int, min_samples: int, min_silhouette: float
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The sorted sample and the run boundaries of the chosen K (module docstring's rule)."""
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max!r}")
    x = _sorted_sample(values)
    distinct = int(np.unique(x).size)
    single = (0, x.size)
    if len(values) < min_samples or distinct < 2 or k_max == 1:
        return x, single
    k_cap = min(k_max, distinct)
    bounds = _optimal_bounds(x, k_cap)
    scores = {k: _silhouette(x, bounds[k]) for k in range(2, k_cap + 1)}
    best = max(scores, key=lambda k: (scores[k], -k))  # highest score, smaller K on ties
    return (x, bounds[best]) if scores[best] >= min_silhouette else (x, single)


def choose_k(
    values: Sequence[float],
    k_max: int = 4,
    *,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    min_silhouette: float = DEFAULT_MIN_SILHOUETTE,
) -> int:
    """Number of queues, 1..k_max, by the silhouette rule of the module docstring."""
    _, bounds = _fit(values, k_max, min_samples, min_silhouette)
    return len(bounds) - 1


def queue_cutoffs(
    values: Sequence[float],
    k_max: int = 4,
    *,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    min_silhouette: float = DEFAULT_MIN_SILHOUETTE,
) -> tuple[float, ...]:
    """The K - 1 midpoints between consecutive sorted centroids of the chosen K (() for one queue)."""
    x, bounds = _fit(values, k_max, min_samples, min_silhouette)
    centroids = _centroids(x, bounds)
    return tuple((lo + hi) / 2 for lo, hi in zip(centroids, centroids[1:]))


def _increasing_cutoffs(_inst: object, _attribute: attrs.Attribute[object], value: tuple[float, ...]) -> None:
    if not all(math.isfinite(c) for c in value):
        raise ValueError(f"cut-offs must be finite, got {value!r}")
    if any(b <= a for a, b in zip(value, value[1:])):
        raise ValueError(f"cut-offs must be strictly increasing, got {value!r}")


@attrs.frozen
class QueueLayout:
    """Queue boundaries over WRS: queue 0 holds the smallest requests; `len(cutoffs) + 1` queues."""

    cutoffs: tuple[float, ...] = attrs.field(default=(), converter=tuple, validator=_increasing_cutoffs)

    @property
    def num_queues(self) -> int:
        return len(self.cutoffs) + 1

    def queue_of(self, wrs: float) -> int:
        """Index of the queue for a WRS; a value equal to a cut-off goes to the smaller queue."""
        return bisect.bisect_left(self.cutoffs, wrs)

    @classmethod
    def fit(
        cls,
        values: Sequence[float],
        *,
        k_max: int = 4,
        min_samples: int = DEFAULT_MIN_SAMPLES,
        min_silhouette: float = DEFAULT_MIN_SILHOUETTE,
    ) -> QueueLayout:
        """Layout for recent WRS values; one queue when `values` is empty."""
        if len(values) == 0:
            return cls()
        return cls(queue_cutoffs(values, k_max, min_samples=min_samples, min_silhouette=min_silhouette))


# --- quotas ----------------------------------------------------------------------------------


def mm1_min_tokens(
    max_request_tokens: float, expected_service_time_s: float, slo_s: float, arrival_rate: float
) -> float:
    """The paper's M/M/1 bound on a queue's token quota: `S * D * (1/SLO + lambda)`."""
    if max_request_tokens < 0 or expected_service_time_s < 0 or arrival_rate < 0:
        raise ValueError("S, D and lambda must be >= 0")
    if not slo_s > 0:
        raise ValueError(f"the SLO must be > 0, got {slo_s!r}")
    return max_request_tokens * expected_service_time_s * (1.0 / slo_s + arrival_rate)


def _non_negative_finite(_inst: object, attribute: attrs.Attribute[object], value: float) -> None:
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


# --- load estimates --------------------------------------------------------------------------


class ArrivalRateEstimator:
    """Sliding-window lambda, D and S of one queue (module docstring). Times are clock values, in s."""

    def __init__(
        self,
        *,
        start_s: float,
        window_s: float = 60.0,
        min_span_s: float = 1.0,
        default_service_s: float = 1.0,
    ) -> None:
        if not (window_s > 0 and min_span_s > 0 and default_service_s > 0):
            raise ConfigError("window_s, min_span_s and default_service_s must be > 0")
        self.window_s = window_s
        self.min_span_s = min_span_s
        self._start = start_s
        self._last = start_s
        self._arrivals: deque[float] = deque()
        self._sizes: deque[tuple[float, int]] = deque()  # monotonic: sizes strictly decrease
        self._services: deque[tuple[float, float]] = deque()
        self._service_sum = 0.0
        self._last_service = default_service_s

    def record_arrival(self, t: float, tokens: int = 0) -> None:
        """A request of `tokens` (its quota cost) joined the queue at time t."""
        self._advance(t)
        self._arrivals.append(t)
        while self._sizes and self._sizes[-1][1] <= tokens:  # an older, smaller size can never be the max
            self._sizes.pop()
        self._sizes.append((t, tokens))

    def record_service(self, t: float, service_s: float) -> None:
        """A request of this queue finished at time t after `service_s` seconds of service."""
        if not service_s >= 0:
            raise ValueError(f"service_s must be >= 0, got {service_s!r}")
        self._advance(t)
        self._services.append((t, service_s))
        self._service_sum += service_s
        self._last_service = service_s

    def arrival_rate(self, now: float) -> float:
        self._advance(now)
        span = max(self.min_span_s, min(self.window_s, now - self._start))
        return len(self._arrivals) / span

    def mean_service_s(self, now: float) -> float:
        self._advance(now)
        if not self._services:
            return self._last_service
        return max(0.0, self._service_sum / len(self._services))

    def max_request_tokens(self, now: float) -> int:
        self._advance(now)
        return self._sizes[0][1] if self._sizes else 0

    def stats(self, now: float, demand_tokens: float) -> QueueStats:
        """This queue's `QueueStats` at `now`; the scheduler supplies the current demand."""
        return QueueStats(
            max_request_tokens=self.max_request_tokens(now),
            expected_service_s=self.mean_service_s(now),
            arrival_rate=self.arrival_rate(now),
            demand_tokens=demand_tokens,
        )

    def _advance(self, now: float) -> None:
        """Move the window's end to `now` and drop events at or before now - window."""
        if now < self._last:
            raise ValueError(f"time went backwards: {now!r} < {self._last!r}")
        self._last = now
        horizon = now - self.window_s
        while self._arrivals and self._arrivals[0] <= horizon:
            self._arrivals.popleft()
        while self._sizes and self._sizes[0][0] <= horizon:
            self._sizes.popleft()
        while self._services and self._services[0][0] <= horizon:
            self._service_sum -= self._services.popleft()[1]
        if not self._services:
            self._service_sum = 0.0  # no float drift survives an empty window
