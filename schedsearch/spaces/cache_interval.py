"""CacheQuant's refresh-step space (Liu et al., CVPR 2025, §3.2; DeepCache/FORA-style unit caching).

One cached unit (blocks [start, end) of a block group, or a UNet's deep branch) on a fixed solver plan. Genome: one
bit per solver step, 1 = recompute (refresh) the unit, 0 = reuse its cached residual. Decode repairs: the first
evaluated step is always refreshed, a skipped AFS step before it never is, and with `max_group` (CacheQuant's group
length bound 2N) a refresh is inserted wherever the gap since the last one would exceed it. One bit per step keeps
the genome equal to `search.dynamic.refresh_bits`, so the DP's plans are genomes of this space as they are.
On a model of two transformers (Wan 2.2) the first step each transformer runs is refreshed too, like the first
evaluated step: that transformer has no residual of its own cached yet (`baselines.forced_recompute_steps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from schedsearch.spaces.base import GenomeSpec, ModelStructure, SearchSpace
from schedsearch.spaces.baselines import first_evaluated_step, forced_recompute_steps, unique_named
from schedsearch.spaces.cache_mask import resolve_solver
from schedsearch.spaces.cache_plan import UnitCachePlan
from schedsearch.spaces.schedule import Schedule, SolverPlan


class CacheIntervalSpace(SearchSpace):
    """CacheQuant / DeepCache: which steps refresh one cached unit (module docstring)."""

    name = "cachequant"

    def __init__(
        self,
        structure: ModelStructure,
        *,
        num_steps: int | None = None,
        solver: SolverPlan | None = None,
        unit: tuple[int, int] | None = None,
        group: str | None = None,
        max_group: int | None = None,
    ) -> None:
        self.structure = structure
        self.solver = resolve_solver(structure, num_steps, solver)
        self.group = structure.unit_group if group is None else group
        if not self.group:
            raise ValueError("group: the model structure names no unit group (unit_group); pass group=")
        if unit is None:
            if structure.unit_blocks < 1:
                raise ValueError("unit: the model structure has no unit_blocks; pass unit=(start, end)")
            unit = (0, structure.unit_blocks)
        start, end = (int(v) for v in unit)
        if not 0 <= start < end or (structure.unit_blocks and end > structure.unit_blocks):
            raise ValueError(f"unit: [{start}, {end}) must be a non-empty block range within the unit group")
        if max_group is not None and max_group < 1:
            raise ValueError(f"max_group: {max_group} must be at least 1")
        self.unit = (start, end)
        self.max_group = max_group
        self.num_steps = self.solver.num_steps
        self.first = first_evaluated_step(self.solver)
        self.forced = forced_recompute_steps(self.solver, (structure.extra or {}).get("expert_boundary"))
        self.genome = GenomeSpec.bits(self.num_steps, [f"refresh{i}" for i in range(self.num_steps)])

    def repair(self, refresh: Sequence[bool]) -> tuple[int, ...]:
        """Refresh steps from per-step flags: first evaluated step on, earlier ones off, each transformer's first
        step on, gaps ≤ max_group."""
        out = [self.first]
        for i in range(self.first + 1, self.num_steps):
            if refresh[i] or i in self.forced or (self.max_group is not None and i - out[-1] >= self.max_group):
                out.append(i)
        return tuple(out)

    def plan(self, refresh_steps: Sequence[int]) -> UnitCachePlan:
        return UnitCachePlan(self.group, self.unit[0], self.unit[1], tuple(refresh_steps), self.num_steps)

    def decode(self, genome: np.ndarray) -> Schedule:
        steps = self.repair(self.genome.clip(genome) > 0.5)
        return Schedule(self.structure.name, self.solver, self.plan(steps), meta=self._meta())

    def refresh_genome(self, refresh_steps: Sequence[int]) -> np.ndarray:
        """Refresh steps -> genome (e.g. `DPStrategy(encode=space.refresh_genome)`)."""
        x = np.zeros(self.num_steps)
        x[list(refresh_steps)] = 1.0
        return x

    def encode(self, schedule: Schedule) -> np.ndarray:
        cache = schedule.cache
        if schedule.solver != self.solver:
            raise ValueError(f"schedule.solver: differs from this {self.name} space's fixed solver plan")
        if not isinstance(cache, UnitCachePlan) or (cache.group, cache.start, cache.end) != (self.group, *self.unit):
            raise ValueError(f"schedule.cache: expected a unit plan of {self.group}[{self.unit[0]}:{self.unit[1]}]")
        x = self.refresh_genome(cache.refresh_steps)
        if self.repair(x > 0.5) != tuple(cache.refresh_steps):
            raise ValueError(f"schedule.cache.refresh_steps: {list(cache.refresh_steps)} break this space's rules "
                             f"(refreshed steps {list(self.forced)}, max_group {self.max_group})")
        return x

    def baselines(self) -> list[tuple[str, Schedule]]:
        """DeepCache / FORA uniform refresh every N = 2..5 evaluated steps (those within max_group)."""
        out = []
        for n in (2, 3, 4, 5):
            if self.max_group is not None and n > self.max_group:
                continue
            steps = tuple(sorted({*range(self.first, self.num_steps, n), *self.forced}))
            name = f"uniform-every{n}"
            out.append((name, Schedule(self.structure.name, self.solver, self.plan(steps),
                                       meta=self._meta(baseline=name))))
        return unique_named(out)

    def _meta(self, **extra: Any) -> dict[str, Any]:
        """The space, and the model's block count in the unit's group (what cache-dit's Bn is counted from when
        the schedule is exported as a DBCache steps mask)."""
        return {"space": self.name, "num_blocks": self.structure.unit_blocks, **extra}

    def summary(self, schedule: Schedule) -> dict[str, Any]:
        out = super().summary(schedule)
        cache = schedule.cache
        if isinstance(cache, UnitCachePlan):
            bounds = (*cache.refresh_steps, cache.num_steps)
            evaluated = cache.num_steps - self.first
            out.update({
                "num_refresh": len(cache.refresh_steps),
                "refresh_fraction": len(cache.refresh_steps) / max(1, evaluated),
                "max_gap": max(b - a for a, b in pairwise(bounds)),
                "unit_blocks": cache.end - cache.start,
            })
        return out
