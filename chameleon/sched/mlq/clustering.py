"""Exact 1-D k-means over WRS values, the K rule (silhouette, or the paper's literal K_max), cut-offs.

Rules and their reasons: `docs/scheduling.md` (Queues).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

import attrs
import numpy as np

MAX_CLUSTER_POINTS = 2048
DEFAULT_MIN_SAMPLES = 64
DEFAULT_MIN_SILHOUETTE = 0.70


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
    values: Sequence[float], k_max: int, min_samples: int, min_silhouette: float, k_rule: str = "silhouette"
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The sorted sample and the run boundaries of the chosen K: by silhouette, or `k_rule="wcss"`,
    the paper's "minimal WCSS" read literally (WCSS only falls with K, so K = min(k_max, distinct))."""
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max!r}")
    x = _sorted_sample(values)
    distinct = int(np.unique(x).size)
    single = (0, x.size)
    if len(values) < min_samples or distinct < 2 or k_max == 1:
        return x, single
    k_cap = min(k_max, distinct)
    bounds = _optimal_bounds(x, k_cap)
    if k_rule == "wcss":
        return x, bounds[k_cap]
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
    k_rule: str = "silhouette",
) -> tuple[float, ...]:
    """The K - 1 midpoints between consecutive sorted centroids of the chosen K (() for one queue)."""
    x, bounds = _fit(values, k_max, min_samples, min_silhouette, k_rule)
    centroids = _centroids(x, bounds)
    return tuple((lo + hi) / 2 for lo, hi in zip(centroids, centroids[1:]))


def _float_tuple(values: Iterable[float]) -> tuple[float, ...]:
    return tuple(values)


def _increasing_cutoffs(_inst: object, _attribute: attrs.Attribute[tuple[float, ...]], value: tuple[float, ...]) -> None:
    if not all(math.isfinite(c) for c in value):
        raise ValueError(f"cut-offs must be finite, got {value!r}")
    if any(b <= a for a, b in zip(value, value[1:])):
        raise ValueError(f"cut-offs must be strictly increasing, got {value!r}")


@attrs.frozen
class QueueLayout:
    """Queue boundaries over WRS: queue 0 holds the smallest requests; `len(cutoffs) + 1` queues."""

    cutoffs: tuple[float, ...] = attrs.field(default=(), converter=_float_tuple, validator=_increasing_cutoffs)

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
        k_rule: str = "silhouette",
    ) -> QueueLayout:
        """Layout for recent WRS values; one queue when `values` is empty. `k_rule`: "silhouette",
        "wcss" (K = k_max, the paper's literal rule) or "static" (Ch-Static: k_max equal ranges
        between the smallest and largest value, no clustering)."""
        if len(values) == 0:
            return cls()
        if k_rule == "static":
            return cls.equal_ranges(values, k_max)
        return cls(queue_cutoffs(values, k_max, min_samples=min_samples, min_silhouette=min_silhouette, k_rule=k_rule))

    @classmethod
    def equal_ranges(cls, values: Sequence[float], k: int) -> QueueLayout:
        """k queues of equal WRS range over [min(values), max(values)] (one if they are all equal)."""
        lo, hi = float(min(values)), float(max(values))
        if not hi > lo or k < 2:
            return cls()
        return cls(tuple(lo + (hi - lo) * i / k for i in range(1, k)))
