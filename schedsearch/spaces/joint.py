"""Solver × cache × compensation in one genome: the space none of the seed methods searches.

Genome = [S³ solver genes (solver.SolverSpace, §3 of Liu et al. 2024)]
       + [ECAD mask (Aggarwal et al. 2025, §3.1): M × slots bits, row i = recompute bits of step i]
       + [DC-Solver ratios (Zhao et al. 2024, §3.2): one real per step i ≥ dc_order, i < M]
with M = the solver space's max steps. The step count varies with the solver genes, so the mask and ratio genes are
indexed by absolute step: a schedule of n steps uses rows/ratios 0..n-1 and ignores the rest; the first evaluated
step (and a skipped AFS step) is forced to recompute everything, and on a model of two transformers (Wan 2.2) so is
the first step of the second one, wherever the decoded timesteps put it (`baselines.forced_recompute_steps`).

Why absolute step rows and not a per-(step-fraction, block, component) mask: every hand-made schedule (FORA every N,
TGATE, evenly spaced) is defined on step indices, and absolute rows express each exactly at every step count, so
baselines round-trip and seed the search; a fraction grid of R rows would alias them whenever R ≠ n. The price is
that adding/removing a step shifts which rows are in use only at the end (rows keep their step), which suits
mutation. An all-recompute mask decodes to `cache=None` (the uncached model, one key for "no caching").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from schedsearch.spaces.base import GenomeSpec, ModelStructure, SearchSpace
from schedsearch.spaces.baselines import (
    first_evaluated_step,
    fora_cache_plan,
    forced_recompute_steps,
    unique_named,
    with_dc_ratios,
    with_recompute_rows,
)
from schedsearch.spaces.cache_mask import CacheMaskSpace, cache_summary, canonical_plan, mask_rows
from schedsearch.spaces.cache_plan import ComponentCachePlan, slot_names
from schedsearch.spaces.compensation import ratio_summary, round_ratios
from schedsearch.spaces.schedule import Schedule, SolverPlan
from schedsearch.spaces.solver import SolverSpace, solver_summary

_DEFAULT_DC_ORDER: int = SolverPlan.__dataclass_fields__["dc_order"].default


class JointSpace(SearchSpace):
    """Solver schedule, component cache mask and compensation ratios searched together (module docstring).

    `solver_options` go to `SolverSpace` (max_order, predictions, rules, correctors, analytical_first_step, ...);
    `cache=False` / `compensation=False` drop that part of the genome.
    """

    name = "joint"

    def __init__(
        self,
        structure: ModelStructure,
        *,
        nfe_range: tuple[int, int] = (4, 10),
        cache: bool = True,
        compensation: bool = True,
        ratio_range: tuple[float, float] = (0.5, 1.5),
        dc_order: int = _DEFAULT_DC_ORDER,
        **solver_options: Any,
    ) -> None:
        lo, hi = (float(v) for v in ratio_range)
        if not lo <= 1.0 <= hi:
            raise ValueError(f"ratio_range: {ratio_range} must contain 1 (no compensation)")
        if dc_order not in (1, 2, 3):
            raise ValueError(f"dc_order: {dc_order} is not 1, 2 or 3")
        self.structure = structure
        self.boundary = structure.extra.get("expert_boundary")
        self.solver_space = SolverSpace(structure, nfe_range=nfe_range, **solver_options)
        self.nfe_range = self.solver_space.nfe_range
        self.cache = cache
        self.compensation = compensation
        self.ratio_range = (lo, hi)
        self.dc_order = dc_order
        self.layout = structure.layout
        self.slots = slot_names(self.layout) if cache else []
        m = self.max_steps = self.solver_space.max_steps
        n_slots = len(self.slots)
        n_ratios = max(0, m - dc_order) if compensation else 0
        parts = [self.solver_space.genome]
        self.block_skip = bool(cache and structure.block_skip)
        if cache:
            parts.append(GenomeSpec.bits(m * n_slots, [f"m{i}.{s}" for i in range(m) for s in self.slots]))
        if self.block_skip:  # cache_mask: skip blocks whose components are all reused (modulation too)
            parts.append(GenomeSpec.bits(1, ["skip_reused_blocks"]))
        if n_ratios:
            parts.append(GenomeSpec(("real",) * n_ratios, (lo,) * n_ratios, (hi,) * n_ratios,
                                    tuple(f"ratio{i}" for i in range(dc_order, m))))
        self.genome = GenomeSpec.concat(*parts)
        ns = self.solver_space.genome.size
        self._mask = slice(ns, ns + m * n_slots)
        self._skip = self._mask.stop if self.block_skip else None
        self._ratios = slice(self._mask.stop + self.block_skip, self._mask.stop + self.block_skip + n_ratios)

    def decode(self, genome: np.ndarray) -> Schedule:
        x = self.genome.clip(genome)
        plan = self.solver_space.decode_plan(x[: self.solver_space.genome.size])
        n, first = plan.num_steps, first_evaluated_step(plan)
        ratios = [1.0] * n
        if self.compensation:
            genes = round_ratios(x[self._ratios])
            ratios = [1.0 if i < self.dc_order else genes[i - self.dc_order] for i in range(n)]
        plan = dataclasses.replace(with_dc_ratios(plan, ratios), dc_order=self.dc_order)
        cache = None
        if self.cache:
            rows = mask_rows(x[self._mask][: n * len(self.slots)], n, len(self.slots), first,
                             also=forced_recompute_steps(plan, self.boundary))
            if any("0" in row for row in rows):
                skip = self._skip is not None and bool(x[self._skip] > 0.5)
                cache = canonical_plan(self.layout, rows, skip)
        return Schedule(self.structure.name, plan, cache, meta={"space": self.name})

    def encode(self, schedule: Schedule) -> np.ndarray:
        plan, cache = schedule.solver, schedule.cache
        n, first = plan.num_steps, first_evaluated_step(plan)
        if plan.dc_order != self.dc_order:
            raise ValueError(f"schedule.solver.dc_order: {plan.dc_order} is not this space's {self.dc_order}")
        ratios = [s.dc_ratio for s in plan.steps]
        base = dataclasses.replace(with_dc_ratios(plan, [1.0] * n), dc_order=_DEFAULT_DC_ORDER)
        x = np.ones(self.genome.size)
        if self._skip is not None:
            x[self._skip] = 0.0
        x[: self.solver_space.genome.size] = self.solver_space.encode_plan(base)
        if cache is not None:
            if not self.cache or not isinstance(cache, ComponentCachePlan) or cache.layout != self.layout:
                raise ValueError(f"schedule.cache: this {self.name} space caches components of {self.layout!r} "
                                 f"(cache={self.cache})")
            forced = {*range(first + 1), *forced_recompute_steps(plan, self.boundary)}
            if any("0" in cache.recompute[i] for i in forced) or cache.recompute_fraction() == 1.0:
                raise ValueError("schedule.cache: the first evaluated step (and each transformer's first) must "
                                 "recompute everything, and an all-recompute plan is written as cache=None")
            grid = np.ones((self.max_steps, len(self.slots)))
            grid[:n] = [[c == "1" for c in row] for row in cache.recompute]
            x[self._mask] = grid.reshape(-1)
            if cache.skip_reused_blocks and self._skip is None:
                raise ValueError("schedule.cache.skip_reused_blocks: this joint space has no block-skip gene")
            if self._skip is not None:
                x[self._skip] = float(cache.skip_reused_blocks)
        lo, hi = self.ratio_range
        bad = [r for r in ratios if not lo <= r <= hi] + [r for r in ratios[: self.dc_order] if r != 1.0]
        if bad or round_ratios(ratios) != ratios or (not self.compensation and any(r != 1.0 for r in ratios)):
            raise ValueError(f"schedule.solver.steps[].dc_ratio: {ratios} not expressible (range {self.ratio_range}, "
                             f"warm-up {self.dc_order} steps at 1, compensation={self.compensation})")
        if self.compensation:
            x[self._ratios.start : self._ratios.start + max(0, n - self.dc_order)] = ratios[self.dc_order :]
        return x

    def baselines(self) -> list[tuple[str, Schedule]]:
        """The solver space's baselines uncached; FORA every 2 / 3 steps on DPM-Solver++ 2M and UniPC bh2 at the
        largest and the middle NFE of the range; and every seed of the cache space (ECAD's heuristics, ours) on
        DPM-Solver++ 2M at the largest NFE, so the joint search starts from everything both separate searches start
        from (at the cache space's default plan they are the same schedules)."""
        out = []
        plans = self.solver_space.baseline_plans()
        for name, plan in plans:
            plan = dataclasses.replace(plan, dc_order=self.dc_order)
            out.append((name, Schedule(self.structure.name, plan, meta={"space": self.name, "baseline": name})))
        if self.cache:
            lo, hi = self.nfe_range
            targets = {f"{solver}-nfe{nfe}" for solver in ("dpmpp2m", "unipc-bh2") for nfe in {hi, (lo + hi + 1) // 2}}
            for name, plan in plans:
                if name not in targets:
                    continue
                plan = dataclasses.replace(plan, dc_order=self.dc_order)
                first = first_evaluated_step(plan)
                for k in (2, 3):
                    fora = fora_cache_plan(self.layout, plan.num_steps - first, k)
                    rows = ("1" * len(self.slots),) * first + fora.recompute
                    cache = with_recompute_rows(ComponentCachePlan(self.layout, rows),
                                                forced_recompute_steps(plan, self.boundary))
                    if cache.recompute_fraction() < 1.0:
                        label = f"{name}+fora{k}"
                        out.append((label, Schedule(self.structure.name, plan, cache,
                                                    meta={"space": self.name, "baseline": label})))
            top = dict(plans).get(f"dpmpp2m-nfe{hi}")
            if top is not None:
                top = dataclasses.replace(top, dc_order=self.dc_order)
                for name, seed in CacheMaskSpace(self.structure, solver=top).baselines():
                    label = f"dpmpp2m-nfe{hi}+{name}"
                    out.append((label, Schedule(self.structure.name, top, seed.cache,
                                                meta={"space": self.name, "baseline": label})))
        return unique_named(out)

    def summary(self, schedule: Schedule) -> dict[str, Any]:
        out = {**super().summary(schedule), **solver_summary(schedule.solver), **ratio_summary(schedule.solver)}
        cache = schedule.cache
        first = first_evaluated_step(schedule.solver)
        if isinstance(cache, ComponentCachePlan):
            out.update(cache_summary(cache))
            evaluated = cache.recompute[first:]
            out["recompute_nfe"] = sum(row.count("1") / len(row) for row in evaluated)
        else:
            out.update(recompute_fraction=1.0, num_full_steps=schedule.solver.num_steps - first,
                       recompute_nfe=float(schedule.solver.nfe))
        return out
