"""Pareto analysis of evaluated schedules: non-dominated sorting, hypervolume, knee point.

Objectives come with a direction each ("min" or "max"); everything is converted to minimisation internally, so
callers never negate columns by hand. Dominance is the usual strict one: a dominates b if a is no worse in every
objective and better in at least one. Equal points therefore never dominate each other: duplicates of a
non-dominated schedule (e.g. the same metrics measured in two studies) are all non-dominated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["hypervolume", "knee_point", "non_dominated", "nondominated_sort", "pareto_frame", "to_minimisation"]

Direction = Literal["min", "max"]

# Rows compared per block in the O(n²) dominance test; bounds the temporary boolean arrays to a few MB.
_BLOCK_ELEMENTS = 2_000_000


def to_minimisation(points: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    """Float copy of `points` (n × m) with "max" objectives negated. Rejects NaN: it has no place in an order."""
    x = np.array(points, dtype=float)
    if x.ndim == 1 and x.size == 0:
        x = x.reshape(0, len(directions))
    if x.ndim != 2:
        raise ValueError(f"points must be a 2-D array (n points × m objectives), got shape {x.shape}")
    if x.shape[1] != len(directions):
        raise ValueError(f"points have {x.shape[1]} objectives but {len(directions)} directions were given")
    bad = [d for d in directions if d not in ("min", "max")]
    if bad:
        raise ValueError(f"directions must be 'min' or 'max', got {bad[0]!r}")
    if np.isnan(x).any():
        rows = np.flatnonzero(np.isnan(x).any(axis=1))
        raise ValueError(f"points contain NaN (rows {rows[:5].tolist()}...); drop failed evaluations first")
    sign = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    return x * sign


def _dominated_mask(x: np.ndarray) -> np.ndarray:
    """For minimisation data x (n × m): which rows are dominated by some other row."""
    n, m = x.shape
    dominated = np.zeros(n, dtype=bool)
    block = max(1, _BLOCK_ELEMENTS // max(1, n * m))
    for start in range(0, n, block):
        xi = x[start : start + block, None, :]  # the rows under test
        no_worse = (x[None, :, :] <= xi).all(axis=2)
        better = (x[None, :, :] < xi).any(axis=2)
        dominated[start : start + block] = (no_worse & better).any(axis=1)
    return dominated


def non_dominated(points: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the points no other point dominates (the first front)."""
    return ~_dominated_mask(to_minimisation(points, directions))


def nondominated_sort(points: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str]) -> list[np.ndarray]:
    """Fronts of the points as index arrays (ascending), best first: front k is non-dominated once fronts < k are
    removed (NSGA-II's ranking). Repeated peeling costs O(F n² m), fine for the thousands of records a study makes."""
    x = to_minimisation(points, directions)
    remaining = np.arange(len(x))
    fronts = []
    while remaining.size:
        first = ~_dominated_mask(x[remaining])
        fronts.append(remaining[first])
        remaining = remaining[~first]
    return fronts


def hypervolume(
    points: np.ndarray | Sequence[Sequence[float]],
    directions: Sequence[str],
    reference: Sequence[float],
) -> float:
    """Volume dominated by the points and bounded by `reference` (given in the objectives' own units and
    directions: for a "max" objective, a value below every point's). Points not strictly better than the
    reference in every objective add nothing. Computed by pymoo's HV (moocore) on the minimisation form."""
    from pymoo.indicators.hv import HV

    x = to_minimisation(points, directions)
    ref = to_minimisation(np.asarray(reference, dtype=float)[None, :], directions)[0]
    if x.shape[0] == 0:
        return 0.0
    return float(HV(ref_point=ref)(x))


def knee_point(points: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str]) -> int:
    """Index of the knee of the first front: the balanced trade-off where giving up a little of one objective
    buys the most of the others.

    Definition (Das 1999; Branke et al. 2004's "distance to the extreme-point hyperplane"): normalise the first
    front so its ideal point is 0 and its nadir point 1 in every objective; take the extreme points (for each
    objective, the front point best in it; ties go to the smallest sum of the other normalised objectives);
    the knee is the front point farthest from the hyperplane through them, on the ideal side. In 2-D this is
    the point farthest below the line joining the two ends of the front. If the extremes do not span a
    hyperplane (e.g. one point is best in two objectives), the plane Σ f = 1 is used instead. Ties go to the
    lowest index. On a concave front every point lies beyond the plane, and the one least beyond it is chosen.
    """
    x = to_minimisation(points, directions)
    if x.shape[0] == 0:
        raise ValueError("knee_point needs at least one point")
    front = np.flatnonzero(~_dominated_mask(x))
    f = x[front]
    ideal, nadir = f.min(axis=0), f.max(axis=0)
    span = np.where(nadir > ideal, nadir - ideal, 1.0)
    f = (f - ideal) / span
    m = f.shape[1]
    extremes = np.empty((m, m))
    for j in range(m):
        others = f.sum(axis=1) - f[:, j]
        extremes[j] = f[np.lexsort((others, f[:, j]))[0]]
    # Hyperplane w·f = 1 through the extremes; fall back to Σ f = 1 when they are degenerate.
    try:
        w = np.linalg.solve(extremes, np.ones(m))
        if not np.isfinite(w).all():
            raise np.linalg.LinAlgError
    except np.linalg.LinAlgError:
        w = np.ones(m)
    distance = (1.0 - f @ w) / np.linalg.norm(w)  # positive on the ideal side
    return int(front[np.argmax(distance)])


def pareto_frame(df: pd.DataFrame, objectives: Mapping[str, str]) -> pd.DataFrame:
    """Copy of `df` with a `front_rank` column: 0 for the non-dominated rows, 1 for the next front, and so on.

    objectives: column name → "min" or "max". Rows that cannot be ranked (a NaN objective, or status "failed"
    when a status column exists) get <NA> and take no part in the ranking.
    """
    import pandas as pd

    missing = [c for c in objectives if c not in df.columns]
    if missing:
        raise KeyError(f"objective column(s) {missing} not in the frame; columns are {list(df.columns)}")
    columns = list(objectives)
    values = df[columns].to_numpy(dtype=float)
    usable = ~np.isnan(values).any(axis=1)
    if "status" in df.columns:
        usable &= (df["status"] != "failed").to_numpy()
    rank = np.full(len(df), -1, dtype=np.int64)
    rows = np.flatnonzero(usable)
    for k, front in enumerate(nondominated_sort(values[rows], [objectives[c] for c in columns])):
        rank[rows[front]] = k
    out = df.copy()
    out["front_rank"] = pd.arrays.IntegerArray(np.maximum(rank, 0), rank < 0)
    return out
