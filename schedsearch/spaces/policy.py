"""The runtime-policy space: the knobs of the rule-based caches people deploy, with the number of steps beside them.

Genome = [steps (int)] + [kind index (int), when more than one kind is searched] + [the knobs of every kind, in
`KNOBS` order]. A genome decodes to the pipeline's own scheduler at that step count (what a stock pipeline runs
with `num_inference_steps`; DPM-Solver++ 2M where the model has no pipeline scheduler) and one `RuntimePolicy` with
every knob of its kind set, so an exported config needs no defaults filled in by the reader. Knobs of the other
kinds are inactive genes (ignored by decode, so two genomes that differ only there share a key).

Why a space and not a per-runtime tuner: thresholds do not carry over between models, step counts or resolutions
(TeaCache #2/#80/#91, cache-dit #99), and the step count trades against them (fewer steps or more skipping reach the
same cost with different quality), so both are searched jointly by the existing strategies (TPE and NSGA-II take
mixed integer/real genes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from schedsearch.spaces.base import GenomeSpec, ModelStructure, SearchSpace
from schedsearch.spaces.baselines import dpmpp_2m_plan, unique_named
from schedsearch.spaces.policy_plan import DBCACHE_PRESETS, KNOBS, POLICY_KINDS, STEPS_MASK_PRESETS, Knob, RuntimePolicy
from schedsearch.spaces.schedule import Schedule, SolverPlan

DEFAULT_KINDS = ("first_block_cache", "mag_cache", "taylorseer_cache")
# Stock schedulers a pipeline can swap in by name (`Cls.from_config(pipe.scheduler.config)`) and still be called
# with `num_inference_steps` alone: searched beside the pipeline's own with `solvers=` (VP models).
SOLVER_CHOICES = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler")
# Opt-in genes of DBCache (`dbcache_masks=True`): one of cache-dit's steps-mask presets (0 = none) and whether the
# mask is static (cache every 0-step) or dynamic (0-steps may cache, under the threshold).
MASK_KNOBS = (
    Knob("steps_mask", "int", 0, len(STEPS_MASK_PRESETS), 0, (0, len(STEPS_MASK_PRESETS)),
         "cache-dit steps-mask preset: 0 none, then slow, medium, fast, ultra"),
    Knob("steps_mask_static", "bit", 0, 1, False, (0, 1), "the mask's policy: static (True) or dynamic"),
)


def _round_significant(value: float, digits: int = 3) -> float:
    if value == 0:
        return 0.0
    return float(f"{value:.{digits}g}")


class PolicySpace(SearchSpace):
    """Runtime cache policies of `kinds` at `steps_range` steps (module docstring).

    structure.extra may hold what the model fixes: `plans` (step count -> the pipeline's own `SolverPlan`) and
    `policy_fixed` (kind -> params the runtime needs from the model: MagCache's calibrated `mag_ratios`,
    TaylorSeer's `cache_identifiers`); `study.build_space` fills both from the loaded model.
    """

    name = "policy"

    def __init__(
        self,
        structure: ModelStructure,
        *,
        kinds: Sequence[str] = DEFAULT_KINDS,
        steps_range: tuple[int, int] = (10, 20),
        default_steps: int | None = None,
        dbcache_masks: bool = False,
        solvers: Sequence[str] = (),
    ) -> None:
        kinds = tuple(kinds)
        if not kinds:
            raise ValueError("kinds: give at least one runtime policy kind")
        bad = [k for k in kinds if k not in POLICY_KINDS]
        if bad:
            raise ValueError(f"kinds: unknown {bad}; use some of {POLICY_KINDS}")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"kinds: {list(kinds)} repeats a kind")
        lo, hi = (int(v) for v in steps_range)
        if not 2 <= lo <= hi:
            raise ValueError(f"steps_range: {steps_range} must be (low, high) with 2 ≤ low ≤ high")
        self.structure, self.kinds, self.steps_range = structure, kinds, (lo, hi)
        self.default_steps = hi if default_steps is None else int(default_steps)
        if not lo <= self.default_steps <= hi:
            raise ValueError(f"default_steps: {self.default_steps} must lie in steps_range {steps_range}")
        fixed: Mapping[str, Mapping[str, Any]] = structure.extra.get("policy_fixed", {})
        if "mag_cache" in kinds and "mag_ratios" not in fixed.get("mag_cache", {}):
            raise ValueError("kinds: mag_cache needs the model's calibrated magnitude ratios (policy_fixed), which "
                             "study.build_space calibrates from the loaded model")
        self.fixed = {k: dict(fixed.get(k, {})) for k in kinds}
        self.knobs = {k: tuple(self._bounded(k, kn) for kn in KNOBS[k]) for k in kinds}
        if dbcache_masks and "dbcache" not in kinds:
            raise ValueError("dbcache_masks: applies when kinds include dbcache")
        self.dbcache_masks = dbcache_masks
        if dbcache_masks:  # space-level genes: a steps-mask preset and its policy, decoded into the fixed params
            self.knobs["dbcache"] = (*self.knobs["dbcache"], *MASK_KNOBS)
        specs = [GenomeSpec(("int",), (float(lo),), (float(hi),), ("steps",))]
        if len(kinds) > 1:
            specs.append(GenomeSpec(("int",), (0.0,), (float(len(kinds) - 1),), ("kind",)))
        self._slices: dict[str, slice] = {}
        start = sum(s.size for s in specs)
        for kind in kinds:
            knobs = self.knobs[kind]
            specs.append(GenomeSpec(
                tuple("real" if k.gene == "log" else "bit" if k.gene == "bit" else k.gene for k in knobs),
                tuple(math.log10(k.low) if k.gene == "log" else float(k.low) for k in knobs),
                tuple(math.log10(k.high) if k.gene == "log" else float(k.high) for k in knobs),
                tuple(f"{kind}.{k.name}" for k in knobs)))
            self._slices[kind] = slice(start, start + len(knobs))
            start += len(knobs)
        self.solvers = tuple(solvers)
        bad = [v for v in self.solvers if v not in SOLVER_CHOICES]
        if bad or len(set(self.solvers)) != len(self.solvers):
            raise ValueError(f"solvers: {list(self.solvers)}: use distinct names among {SOLVER_CHOICES}")
        if self.solvers:  # last, so the other genes keep their places: 0 = the pipeline's own scheduler
            solver_plans = structure.extra.get("solver_plans", {})
            missing = [v for v in self.solvers if (v, lo) not in solver_plans]
            if missing:
                raise ValueError(f"solvers: no plans of {missing} for this model (study.build_space makes them "
                                 "from the loaded model's scheduler config)")
            specs.append(GenomeSpec(("int",), (0.0,), (float(len(self.solvers)),), ("solver",)))
        self.genome = GenomeSpec.concat(*specs)

    def _bounded(self, kind: str, knob: Knob) -> Knob:
        """Search ranges that depend on the model: DBCache's Fn/Bn within its number of blocks."""
        if kind == "dbcache" and knob.name in ("Fn_compute_blocks", "Bn_compute_blocks"):
            top = max(1, self.structure.num_blocks - 1)
            return dataclasses.replace(knob, high=min(knob.high, top), low=min(knob.low, top))
        return knob

    @property
    def scheduler(self) -> str:
        """The stock scheduler the plans are: the pipeline's own, or diffusers' DPM-Solver++ 2M (`dpmpp_2m_plan`)."""
        return self.structure.extra.get("scheduler", "DPMSolverMultistepScheduler")

    def plan(self, steps: int, solver: str | None = None) -> SolverPlan:
        """The plan at `steps`: the pipeline's own scheduler, or the stock scheduler `solver` built from its
        config (`solvers`)."""
        if solver is not None:
            return self.structure.extra["solver_plans"][(solver, steps)]
        plans: Mapping[int, SolverPlan] = self.structure.extra.get("plans", {})
        if steps in plans:
            return plans[steps]
        return dpmpp_2m_plan(self.structure.num_train_timesteps, steps)

    # --- SearchSpace --------------------------------------------------------------------------------------------

    def decode(self, genome: np.ndarray) -> Schedule:
        x = self.genome.clip(genome)
        steps = int(x[0])
        kind = self.kinds[int(x[1])] if len(self.kinds) > 1 else self.kinds[0]
        values = {k.name: self._value(k, v) for k, v in zip(self.knobs[kind], x[self._slices[kind]], strict=True)}
        solver = self.solvers[int(x[-1]) - 1] if self.solvers and int(x[-1]) > 0 else None
        return self.schedule(steps, kind, values, solver=solver)

    def schedule(self, steps: int, kind: str, values: Mapping[str, Any], meta: Mapping[str, Any] | None = None,
                 solver: str | None = None) -> Schedule:
        """The schedule of this space for `kind` with knob `values` at `steps` steps (repaired to be valid)."""
        values = dict(values)
        if kind == "taylorseer_cache":  # warm-up steps must leave at least one step to forecast
            values["disable_cache_before_step"] = min(int(values["disable_cache_before_step"]), steps - 1)
        if kind == "dbcache":
            values["Bn_compute_blocks"] = min(int(values["Bn_compute_blocks"]),
                                              max(0, self.structure.num_blocks - int(values["Fn_compute_blocks"])))
        if kind == "dbcache" and self.dbcache_masks:
            values |= self._mask_params(steps, int(values.pop("steps_mask")), bool(values.pop("steps_mask_static")))
        policy = RuntimePolicy(kind, tuple({**values, **self.fixed[kind]}.items())).validate()
        return Schedule(self.structure.name, self.plan(steps, solver), policy=policy,
                        meta={"space": self.name, "scheduler": solver or self.scheduler, **dict(meta or {})})

    def _mask_params(self, steps: int, preset: int, static: bool) -> dict[str, Any]:
        """cache-dit's steps-mask preset `STEPS_MASK_PRESETS[preset - 1]` at this plan's network calls (0: none;
        cache-dit has no preset for some short runs, which then run without one), and its policy."""
        from schedsearch.runtime.cache_dit_runtime import cache_dit_steps_mask

        if preset == 0:
            return {}
        try:
            mask = cache_dit_steps_mask(STEPS_MASK_PRESETS[preset - 1], self.plan(steps).nfe)
        except AssertionError:
            return {}
        return {"steps_computation_mask": mask, "steps_computation_policy": "static" if static else "dynamic"}

    def _mask_genes(self, policy: RuntimePolicy, steps: int) -> tuple[float, float]:
        mask = policy.settings.get("steps_computation_mask")
        if mask is None:
            return 0.0, 0.0
        for i in range(1, len(STEPS_MASK_PRESETS) + 1):
            found = self._mask_params(steps, i, False).get("steps_computation_mask")
            if found == tuple(mask):
                return float(i), float(policy.settings.get("steps_computation_policy") == "static")
        raise ValueError("schedule.policy.params.steps_computation_mask: not one of cache-dit's presets at "
                         f"{steps} steps, which is all this space's mask genes express")

    @staticmethod
    def _value(knob: Knob, gene: float) -> Any:
        if knob.gene == "log":
            return _round_significant(10.0 ** float(gene))
        if knob.gene == "int":
            value = int(np.rint(gene))
            # DBCache: 0 consecutive cached steps means no limit, cache-dit's -1
            return -1 if knob.name == "max_continuous_cached_steps" and value == 0 else value
        if knob.gene == "bit":
            return bool(gene > 0.5)
        return round(float(gene), 3)

    @staticmethod
    def _gene(knob: Knob, value: Any) -> float:
        if knob.gene == "log":
            return math.log10(max(float(value), 1e-12))
        if knob.name == "max_continuous_cached_steps" and value == -1:
            return 0.0
        return float(value)

    def encode(self, schedule: Schedule) -> np.ndarray:
        policy = schedule.policy
        if policy is None or policy.kind not in self.kinds:
            raise ValueError(f"schedule.policy: expected one of {self.kinds}, got "
                             f"{None if policy is None else policy.kind}")
        steps = schedule.solver.num_steps
        choices = [None, *self.solvers]
        in_range = self.steps_range[0] <= steps <= self.steps_range[1]
        found = [i for i, v in enumerate(choices) if in_range and schedule.solver == self.plan(steps, v)]
        if not found:
            raise ValueError("schedule.solver: not this space's plan at that step count (the pipeline's scheduler"
                             + (f" or one of {self.solvers}" if self.solvers else "") + ")")
        x = np.array([(lo + hi) / 2 for lo, hi in zip(self.genome.low, self.genome.high, strict=True)])
        x[0] = steps
        if len(self.kinds) > 1:
            x[1] = self.kinds.index(policy.kind)
        knobs = self.knobs[policy.kind]
        if policy.kind == "dbcache" and self.dbcache_masks:
            genes = [self._gene(k, policy.get(k.name)) for k in knobs[: -len(MASK_KNOBS)]]
            genes += self._mask_genes(policy, steps)
        elif "steps_computation_mask" in policy.settings and policy.kind == "dbcache":
            raise ValueError("schedule.policy: a steps computation mask needs the space's dbcache_masks genes")
        else:
            genes = [self._gene(k, policy.get(k.name)) for k in knobs]
        x[self._slices[policy.kind]] = genes
        if self.solvers:
            x[-1] = found[0]
        return self.genome.clip(x)

    def baselines(self) -> list[tuple[str, Schedule]]:
        """Each runtime's own default config at `default_steps`: what users enable without tuning."""
        out = []
        for kind in self.kinds:
            name = f"{kind}-default-{self.default_steps}steps"
            values = {k.name: _clip_default(k) for k in self.knobs[kind]}
            out.append((name, self.schedule(self.default_steps, kind, values, {"baseline": name})))
        return unique_named(out)

    def comparisons(self) -> list[tuple[str, Schedule]]:
        """The defaults, and the uncached pipeline at the ends and middle of the step range: fewer steps alone is
        the simplest speed-up, which any tuned policy has to beat (not seeds: the space always has a policy)."""
        out = self.baselines()
        if "dbcache" in self.kinds:
            out += self._cache_dit_presets()
        lo, hi = self.steps_range
        for steps in sorted({lo, (lo + hi) // 2, hi}):
            name = f"no-cache-{steps}steps"
            out.append((name, Schedule(self.structure.name, self.plan(steps),
                                       meta={"space": self.name, "scheduler": self.scheduler, "baseline": name})))
        return unique_named(out)

    def _cache_dit_presets(self) -> list[tuple[str, Schedule]]:
        """cache-dit's documented DBCache settings and its steps-mask presets at `default_steps` (Fn/Bn clipped to
        the model's blocks, in the preset's proportion: F8B8 on a 6-block model is F2B3)."""
        blocks = self.structure.num_blocks
        out = []
        base = {k.name: _clip_default(k) for k in self.knobs["dbcache"]}
        for label, preset in DBCACHE_PRESETS.items():
            values = {**base, **preset}
            fn, bn = values["Fn_compute_blocks"], values["Bn_compute_blocks"]
            if fn + bn >= blocks:  # keep at least one cached block, in the preset's proportion
                fn = max(1, min(fn, blocks - 1) if bn == 0 else (blocks - 1) * fn // (fn + bn) or 1)
                bn = min(bn, blocks - 1 - fn)
            values.update(Fn_compute_blocks=fn, Bn_compute_blocks=bn)
            name = f"cache-dit-{label}-{self.default_steps}steps"
            out.append((name, self.schedule(self.default_steps, "dbcache", values, {"baseline": name})))
        for i, preset in enumerate(STEPS_MASK_PRESETS, start=1):
            # the mask alone, with cache-dit's default (dynamic) policy left implicit, as cache-dit documents it
            mask = self._mask_params(self.default_steps, i, static=False).get("steps_computation_mask")
            if mask is None:  # cache-dit has no mask presets for some short runs (< 8 steps but 4, 6)
                continue
            values = {**base, **DBCACHE_PRESETS["F8B0-0.08"], "Fn_compute_blocks": min(8, blocks - 1),
                      "steps_computation_mask": mask}
            name = f"cache-dit-mask-{preset}-{self.default_steps}steps"
            out.append((name, self.schedule(self.default_steps, "dbcache", values, {"baseline": name})))
        return out

    def summary(self, schedule: Schedule) -> dict[str, Any]:
        out: dict[str, Any] = {"space": self.name, "num_steps": schedule.solver.num_steps, "nfe": schedule.solver.nfe}
        policy = schedule.policy
        out["policy"] = "none" if policy is None else policy.kind
        if policy is not None:
            for k in KNOBS[policy.kind]:
                out[k.name] = policy.get(k.name)
            mask = policy.settings.get("steps_computation_mask")
            if mask is not None:
                out["mask_compute_fraction"] = sum(mask) / len(mask)
                out["mask_policy"] = policy.settings.get("steps_computation_policy", "dynamic")
        return out


def _clip_default(knob: Knob) -> Any:
    """The runtime's default, inside the space's range (DBCache's F8 on a 6-block model is F5)."""
    default = knob.default
    if knob.name == "max_continuous_cached_steps" and default == -1:
        return -1
    if isinstance(default, bool):
        return default
    return type(default)(min(max(default, knob.low), knob.high))
