"""S³ / USF solver-schedule space (Liu et al., ICLR 2024, §3): every step chooses its timestep, prediction type,
order, corrector and multistep rule; the run may start with the analytical first step (AFS, zero x0).

Genome (fixed length; M = max steps = max NFE + 1 if the AFS is allowed):
    nfe                      int  [nfe_min, nfe_max]   model evaluations; steps = nfe + afs
    afs                      bit                       first_step "zero_x0" (USF's analytical first step)
    t1 .. t{M-1}             real [t_min, T - 1]       timesteps after the first (fixed at T - 1, as USF and
                                                       diffusers' linspace / trailing spacings start there; with
                                                       fixed_start=False a gene t0 is added); the first
                                                       `steps - 1` are used, sorted decreasing and pushed apart
                                                       to `min_spacing`, so those spacings are expressed exactly
    order0 .. order{M-1}     int  [1, max_order]       clipped to the outputs available (step i has i + 1);
                                                       the step to σ = 0 is first order
    pred0 .. pred{M-1}       int  index into `predictions` (data | noise)
    corr0 .. corr{M-1}       bit  UniC corrector (no extra NFE); never on the last step
    rule0 .. rule{M-1}       int  index into `rules` (bh1 | bh2 | dpmsolver)
Genes of steps beyond `steps` are ignored by decode (they come back into play when a mutation adds steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from schedsearch.spaces.base import GenomeSpec, ModelStructure, SearchSpace
from schedsearch.spaces.baselines import (
    ddim_plan,
    dpm_solver_plan,
    linspace_timesteps,
    unipc_plan,
    unique_named,
)
from schedsearch.spaces.schedule import MAX_ORDER, PREDICTIONS, RULES, Schedule, SolverPlan, SolverStep

TIMESTEP_DECIMALS = 3  # repaired timesteps are rounded so that decode(encode(decode(x))) is bit-identical


class SolverSpace(SearchSpace):
    """S³'s searchable solver schedules at an NFE in `nfe_range` (inclusive); see the module docstring."""

    name = "solver"

    def __init__(
        self,
        structure: ModelStructure,
        *,
        nfe_range: tuple[int, int] = (4, 10),
        max_order: int = MAX_ORDER,
        predictions: Sequence[str] = PREDICTIONS,
        rules: Sequence[str] = RULES,
        correctors: bool = True,
        analytical_first_step: bool = True,
        fixed_start: bool = True,
        final_timestep: float | None = None,
        min_spacing: float = 0.5,
    ) -> None:
        lo, hi = (int(v) for v in nfe_range)
        if not 1 <= lo <= hi:
            raise ValueError(f"nfe_range: {nfe_range} must be (low, high) with 1 <= low <= high")
        if not 1 <= max_order <= MAX_ORDER:
            raise ValueError(f"max_order: {max_order} must lie in [1, {MAX_ORDER}]")
        for field, values, valid in (("predictions", predictions, PREDICTIONS), ("rules", rules, RULES)):
            if not values or set(values) - set(valid):
                raise ValueError(f"{field}: {list(values)} must be a non-empty subset of {list(valid)}")
        self.structure = structure
        self.nfe_range = (lo, hi)
        self.max_order = max_order
        self.predictions = tuple(predictions)
        self.rules = tuple(rules)
        self.correctors = correctors
        self.analytical_first_step = analytical_first_step
        self.fixed_start = fixed_start
        self.final_timestep = final_timestep
        self.min_spacing = float(min_spacing)
        self.max_steps = hi + (1 if analytical_first_step else 0)
        self.t_max = float(structure.num_train_timesteps - 1)
        self.t_min = 0.0 if final_timestep is None else float(final_timestep) + self.min_spacing
        if self.t_max - self.t_min < self.min_spacing * self.max_steps:
            raise ValueError(
                f"min_spacing: {min_spacing} × {self.max_steps} steps does not fit in [{self.t_min}, {self.t_max}]"
            )
        m = self.max_steps
        first_t = 1 if fixed_start else 0
        mt = m - first_t  # timestep genes
        self._slices = {}
        offset = 2
        for key, size in (("t", mt), ("order", m), ("pred", m), ("corr", m), ("rule", m)):
            self._slices[key] = slice(offset, offset + size)
            offset += size
        self.genome = GenomeSpec.concat(
            GenomeSpec(("int", "bit"), (lo, 0), (hi, int(analytical_first_step)), ("nfe", "afs")),
            GenomeSpec(("real",) * mt, (self.t_min,) * mt, (self.t_max,) * mt,
                       tuple(f"t{i}" for i in range(first_t, m))),
            GenomeSpec(("int",) * m, (1,) * m, (max_order,) * m, tuple(f"order{i}" for i in range(m))),
            GenomeSpec(("int",) * m, (0,) * m, (len(self.predictions) - 1,) * m, tuple(f"pred{i}" for i in range(m))),
            GenomeSpec(("bit",) * m, (0,) * m, (int(correctors),) * m, tuple(f"corr{i}" for i in range(m))),
            GenomeSpec(("int",) * m, (0,) * m, (len(self.rules) - 1,) * m, tuple(f"rule{i}" for i in range(m))),
        )

    # --- plan <-> genes (JointSpace reuses these on its solver part) -------------------------------------------

    def repair_timesteps(self, values: np.ndarray) -> tuple[float, ...]:
        """Timesteps from genes: sorted decreasing inside [t_min, t_max] (the first fixed at t_max when
        `fixed_start`), consecutive ones at least `min_spacing` apart, rounded."""
        vals = np.sort(np.clip(np.asarray(values, dtype=float), self.t_min, self.t_max))[::-1]
        ts = np.concatenate([[self.t_max], vals]) if self.fixed_start else vals.copy()
        gap = self.min_spacing
        for i in range(1, ts.size):
            ts[i] = min(ts[i], ts[i - 1] - gap)
        ts[-1] = max(ts[-1], self.t_min)
        for i in range(ts.size - 2, -1, -1):
            ts[i] = max(ts[i], ts[i + 1] + gap)
        return tuple(float(t) for t in np.round(ts, TIMESTEP_DECIMALS))

    def decode_plan(self, x: np.ndarray) -> SolverPlan:
        """Clipped solver genes -> valid SolverPlan (dc ratios 1)."""
        nfe, afs = int(x[0]), bool(x[1])
        n = nfe + int(afs)
        ts = self.repair_timesteps(x[self._slices["t"]][: n - int(self.fixed_start)])
        orders, preds, corrs, rules = (x[self._slices[k]] for k in ("order", "pred", "corr", "rule"))
        steps = []
        for i in range(n):
            last = i == n - 1
            order = min(int(orders[i]), i + 1)
            if last and self.final_timestep is None:
                order = 1  # λ is infinite at σ = 0
            steps.append(SolverStep(
                order=order,
                prediction=self.predictions[int(preds[i])],  # type: ignore[arg-type]
                corrector=bool(corrs[i]) and not last,
                rule=self.rules[int(rules[i])],  # type: ignore[arg-type]
            ))
        return SolverPlan(ts, tuple(steps), self.final_timestep, "zero_x0" if afs else "model")

    def encode_plan(self, plan: SolverPlan) -> np.ndarray:
        """SolverPlan -> solver genes; ValueError naming what this space cannot express."""
        self.check_plan(plan)
        m, n = self.max_steps, plan.num_steps
        x = np.zeros(self._slices["rule"].stop)
        x[0], x[1] = plan.nfe, float(plan.first_step == "zero_x0")
        used = plan.timesteps[1:] if self.fixed_start else plan.timesteps
        free = self._slices["t"].stop - self._slices["t"].start - len(used)
        # unused timestep genes spread over the range: a mutation that adds a step inserts a sensible timestep
        x[self._slices["t"]] = np.concatenate([used, np.linspace(self.t_max, self.t_min, free + 2)[1:-1]])
        filler = plan.steps[-2] if n > 1 else plan.steps[-1]
        rows = list(plan.steps) + [filler] * (m - n)
        top_order = max(s.order for s in plan.steps)
        for key, values in (
            ("order", [s.order if i < n else top_order for i, s in enumerate(rows)]),
            ("pred", [self.predictions.index(s.prediction) for s in rows]),
            ("corr", [float(s.corrector) for s in rows]),
            ("rule", [self.rules.index(s.rule) for s in rows]),
        ):
            x[self._slices[key]] = values
        return x

    def check_plan(self, plan: SolverPlan) -> None:
        """ValueError unless decode can reproduce `plan` exactly."""
        lo, hi = self.nfe_range
        problems = []
        if not lo <= plan.nfe <= hi:
            problems.append(f"nfe {plan.nfe} outside {self.nfe_range}")
        if plan.first_step == "zero_x0" and not self.analytical_first_step:
            problems.append("analytical first step not allowed")
        if plan.final_timestep != self.final_timestep:
            problems.append(f"final_timestep {plan.final_timestep} != {self.final_timestep}")
        if plan.dc_order != SolverPlan.__dataclass_fields__["dc_order"].default:
            problems.append(f"dc_order {plan.dc_order} is not the default")
        used = plan.timesteps[1:] if self.fixed_start else plan.timesteps
        if plan.timesteps != self.repair_timesteps(np.asarray(used)):
            problems.append("timesteps are not in repaired form (start, range, spacing, rounding)")
        for i, s in enumerate(plan.steps):
            if s.order > self.max_order or s.prediction not in self.predictions or s.rule not in self.rules:
                problems.append(f"step {i} ({s}) uses an option outside the space")
            if s.corrector and not self.correctors:
                problems.append(f"step {i} has a corrector")
            if s.dc_ratio != 1.0:
                problems.append(f"step {i} has dc_ratio {s.dc_ratio} (use the dc or joint space)")
        if problems:
            raise ValueError(f"schedule: not in this {self.name} space: " + "; ".join(problems))

    # --- SearchSpace --------------------------------------------------------------------------------------------

    def decode(self, genome: np.ndarray) -> Schedule:
        plan = self.decode_plan(self.genome.clip(genome))
        return Schedule(self.structure.name, plan, meta={"space": self.name})

    def encode(self, schedule: Schedule) -> np.ndarray:
        if schedule.cache is not None:
            raise ValueError(f"schedule.cache: the {self.name} space has no cache plan; got {schedule.cache.kind}")
        return self.encode_plan(schedule.solver)

    def baselines(self) -> list[tuple[str, Schedule]]:
        """S³'s seeds: DDIM, DPM-Solver++ 2M / 3M, UniPC bh1 / bh2 (order 2) on linspace timesteps at every NFE."""
        out = []
        for name, plan in self.baseline_plans():
            out.append((name, Schedule(self.structure.name, plan, meta={"space": self.name, "baseline": name})))
        return unique_named(out)

    def baseline_plans(self) -> list[tuple[str, SolverPlan]]:
        out = []
        lo, hi = self.nfe_range
        for nfe in range(lo, hi + 1):
            ts = linspace_timesteps(self.structure.num_train_timesteps, nfe)
            candidates = [
                (f"ddim-nfe{nfe}", ddim_plan(ts, final_timestep=self.final_timestep)),
                (f"dpmpp2m-nfe{nfe}", dpm_solver_plan(ts, order=2, final_timestep=self.final_timestep)),
                (f"dpmpp3m-nfe{nfe}", dpm_solver_plan(ts, order=3, final_timestep=self.final_timestep)),
                (f"unipc-bh1-nfe{nfe}", unipc_plan(ts, order=2, rule="bh1", final_timestep=self.final_timestep)),
                (f"unipc-bh2-nfe{nfe}", unipc_plan(ts, order=2, rule="bh2", final_timestep=self.final_timestep)),
            ]
            for name, plan in candidates:
                try:
                    self.check_plan(plan)
                except ValueError:
                    continue  # e.g. max_order 2 excludes 3M, rules=("bh2",) excludes bh1
                out.append((name, plan))
        return out

    def summary(self, schedule: Schedule) -> dict[str, Any]:
        return {**super().summary(schedule), **solver_summary(schedule.solver)}


def solver_summary(plan: SolverPlan) -> dict[str, Any]:
    """Decision columns of a solver plan (shared with the joint space)."""
    steps = plan.steps
    return {
        "nfe": plan.nfe,
        "num_steps": plan.num_steps,
        "afs": plan.first_step == "zero_x0",
        "mean_order": float(np.mean([s.order for s in steps])),
        "max_order": max(s.order for s in steps),
        "num_correctors": sum(s.corrector for s in steps),
        "noise_fraction": sum(s.prediction == "noise" for s in steps) / len(steps),
        "rules": ",".join(sorted({s.rule for s in steps})),
        "t_first": plan.timesteps[0],
        "t_last": plan.timesteps[-1],
    }
