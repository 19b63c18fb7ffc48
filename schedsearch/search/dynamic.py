"""CacheQuant's dynamic programme for cache refresh steps (Liu et al. CVPR 2025, §3.2 "Dynamic Programming
Schedule"). No torch.

Given a table D (T × T) with D[s, i] = distance of step i's cached-unit feature to step s's, the T steps are split
into contiguous groups; a group starting at s refreshes the unit at s and reuses that feature on the others, costing
Σ_{i in group} D[s, i]. The paper (and its released `Fisher.feature_to_interval_seq_optimal`) fixes K = ⌈T/N⌉ groups
of length in [⌈N/2⌉, 2N] for a nominal interval N and minimises the total cost; the group starts are the refresh
steps. `DPStrategy` sweeps N and hands the resulting plans to a study as genomes of the cache-interval space.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from schedsearch.search.base import Strategy, as_value_matrix
from schedsearch.spaces.base import GenomeSpec

__all__ = [
    "DPResult",
    "DPStrategy",
    "cachequant_dp",
    "dp_sweep",
    "feasible_interval",
    "group_costs",
    "group_length_bounds",
    "optimal_segmentation",
    "plan_cost",
    "refresh_bits",
]


@dataclass(frozen=True)
class DPResult:
    """Optimal refresh steps (= group starts, 0 first) of `num_steps` steps and their total cost Σ D[start, i]."""

    refresh_steps: tuple[int, ...]
    cost: float
    num_steps: int

    @property
    def group_lengths(self) -> tuple[int, ...]:
        bounds = (*self.refresh_steps, self.num_steps)
        return tuple(b - a for a, b in itertools.pairwise(bounds))


def _as_table(distance: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    table = np.asarray(distance, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] != table.shape[1] or table.shape[0] == 0:
        raise ValueError(f"distance: expected a non-empty square (T × T) table, got shape {table.shape}")
    if not np.all(np.isfinite(table)):
        raise ValueError("distance: the table has NaN or infinite entries")
    return table


def group_costs(distance: np.ndarray) -> np.ndarray:
    """C[a, b] = Σ_{a ≤ i < b} D[a, i]: cost of one group [a, b) cached at a (upper triangle, b > a)."""
    prefix = np.concatenate([np.zeros((len(distance), 1)), np.cumsum(distance, axis=1)], axis=1)  # (T, T+1)
    return prefix - prefix[np.arange(len(distance)), np.arange(len(distance))][:, None]


def plan_cost(distance: np.ndarray | Sequence[Sequence[float]], refresh_steps: Sequence[int]) -> float:
    """The DP's objective for any refresh plan (first step refreshed): Σ_groups Σ_{i in group} D[start, i]."""
    table = _as_table(distance)
    if not refresh_steps or refresh_steps[0] != 0:
        raise ValueError(f"refresh_steps: {list(refresh_steps)} must start with step 0")
    bounds = (*refresh_steps, len(table))
    return float(sum(table[a, a:b].sum() for a, b in itertools.pairwise(bounds)))


def group_length_bounds(interval: int) -> tuple[int, int]:
    """CacheQuant's bounds on a group's length for interval N: [⌈N/2⌉, 2N]."""
    if interval < 1:
        raise ValueError(f"interval: {interval} must be at least 1")
    return (interval + 1) // 2, 2 * interval


def optimal_segmentation(
    distance: np.ndarray | Sequence[Sequence[float]],
    min_length: int,
    max_length: int,
    num_groups: int | None = None,
) -> DPResult:
    """Split the T steps into contiguous groups of length in [min_length, max_length] (exactly `num_groups` of them,
    or any number if None) minimising Σ_groups Σ_{i in group} D[start, i]; O(K·T·(max−min+1)).

    Ties are broken towards the earliest split point (deterministic)."""
    table = _as_table(distance)
    T = len(table)
    if not 1 <= min_length <= max_length:
        raise ValueError(f"group lengths: need 1 ≤ min_length ≤ max_length, got [{min_length}, {max_length}]")
    k_range = (math.ceil(T / max_length), T // min_length)
    if num_groups is not None and not k_range[0] <= num_groups <= k_range[1]:
        raise ValueError(
            f"infeasible: {T} steps cannot be split into {num_groups} groups of length in [{min_length}, "
            f"{max_length}] (feasible group counts: {_fmt_range(k_range)})"
        )
    if k_range[0] > k_range[1]:
        raise ValueError(f"infeasible: no split of {T} steps into groups of length in [{min_length}, {max_length}]")
    cost = group_costs(table)
    if num_groups is None:
        return _free_k(cost, T, min_length, max_length)
    # best[k, n]: the first n steps split into k groups; parent[k, n]: start of the k-th group
    best = np.full((num_groups + 1, T + 1), np.inf)
    parent = np.full((num_groups + 1, T + 1), -1, dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, num_groups + 1):
        for n in range(k * min_length, min(k * max_length, T) + 1):
            starts = np.arange(max(0, n - max_length), n - min_length + 1)
            totals = best[k - 1, starts] + cost[starts, n]
            j = int(np.argmin(totals))
            if np.isfinite(totals[j]):
                best[k, n], parent[k, n] = totals[j], starts[j]
    steps, n = [], T
    for k in range(num_groups, 0, -1):
        n = int(parent[k, n])
        steps.append(n)
    return DPResult(tuple(reversed(steps)), float(best[num_groups, T]), T)


def _free_k(cost: np.ndarray, T: int, min_length: int, max_length: int) -> DPResult:
    best = np.full(T + 1, np.inf)
    parent = np.full(T + 1, -1, dtype=np.int64)
    best[0] = 0.0
    for n in range(min_length, T + 1):
        starts = np.arange(max(0, n - max_length), n - min_length + 1)
        totals = best[starts] + cost[starts, n]
        j = int(np.argmin(totals))
        if np.isfinite(totals[j]):
            best[n], parent[n] = totals[j], starts[j]
    steps, n = [], T
    while n > 0:
        n = int(parent[n])
        steps.append(n)
    return DPResult(tuple(reversed(steps)), float(best[T]), T)


def _fmt_range(r: tuple[int, int]) -> str:
    return f"{r[0]}..{r[1]}" if r[0] <= r[1] else "none"


def cachequant_dp(
    distance: np.ndarray | Sequence[Sequence[float]], interval: int, *, free_groups: bool = False
) -> DPResult:
    """CacheQuant §3.2: K = ⌈T/N⌉ groups of length in [⌈N/2⌉, 2N] minimising Σ D[start, i]; the group starts are
    the refresh steps. `free_groups=True` lets K vary within the length bounds (not in the paper: usually it just
    takes the most groups, i.e. the most refreshes)."""
    T = len(_as_table(distance))
    lo, hi = group_length_bounds(interval)
    k = None if free_groups else math.ceil(T / interval)
    try:
        return optimal_segmentation(distance, lo, hi, k)
    except ValueError as exc:
        raise ValueError(f"cachequant_dp(T={T}, N={interval}): {exc}") from exc


def feasible_interval(num_steps: int, interval: int) -> bool:
    """Whether CacheQuant's DP has a solution for T steps and interval N."""
    if interval < 1 or num_steps < 1:
        return False
    lo, _ = group_length_bounds(interval)
    return math.ceil(num_steps / interval) * lo <= num_steps


def dp_sweep(
    distance: np.ndarray | Sequence[Sequence[float]], intervals: Sequence[int] | None = None, step_offset: int = 0
) -> dict[int, DPResult]:
    """CacheQuant's DP for every interval N of the sweep (default: every feasible N in 2..T/2), refresh steps shifted
    by `step_offset` when the table covers only the evaluated steps."""
    table = _as_table(distance)
    T = len(table)
    if intervals is None:
        intervals = [n for n in range(2, max(2, T // 2) + 1) if feasible_interval(T, n)]
    bad = [n for n in intervals if not feasible_interval(T, n)]
    if bad:
        raise ValueError(f"intervals: {bad} are infeasible for {T} steps (need ⌈T/N⌉·⌈N/2⌉ ≤ T)")
    out = {}
    for n in intervals:
        result = cachequant_dp(table, n)
        out[n] = DPResult(tuple(s + step_offset for s in result.refresh_steps), result.cost, T + step_offset)
    return out


def refresh_bits(refresh_steps: Sequence[int], num_steps: int) -> np.ndarray:
    """The cache-interval space's genome: one bit per step, 1 = refresh the unit."""
    bits = np.zeros(num_steps)
    bits[list(refresh_steps)] = 1.0
    return bits


class DPStrategy(Strategy):
    """CacheQuant's DP as a study strategy: one plan per interval N of the sweep, asked once; then nothing.

    `distance` is the (T × T) feature-distance table of the cached unit (`calibration.unit_features`); `encode`
    maps refresh steps to a genome of `spec` (default: a bit per step, `refresh_bits`, which needs spec.size == T).
    `step_offset` shifts the plans when the table covers only the evaluated steps (first step "zero_x0": offset 1).
    """

    name = "cachequant-dp"

    def __init__(
        self,
        spec: GenomeSpec,
        n_objectives: int,
        *,
        seed: int = 0,
        initial: Sequence[np.ndarray] = (),
        distance: np.ndarray | Sequence[Sequence[float]],
        intervals: Sequence[int] | None = None,
        encode: Callable[[tuple[int, ...]], np.ndarray] | None = None,
        step_offset: int = 0,
    ) -> None:
        super().__init__(spec, n_objectives, seed=seed, initial=initial)
        table = _as_table(distance)
        T = len(table)
        num_steps = T + step_offset
        if encode is None:
            if spec.size != num_steps:
                raise ValueError(
                    f"DPStrategy: the genome has {spec.size} genes but the plans have {num_steps} steps; "
                    "pass `encode` to map refresh steps to this space's genome"
                )

            def encode(steps: tuple[int, ...]) -> np.ndarray:
                return refresh_bits(steps, num_steps)

        self.plans: dict[int, DPResult] = dp_sweep(table, intervals, step_offset)
        self._pending: list[np.ndarray] = []
        seen: set[bytes] = set()
        for result in self.plans.values():
            genome = self.spec.clip(encode(result.refresh_steps))
            if genome.tobytes() not in seen:
                seen.add(genome.tobytes())
                self._pending.append(genome)
        self.genomes: list[np.ndarray] = []
        self.values = np.zeros((0, n_objectives))

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        count = len(self._pending) if n is None else max(0, n)
        out, self._pending = self._pending[:count], self._pending[count:]
        return out

    def tell(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        values = as_value_matrix(values, len(genomes), self.n_objectives)
        self.genomes += [np.asarray(g, dtype=float) for g in genomes]
        self.values = np.concatenate([self.values, values])

    def warm_start(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        """Told as usual; plans already evaluated are not asked again."""
        super().warm_start(genomes, values)
        done = {self.spec.clip(g).tobytes() for g in genomes}
        self._pending = [g for g in self._pending if g.tobytes() not in done]

    @property
    def batch_size(self) -> int:
        return max(1, len(self._pending))
