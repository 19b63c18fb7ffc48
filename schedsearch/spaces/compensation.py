"""DC-Solver's compensation-ratio space (Zhao et al., ECCV 2024, §3.2) on a fixed UniPC plan.

The base plan is UniPC bh2, order 2, with corrector (DC-Solver's base solver) at a given NFE on linspace timesteps.
Genome: one real ratio r_i in `ratio_range` per step i ≥ dc_order; the warm-up steps (the first dc_order) keep
r = 1 and are not in the genome, since the Lagrange interpolant needs dc_order + 1 past outputs. Ratios are rounded
to `RATIO_DECIMALS` so near-identical candidates share a key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from schedsearch.spaces.base import GenomeSpec, ModelStructure, SearchSpace
from schedsearch.spaces.baselines import linspace_timesteps, unipc_plan, with_dc_ratios
from schedsearch.spaces.schedule import Rule, Schedule, SolverPlan

RATIO_DECIMALS = 6


def round_ratios(values: Sequence[float] | np.ndarray) -> list[float]:
    return [float(r) for r in np.round(np.asarray(values, dtype=float), RATIO_DECIMALS)]


def ratio_summary(plan: SolverPlan) -> dict[str, Any]:
    """Compensation columns of a plan (shared with the joint space)."""
    dev = [abs(s.dc_ratio - 1.0) for s in plan.steps]
    return {
        "mean_abs_ratio_dev": float(np.mean(dev)),
        "max_abs_ratio_dev": float(np.max(dev)),
        "num_compensated": sum(d > 0 for d in dev),
    }


class CompensationSpace(SearchSpace):
    """DC-Solver: per-step compensation ratios on UniPC (module docstring)."""

    name = "dc"

    def __init__(
        self,
        structure: ModelStructure,
        *,
        nfe: int = 5,
        ratio_range: tuple[float, float] = (0.5, 1.5),
        order: int = 2,
        rule: Rule = "bh2",
        dc_order: int = 2,
        timesteps: Sequence[float] | None = None,
    ) -> None:
        lo, hi = (float(v) for v in ratio_range)
        if not lo <= 1.0 <= hi:
            raise ValueError(f"ratio_range: {ratio_range} must contain 1 (no compensation)")
        ts = tuple(timesteps) if timesteps is not None else linspace_timesteps(structure.num_train_timesteps, nfe)
        if len(ts) != nfe:
            raise ValueError(f"timesteps: {len(ts)} given for nfe {nfe}")
        if nfe <= dc_order:
            raise ValueError(f"nfe: {nfe} steps leave no step after the {dc_order} warm-up steps to compensate")
        self.structure = structure
        self.ratio_range = (lo, hi)
        base = unipc_plan(ts, order=order, rule=rule, corrector=True)
        self.base = replace(base, dc_order=dc_order)
        self.base.validate(structure.num_train_timesteps)
        self.dc_order = dc_order
        self.rule = rule
        k = nfe - dc_order
        self.genome = GenomeSpec(("real",) * k, (lo,) * k, (hi,) * k, tuple(f"ratio{i}" for i in range(dc_order, nfe)))

    def plan(self, ratios: Sequence[float]) -> SolverPlan:
        """The base plan with `ratios` on the compensated steps (warm-up steps 1)."""
        return with_dc_ratios(self.base, [1.0] * self.dc_order + round_ratios(ratios))

    def decode(self, genome: np.ndarray) -> Schedule:
        return Schedule(self.structure.name, self.plan(self.genome.clip(genome)), meta={"space": self.name})

    def encode(self, schedule: Schedule) -> np.ndarray:
        plan = schedule.solver
        ratios = [s.dc_ratio for s in plan.steps]
        if (
            schedule.cache is not None
            or len(ratios) != self.base.num_steps
            or plan != with_dc_ratios(self.base, ratios)
            or any(r != 1.0 for r in ratios[: self.dc_order])
            or round_ratios(ratios) != ratios
        ):
            raise ValueError(f"schedule: not this {self.name} space's UniPC base plan with ratios (or it has a cache)")
        return np.array(ratios[self.dc_order :], dtype=float)

    def baselines(self) -> list[tuple[str, Schedule]]:
        """Plain UniPC (all ratios 1)."""
        name = f"unipc-{self.rule}-nfe{self.base.nfe}"
        plan = with_dc_ratios(self.base, [1.0] * self.base.num_steps)
        return [(name, Schedule(self.structure.name, plan, meta={"space": self.name, "baseline": name}))]

    def summary(self, schedule: Schedule) -> dict[str, Any]:
        return {**super().summary(schedule), **ratio_summary(schedule.solver)}
