"""Schedules as plain, frozen data: what to run at every sampling step, and its JSON form (v1).

A `Schedule` is what the search proposes, the store deduplicates by `key`, the exporter writes, and the runtime
executes. It imports no torch so that search code and tests stay light.

Solver steps follow S³'s unified sampling framework (USF, Liu et al., ICLR 2024, §3): every step chooses its
prediction type, Taylor/multistep order, corrector and (DC-Solver, Zhao et al., ECCV 2024, §3.2) a compensation
ratio. Step i integrates from `timesteps[i]` to `timesteps[i+1]` (or to `final_timestep`, or to σ = 0).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from schedsearch.spaces.cache_plan import CachePlan, cache_plan_from_dict
from schedsearch.spaces.errors import ScheduleError
from schedsearch.spaces.policy_plan import RuntimePolicy, policy_from_dict

FORMAT = "schedsearch.schedule/v1"
MAX_ORDER = 3
PREDICTIONS = ("data", "noise")
RULES = ("bh1", "bh2", "dpmsolver")
FIRST_STEP_CHOICES = ("model", "zero_x0")

Prediction = Literal["data", "noise"]
Rule = Literal["bh1", "bh2", "dpmsolver"]
FirstStep = Literal["model", "zero_x0"]


# Compensation ratios a schedule may hold. DC-Solver's fitted ratios sit near 1 (the paper's Fig. 4; 0.92-1.38 in
# benchmarks/results/dc_fit.json), the search spaces use [0.5, 1.5]; a ratio of -1 or 1e9 extrapolates the model
# output far outside the step and produces garbage (an all-black image at 1e300), so it is refused.
DC_RATIO_RANGE = (0.25, 2.0)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SolverStep:
    """The decisions of one step.

    order: Taylor / multistep order of the predictor (1-3); it uses this many model outputs, newest first.
    prediction: integrate the data (x0) prediction (DPM-Solver++ / UniPC `predict_x0`) or the noise prediction.
    corrector: apply UniC (UniPC, Zhao et al. 2023, eq. 8) to this step's result, using the model output evaluated
        at the step's end point, which the next step needs anyway: no extra NFE. Its order equals `order`.
    rule: how the multistep terms are weighted. "bh1"/"bh2": UniPC's B(h) = h or e^h - 1 (UniP-p, eq. 5; order ≥ 3
        solves R ρ = b, order 2 uses ρ = 1/2, so "bh2" at order 2 is exactly DPM-Solver(++) 2M midpoint).
        "dpmsolver": DPM-Solver(++) multistep (Lu et al. 2022b, Alg. 2-3): order 2 midpoint, order 3 the 3M rule;
        its corrector, if any, uses bh2.
    dc_ratio: DC-Solver dynamic compensation ratio r_i (1 = off): replace this step's newest model output by the
        Lagrange interpolant of the last `dc_order + 1` outputs at τ = t_{i-1} + r_i (t_i - t_{i-1}).
    """

    order: int = 1
    prediction: Prediction = "data"
    corrector: bool = False
    rule: Rule = "bh2"
    dc_ratio: float = 1.0

    def __post_init__(self) -> None:
        if _is_int(self.dc_ratio):  # 1 and 1.0 are one ratio: one content key
            object.__setattr__(self, "dc_ratio", float(self.dc_ratio))


ROUNDING_SLACK = 0.02  # network_timesteps may differ from timesteps by 2% of the range (one shifted unit at shift ≤ 20)


@dataclass(frozen=True)
class SolverPlan:
    """Timesteps (model time, continuous allowed, strictly decreasing) and one `SolverStep` each.

    final_timestep: where the last step ends; None means σ = 0 (the last step returns the denoised estimate, as
        diffusers' `final_sigmas_type="zero"` and DDIM's `set_alpha_to_one`).
    first_step: "model" evaluates the model at timesteps[0]; "zero_x0" is USF's analytical first step (x0 ≈ 0,
        so ε ≈ x_T / σ_T) and saves one NFE.
    network_timesteps: the time the network is called with at each step, when it differs from the time the step
        integrates at (None: the same). diffusers' schedulers round it: Karras/exponential/beta sigmas call the
        network at round(t(σ)), the flow variants of DPM-Solver++/UniPC at int(σ·T), while every coefficient uses
        the exact σ. Within 1 of `timesteps`; equal values collapse to None, so they share a content key.
    noise_scale: the start is `noise_scale`·ε instead of ε (the VP marginal at σ_T ≈ 1). diffusers' Euler with
        linspace/trailing spacing starts from σ_max·ε in its x/α variable, i.e. σ_max/√(σ_max²+1)·ε here
        (0.9977 for SD's scaled-linear betas); 1.0 is left out of the JSON, so existing keys stay.
    clip_x0: clip every data estimate to [-clip_x0, clip_x0] (DDIM's `clip_sample` with `clip_sample_range`); a
        first-order data step then combines the clipped x0 with the model's own ε, as diffusers' DDIM does. None
        (left out of the JSON) for no clipping, the latent pipelines' setting.
    """

    timesteps: tuple[float, ...]
    steps: tuple[SolverStep, ...]
    final_timestep: float | None = None
    first_step: FirstStep = "model"
    dc_order: int = 2
    network_timesteps: tuple[float, ...] | None = None
    noise_scale: float = 1.0
    clip_x0: float | None = None

    def __post_init__(self) -> None:
        # 999 and 999.0 are one timestep: integers become floats, so they share a content key (anything else is
        # left for `validate` to name)
        object.__setattr__(self, "timesteps", tuple(float(t) if _is_int(t) else t for t in self.timesteps))
        if _is_int(self.final_timestep):
            object.__setattr__(self, "final_timestep", float(self.final_timestep))
        if self.network_timesteps is not None:
            network = tuple(float(t) if _is_int(t) else t for t in self.network_timesteps)
            object.__setattr__(self, "network_timesteps", None if network == self.timesteps else network)

    def network_time(self, index: int) -> float:
        """The time the network is called with at step `index`."""
        return (self.network_timesteps or self.timesteps)[index]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def nfe(self) -> int:
        """Model evaluations per sample (a CFG pair counts once, as in the papers): one per step, minus the AFS."""
        return self.num_steps - (1 if self.first_step == "zero_x0" else 0)

    def validate(self, num_train_timesteps: int | None = None, prefix: str = "solver", *,
                 max_timestep: float | None = None) -> SolverPlan:
        """Raise ScheduleError naming the first bad field; return self so calls chain. Timesteps must lie in
        [0, max_timestep]: by default num_train_timesteps - 1 (the last DDPM step); rectified flow's pure-noise end
        t = T (σ = 1), where FlowMatch Euler starts, is allowed by passing max_timestep = T."""
        ts = self.timesteps
        if len(ts) == 0:
            raise ScheduleError(f"{prefix}.timesteps", "is empty", "give at least one timestep")
        if len(self.steps) != len(ts):
            raise ScheduleError(
                f"{prefix}.steps",
                f"has {len(self.steps)} entries but timesteps has {len(ts)}",
                "give exactly one step per timestep",
            )
        for i, t in enumerate(ts):
            if not isinstance(t, (int, float)) or not math.isfinite(t):
                raise ScheduleError(f"{prefix}.timesteps[{i}]", f"{t!r} is not a finite number")
            if i and not t < ts[i - 1]:
                raise ScheduleError(
                    f"{prefix}.timesteps[{i}]",
                    f"{t} does not decrease from timesteps[{i - 1}] = {ts[i - 1]}",
                    "timesteps must be strictly decreasing (noisy to clean)",
                )
        top = max_timestep if max_timestep is not None else (
            None if num_train_timesteps is None else num_train_timesteps - 1)
        if top is not None and (ts[0] > top or ts[-1] < 0):
            raise ScheduleError(
                f"{prefix}.timesteps",
                f"spans [{ts[-1]}, {ts[0]}], outside the model's [0, {top:g}]",
                "rescale the timesteps to this model's training range",
            )
        self._validate_network_timesteps(prefix, top)
        if (not isinstance(self.noise_scale, (int, float)) or isinstance(self.noise_scale, bool)
                or not 0.5 <= self.noise_scale <= 1.5):
            raise ScheduleError(f"{prefix}.noise_scale", f"{self.noise_scale!r} is not a number in [0.5, 1.5]",
                                "it only matches a scheduler's starting scale; leave it out for 1.0")
        clip = self.clip_x0
        if clip is not None and (not isinstance(clip, (int, float)) or isinstance(clip, bool)
                                 or not math.isfinite(clip) or clip <= 0):
            raise ScheduleError(f"{prefix}.clip_x0", f"{clip!r} is not a finite number > 0",
                                "DDIM's clip_sample_range (1.0 for images in [-1, 1]), or leave it out")
        if self.final_timestep is not None and (not isinstance(self.final_timestep, float)
                                                or not 0 <= self.final_timestep < ts[-1]):
            raise ScheduleError(
                f"{prefix}.final_timestep",
                f"{self.final_timestep} must lie in [0, timesteps[-1] = {ts[-1]})",
                "or use null to denoise to σ = 0",
            )
        if self.first_step not in FIRST_STEP_CHOICES:
            raise ScheduleError(
                f"{prefix}.first_step", f"unknown {self.first_step!r}", f"use one of {FIRST_STEP_CHOICES}"
            )
        if not _is_int(self.dc_order) or self.dc_order not in (1, 2, 3):
            raise ScheduleError(f"{prefix}.dc_order", f"{self.dc_order!r} is not 1, 2 or 3")
        for i, step in enumerate(self.steps):
            where = f"{prefix}.steps[{i}]"
            if not isinstance(step.order, int) or isinstance(step.order, bool) or not 1 <= step.order <= MAX_ORDER:
                raise ScheduleError(f"{where}.order", f"{step.order!r} is not an integer from 1 to {MAX_ORDER}")
            if step.order > i + 1:
                raise ScheduleError(
                    f"{where}.order",
                    f"{step.order} needs {step.order} model outputs but only {i + 1} exist at step {i}",
                    f"use order ≤ {i + 1} here (multistep warm-up)",
                )
            if step.prediction not in PREDICTIONS:
                raise ScheduleError(f"{where}.prediction", f"unknown {step.prediction!r}", f"use one of {PREDICTIONS}")
            if step.rule not in RULES:
                raise ScheduleError(f"{where}.rule", f"unknown {step.rule!r}", f"use one of {RULES}")
            if not isinstance(step.corrector, bool):
                raise ScheduleError(f"{where}.corrector", f"{step.corrector!r} is not true/false")
            if step.corrector and i == len(ts) - 1:
                raise ScheduleError(
                    f"{where}.corrector",
                    "the last step has no later model evaluation to correct with",
                    "set corrector false on the last step",
                )
            if not isinstance(step.dc_ratio, (int, float)) or not math.isfinite(step.dc_ratio):
                raise ScheduleError(f"{where}.dc_ratio", f"{step.dc_ratio!r} is not a finite number")
            lo, hi = DC_RATIO_RANGE
            if not lo <= step.dc_ratio <= hi:
                raise ScheduleError(f"{where}.dc_ratio", f"{step.dc_ratio!r} is outside [{lo}, {hi}]",
                                    "DC-Solver's fitted ratios lie near 1 (0.92-1.38 on the builtin model); "
                                    "use 1.0 for no compensation")
            if step.dc_ratio != 1.0 and i < self.dc_order:
                raise ScheduleError(
                    f"{where}.dc_ratio",
                    f"compensation needs {self.dc_order + 1} model outputs, step {i} has {i + 1}",
                    "keep dc_ratio 1.0 on the warm-up steps",
                )
        if self.final_timestep is None and self.steps[-1].order != 1:
            raise ScheduleError(
                f"{prefix}.steps[{len(ts) - 1}].order",
                "the final step to σ = 0 must be first order (λ is infinite there)",
                "set order 1 on the last step, or set final_timestep",
            )
        return self

    def _validate_network_timesteps(self, prefix: str, top: float | None) -> None:
        network = self.network_timesteps
        if network is None:
            return
        where = f"{prefix}.network_timesteps"
        if not isinstance(network, tuple) or len(network) != len(self.timesteps):
            raise ScheduleError(where, f"must be a list of {len(self.timesteps)} numbers, one per timestep",
                                "or leave it out to call the network at the timesteps themselves")
        for i, (t, n) in enumerate(zip(self.timesteps, network, strict=True)):
            if not isinstance(n, float) or not math.isfinite(n):
                raise ScheduleError(f"{where}[{i}]", f"{n!r} is not a finite number")
            # rounding by one unit of the network's time (shifted σ·T for flow) is up to `shift` units of t
            slack = math.inf if top is None else max(1.5, ROUNDING_SLACK * top)
            if abs(n - t) > slack or n < 0 or (top is not None and n > top):
                raise ScheduleError(f"{where}[{i}]", f"{n} is not timesteps[{i}] = {t} rounded (within {slack:g}, "
                                    "in range)", "it is only the rounding a scheduler applies to the network's time")


@dataclass(frozen=True)
class Schedule:
    """Everything an inference run needs beyond the model: found once, run many times. A run reuses computation
    by a static `cache` plan (decided offline, step by step) or by a runtime `policy` (a rule-based cache that
    decides while it runs), not both."""

    model: str
    solver: SolverPlan
    cache: CachePlan | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    policy: RuntimePolicy | None = None

    def to_dict(self) -> dict[str, Any]:
        # Field by field rather than dataclasses.asdict: `key` runs once per candidate and asdict's deep copy was
        # most of a study's bookkeeping time.
        plan = self.solver
        solver = {name: getattr(plan, name) for name in _PLAN_FIELD_ORDER}
        solver["timesteps"] = list(plan.timesteps)
        if plan.network_timesteps is None:  # absent rather than null: keys of plans without it stay as they were
            del solver["network_timesteps"]
        else:
            solver["network_timesteps"] = list(plan.network_timesteps)
        if plan.noise_scale == 1.0:  # likewise
            del solver["noise_scale"]
        if plan.clip_x0 is None:
            del solver["clip_x0"]
        solver["steps"] = [{name: getattr(s, name) for name in _STEP_FIELD_ORDER} for s in plan.steps]
        data = {"format": FORMAT, "model": self.model, "solver": solver}
        if self.cache is not None:
            data["cache"] = self.cache.to_dict()
        if self.policy is not None:  # absent otherwise: keys of schedules without one stay as they were
            data["policy"] = self.policy.to_dict()
        data["meta"] = dict(self.meta)
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @property
    def key(self) -> str:
        """Stable content hash: two schedules that run identically share a key (meta is ignored)."""
        content = self.to_dict()
        content.pop("meta")
        blob = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self, num_train_timesteps: int | None = None, *, max_timestep: float | None = None) -> Schedule:
        self.solver.validate(num_train_timesteps, max_timestep=max_timestep)
        if self.cache is not None:
            first = 1 if self.solver.first_step == "zero_x0" else 0
            self.cache.validate(self.solver.num_steps, first_evaluated_step=first)
        if self.policy is not None:
            self.policy.validate()
            if self.cache is not None:
                raise ScheduleError("policy", "a schedule has a static cache plan or a runtime policy, not both",
                                    "drop one of them")
        return self

    @staticmethod
    def from_dict(data: Any) -> Schedule:
        if not isinstance(data, dict):
            raise ScheduleError("(top level)", f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ScheduleError(
                "format", f"{data.get('format')!r} is not {FORMAT!r}", "is this a schedsearch schedule?"
            )
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise ScheduleError("model", "missing or not a string", 'name the model, e.g. "builtin:mnist-dit"')
        solver = data.get("solver")
        if not isinstance(solver, dict):
            raise ScheduleError("solver", "missing or not an object")
        cache = cache_plan_from_dict(data["cache"]) if data.get("cache") is not None else None
        policy = policy_from_dict(data["policy"]) if data.get("policy") is not None else None
        meta = dict(data.get("meta") or {})
        return Schedule(model=model, solver=_solver_from_dict(solver), cache=cache, meta=meta,
                        policy=policy).validate()

    @staticmethod
    def from_json(text: str, source: str = "(file)") -> Schedule:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScheduleError(source, f"not valid JSON ({exc})") from exc
        except RecursionError as exc:
            raise ScheduleError(source, "is nested too deeply to be a schedule",
                                "give a schedule .json file") from exc
        return Schedule.from_dict(data)


_STEP_FIELDS = {f for f in SolverStep.__dataclass_fields__}
_STEP_FIELD_ORDER = tuple(f.name for f in fields(SolverStep))
_PLAN_FIELD_ORDER = tuple(f.name for f in fields(SolverPlan))
_PLAN_FIELDS = {f for f in SolverPlan.__dataclass_fields__}


def _solver_from_dict(data: dict[str, Any]) -> SolverPlan:
    unknown = set(data) - _PLAN_FIELDS
    if unknown:
        raise ScheduleError(f"solver.{sorted(unknown)[0]}", "is not a solver field", f"known: {sorted(_PLAN_FIELDS)}")
    for name in ("timesteps", "steps"):
        if not isinstance(data.get(name), list):
            raise ScheduleError(f"solver.{name}", "missing or not a list")
    steps = []
    for i, step in enumerate(data["steps"]):
        if not isinstance(step, dict):
            raise ScheduleError(f"solver.steps[{i}]", "is not an object")
        bad = set(step) - _STEP_FIELDS
        if bad:
            raise ScheduleError(
                f"solver.steps[{i}].{sorted(bad)[0]}", "is not a step field", f"known: {sorted(_STEP_FIELDS)}"
            )
        steps.append(SolverStep(**step))
    fields = {k: v for k, v in data.items() if k not in ("timesteps", "steps")}
    if isinstance(fields.get("network_timesteps"), list):
        fields["network_timesteps"] = tuple(fields["network_timesteps"])
    return SolverPlan(timesteps=tuple(data["timesteps"]), steps=tuple(steps), **fields)


MAX_SCHEDULE_BYTES = 16 * 2**20  # a 1000-step schedule of a 100-block model is well under 1 MB


def load_schedule(path: str | Path) -> Schedule:
    """Read and validate a schedule file; errors name the file or the field."""
    path = Path(path)
    if path.is_dir():
        raise ScheduleError(str(path), "is a directory", "give a schedule .json file")
    if not path.is_file():
        raise ScheduleError(str(path), "no such file", "check the path")
    try:
        if path.stat().st_size > MAX_SCHEDULE_BYTES:
            raise ScheduleError(str(path), f"is larger than {MAX_SCHEDULE_BYTES // 2**20} MB",
                                "a schedule file is a few kB")
        raw = path.read_bytes()
    except OSError as exc:
        raise ScheduleError(str(path), f"cannot be read ({exc.strerror})", "check its permissions") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScheduleError(str(path), "is not UTF-8 text (a binary file?)", "give a schedule .json file") from exc
    return Schedule.from_json(text, str(path))


def save_schedule(schedule: Schedule, path: str | Path) -> Path:
    """Write atomically: a killed export leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(schedule.to_json())
    tmp.replace(path)
    return path
