"""Latency histograms with one fixed bucket layout, shared by the replicas that record and the controller that
merges: counts add across replicas and subtract across time, so service-level percentiles come from merged
counts, never from averaging per-replica percentiles. Part of the shared leaf: pure, no imports of ours.

Buckets: upper bounds from 0.5 ms to 120 s, 16 per decade (each bound 15.5 % above the last), plus +Inf. A
quantile is interpolated inside its bucket, so it is within one bucket width (<= 15.5 %) of the exact sample
quantile.
"""

from __future__ import annotations

import bisect
import math
from typing import Iterable, Sequence

import numpy as np

PER_DECADE = 16
LOW_S, HIGH_S = 5e-4, 120.0
BOUNDS_S: tuple[float, ...] = tuple(
    LOW_S * 10 ** (i / PER_DECADE) for i in range(int(math.ceil(PER_DECADE * math.log10(HIGH_S / LOW_S))) + 1)
)
NUM_BUCKETS = len(BOUNDS_S) + 1  # the last bucket is (BOUNDS_S[-1], +Inf)


def empty() -> list[int]:
    return [0] * NUM_BUCKETS


def bucket_of(value_s: float) -> int:
    """Index of the bucket whose upper bound is the first >= value (NaN and negatives are not recorded)."""
    return bisect.bisect_left(BOUNDS_S, value_s)


def add(counts: list[int], values_s: Iterable[float]) -> None:
    """Record samples into `counts` in place; NaN, infinite and negative samples are skipped."""
    for v in values_s:
        if math.isfinite(v) and v >= 0:
            counts[bucket_of(v)] += 1


def inside(i: int) -> float:
    """A value that falls in bucket i (re-recording bucketed counts into a recorder with the same bounds)."""
    lo = 0.0 if i == 0 else BOUNDS_S[i - 1]
    hi = BOUNDS_S[i] if i < len(BOUNDS_S) else BOUNDS_S[-1] * 2
    return (lo + hi) / 2


def merge(many: Iterable[Sequence[int]]) -> list[int]:
    out = empty()
    for counts in many:
        if len(counts) != NUM_BUCKETS:
            raise ValueError(f"histogram has {len(counts)} buckets, expected {NUM_BUCKETS}")
        for i, c in enumerate(counts):
            out[i] += c
    return out


def delta(newer: Sequence[int], older: Sequence[int]) -> list[int]:
    """Samples recorded between two cumulative snapshots of one recorder (a reset yields `newer` itself)."""
    diff = [a - b for a, b in zip(newer, older)]
    return list(newer) if any(d < 0 for d in diff) else diff


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile of the recorded samples (None when there are none), linear inside its bucket."""
    if not 0 <= q <= 1:
        raise ValueError(f"q ({q}) must be in [0, 1]")
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            lo = 0.0 if i == 0 else BOUNDS_S[i - 1]
            hi = BOUNDS_S[i] if i < len(BOUNDS_S) else BOUNDS_S[-1] * 2
            return lo + (hi - lo) * max(rank - seen, 0) / c
        seen += c
    return BOUNDS_S[-1] * 2


def percentile(values: Sequence[float], q: float) -> float:
    """The exact sample quantile `q` in [0, 1] of raw samples (numpy's linear interpolation); NaN for none.
    The one percentile of the project: engines' windows, the load bench and the simulators use it."""
    if not 0 <= q <= 1:
        raise ValueError(f"q ({q}) must be in [0, 1]")
    if len(values) == 0:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=float), q * 100))
