"""DC-Solver calibration (Zhao et al., ECCV 2024): fitting the dynamic-compensation ratios (§3.3) along a teacher
trajectory, and the cascade polynomial regression (CPR, §3.4) that predicts ratios for unseen (NFE, guidance).

Fitting (§3.3, "searching the compensation ratios"): a fine teacher (DDIM, 200 steps by default) runs from the same
initial noise as the student and passes through every student timestep exactly. The student, UniPC bh2 order 2 with
corrector, is then walked step by step; at step i ≥ dc_order the ratio r_i is optimised with AdamW (lr 0.1) to
minimise ‖x_{i+1}(r_i) - x^teacher_{t_{i+1}}‖², where x_{i+1} is the solver's *corrected* state at t_{i+1}: it depends
on r_i through the compensated output used by the predictor and the corrector (eq. 11-12) and through the model
evaluated at the predicted point (UniC, which the reference code also differentiates through). r_i is then frozen and
the walk continues from the state the fitted plan produces, so the fitted trajectory is exactly `sample()`'s.

CPR (§3.4): r(x) = Σ_{k=0..3} c_k x^k with x = (step + 1) / NFE (1-based step, as the reference code); each c_k is
quadratic in g = guidance / 12 and each of those coefficients quadratic in n = NFE / 50: 4 × 3 × 3 = 36 coefficients,
fitted here by linear least squares (the model is linear in them).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from schedsearch.runtime.models import LoadedModel, initial_noise, load_model
from schedsearch.runtime.noise import log_snr, to_data_and_noise
from schedsearch.runtime.sampler import _Output, corrector_step, dynamic_compensation, predictor_step, sample
from schedsearch.spaces.baselines import ddim_plan, dpm_solver_plan, linspace_timesteps, unipc_plan, with_dc_ratios
from schedsearch.spaces.schedule import Schedule, SolverPlan

__all__ = [
    "CascadeLooReport",
    "CascadeRegression",
    "FittedRatios",
    "TeacherSpec",
    "TeacherTrajectory",
    "cascade_leave_one_out",
    "dc_schedule",
    "fit_dc_ratios",
    "student_plan",
    "teacher_timesteps",
    "teacher_trajectory",
]

TeacherSolver = Literal["ddim", "dpmsolver++"]
Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]
CASCADE_FORMAT = "schedsearch.dc_cascade/v1"
GUIDANCE_SCALE, NFE_SCALE = 12.0, 50.0  # §3.4 normalisation of CFG and NFE


# --------------------------------------------------------------------------------------------------- teacher


@dataclass(frozen=True)
class TeacherSpec:
    """The fine reference sampler: DDIM (the paper: 200-999 steps) or DPM-Solver++(2M)."""

    solver: TeacherSolver = "ddim"
    steps: int = 200


def teacher_timesteps(spec: TeacherSpec, required: Sequence[float]) -> tuple[float, ...]:
    """A fine grid from max(required) down to t = 0 with ~`spec.steps` steps that contains every `required` time
    exactly (grid points closer than half a spacing to a required time are dropped: no tiny steps)."""
    required = sorted({float(t) for t in required}, reverse=True)
    if not required or required[-1] < 0:
        raise ValueError(f"required: {required!r} must be non-empty model times ≥ 0")
    start = required[0]
    spacing = start / max(spec.steps - 1, 1)
    fine = np.linspace(start, 0.0, max(spec.steps, 2))
    req = np.asarray(required)
    keep = [float(t) for t in fine if np.min(np.abs(req - t)) >= 0.5 * spacing]
    return tuple(sorted({*required, *keep}, reverse=True))


@dataclass(frozen=True, eq=False)
class TeacherTrajectory:
    """Teacher states x_t (batch of calibration samples) at the recorded model times; `final` is the σ = 0 sample."""

    spec: TeacherSpec
    guidance: float
    classes: tuple[int, ...]
    seeds: tuple[int, ...]
    timesteps: tuple[float, ...]  # the teacher's own grid
    states: Mapping[float, torch.Tensor]
    final: torch.Tensor

    def state_at(self, t: float | None) -> torch.Tensor:
        """Teacher state at model time t (None: the final, σ = 0 sample)."""
        if t is None:
            return self.final
        if float(t) not in self.states:
            raise KeyError(f"t: {t} was not recorded; the teacher recorded {sorted(self.states, reverse=True)}")
        return self.states[float(t)]


def teacher_trajectory(
    model: LoadedModel,
    *,
    guidance: float,
    classes: Sequence[int],
    seeds: Sequence[int],
    record: Sequence[float],
    spec: TeacherSpec = TeacherSpec(),
) -> TeacherTrajectory:
    """Run the teacher from the seeded initial noise through every time in `record` (the student plans' timesteps;
    they must share their first timestep, where both start) and keep the states there."""
    grid = teacher_timesteps(spec, record)
    if spec.solver == "ddim":
        plan = ddim_plan(grid)
    elif spec.solver == "dpmsolver++":
        plan = dpm_solver_plan(grid, order=2)
    else:
        raise ValueError(f"spec.solver: unknown {spec.solver!r}; use 'ddim' or 'dpmsolver++'")
    wanted = {float(t) for t in record}
    states: dict[float, torch.Tensor] = {}
    x = initial_noise(seeds, model.info.sample_shape)
    if grid[0] in wanted:
        states[grid[0]] = x.clone()

    def keep(i: int, state: torch.Tensor) -> None:
        if i + 1 < len(grid) and grid[i + 1] in wanted:
            states[grid[i + 1]] = state.clone()

    denoise = model.denoiser(list(classes), guidance)
    final = sample(denoise, x, plan, model.noise_schedule, model.info.prediction_type, callback=keep)
    return TeacherTrajectory(
        spec, float(guidance), tuple(int(c) for c in classes), tuple(int(s) for s in seeds), grid, states, final
    )


# --------------------------------------------------------------------------------------------------- fitting


def student_plan(num_train_timesteps: int, nfe: int) -> SolverPlan:
    """DC-Solver's base solver: UniPC bh2, order 2, corrector on (diffusers' linspace timesteps, to σ = 0)."""
    return unipc_plan(linspace_timesteps(num_train_timesteps, nfe), order=2, rule="bh2")


@dataclass(frozen=True)
class FittedRatios:
    """Ratios fitted for one (NFE, guidance); MSEs are of the final sample to the teacher's, on the fitting set."""

    nfe: int
    guidance: float
    ratios: tuple[float, ...]
    mse_before: float = math.nan  # all ratios 1 (plain UniPC)
    mse_after: float = math.nan  # fitted ratios
    step_mse: tuple[float, ...] = ()  # per step: the fitted loss to the teacher state at that step's end (nan: warm-up)
    teacher: TeacherSpec | None = None
    num_samples: int = 0
    dc_order: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> FittedRatios:
        data = dict(data)
        teacher = data.pop("teacher", None)
        return FittedRatios(
            nfe=int(data.pop("nfe")),
            guidance=float(data.pop("guidance")),
            ratios=tuple(float(r) for r in data.pop("ratios")),
            step_mse=tuple(float(v) for v in data.pop("step_mse", ())),
            teacher=TeacherSpec(**teacher) if teacher else None,
            **data,
        )


@dataclass(frozen=True, eq=False)
class _StepContext:
    """Everything the loss of step i needs besides r_i; the model outputs in `history` are cached (fixed in r_i)."""

    x: torch.Tensor  # corrected state at t_i
    history: list[_Output]  # newest = raw output at t_i
    plan: SolverPlan
    index: int
    alpha_sigma_s: tuple[float, float]
    alpha_sigma_t: tuple[float, float]
    target: torch.Tensor
    denoise: Denoiser
    prediction_type: str


def _step_state(ctx: _StepContext, ratio: float | torch.Tensor) -> torch.Tensor:
    """The solver's state at the end of step i for compensation ratio r_i: the UniC-corrected point when the step has
    a corrector (the model output at the predicted point depends on r_i and is re-evaluated), else the predictor's."""
    step = ctx.plan.steps[ctx.index]
    compensated = dynamic_compensation(ctx.history, ratio, ctx.plan.dc_order)
    history = [*ctx.history[:-1], compensated]
    x_pred = predictor_step(ctx.x, history, ctx.alpha_sigma_s, ctx.alpha_sigma_t, step)
    if not step.corrector:
        return x_pred
    t_next = ctx.plan.timesteps[ctx.index + 1]
    a, s = ctx.alpha_sigma_t
    out = ctx.denoise(x_pred, ctx.plan.network_time(ctx.index + 1), ctx.index + 1).to(x_pred.dtype)
    x0, eps = to_data_and_noise(out, x_pred, a, s, ctx.prediction_type)
    current = _Output(t=t_next, lam=log_snr(a, s), x0=x0, eps=eps)
    return corrector_step(ctx.x, history, current, ctx.alpha_sigma_s, ctx.alpha_sigma_t, step)


def _step_loss(ctx: _StepContext, ratio: float | torch.Tensor) -> torch.Tensor:
    return (_step_state(ctx, ratio) - ctx.target).square().mean()


def _loss_and_grad(ctx: _StepContext, ratio: float, mode: list[str]) -> tuple[float, float]:
    """Loss and exact d loss / d r by forward-mode AD (r is a scalar: one dual pass, also through the network, whose
    denoiser runs under no_grad, which forward AD ignores; SDPA is forced to its math kernel, which supports it).
    Falls back to a central difference for models with ops lacking forward-AD formulas (`mode[0]` records it)."""
    if mode[0] == "forward_ad":
        try:
            with fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH):
                r = fwAD.make_dual(torch.tensor(ratio, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
                primal, tangent = fwAD.unpack_dual(_step_loss(ctx, r))
            return float(primal), 0.0 if tangent is None else float(tangent)
        except (NotImplementedError, RuntimeError) as exc:
            warnings.warn(f"dc_fit: forward-mode AD failed ({exc}); using central differences", stacklevel=2)
            mode[0] = "central_difference"
    h = 1e-3
    with torch.no_grad():
        up, down = float(_step_loss(ctx, ratio + h)), float(_step_loss(ctx, ratio - h))
        return float(_step_loss(ctx, ratio)), (up - down) / (2 * h)


def _fit_ratio(ctx: _StepContext, iterations: int, lr: float, mode: list[str]) -> tuple[float, float]:
    """AdamW on r_i from 1 (§3.3: lr 0.1, ~20 iterations); returns the best evaluated (ratio, loss), so a step never
    ends worse than uncompensated on its own loss (Adam at a fixed lr oscillates around the minimum)."""
    param = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    optimizer = torch.optim.AdamW([param], lr=lr)
    best_ratio, best_loss = 1.0, math.inf
    for _ in range(iterations):
        ratio = float(param.detach())
        loss, grad = _loss_and_grad(ctx, ratio, mode)
        if loss < best_loss:
            best_ratio, best_loss = ratio, loss
        optimizer.zero_grad()
        param.grad = torch.tensor([grad], dtype=torch.float64)
        optimizer.step()
    with torch.no_grad():
        last = float(param.detach())
        loss = float(_step_loss(ctx, last))
    if loss < best_loss:
        best_ratio, best_loss = last, loss
    return best_ratio, best_loss


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().mean())


def fit_dc_ratios(
    model: LoadedModel | str,
    *,
    nfe: int,
    guidance: float,
    classes: Sequence[int],
    seeds: Sequence[int],
    teacher_steps: int = 200,
    teacher_solver: TeacherSolver = "ddim",
    iterations: int = 20,
    lr: float = 0.1,
    plan: SolverPlan | None = None,
    teacher: TeacherTrajectory | None = None,
    progress: bool = True,
) -> FittedRatios:
    """Greedy per-step fit of DC-Solver's compensation ratios (§3.3) for UniPC bh2-2 at `nfe` steps.

    `teacher` reuses a trajectory recorded by `teacher_trajectory` (it must cover this plan's timesteps, classes,
    seeds and guidance); otherwise one is run with `teacher_solver` × `teacher_steps`. `plan` overrides the student.
    """
    if isinstance(model, str):
        model = load_model(model)
    plan = (plan or student_plan(model.info.num_train_timesteps, nfe)).validate(model.info.num_train_timesteps)
    if plan.first_step != "model":
        raise ValueError("plan.first_step: only 'model' is supported by the fit")
    if len(classes) != len(seeds):
        raise ValueError(f"classes/seeds: {len(classes)} classes for {len(seeds)} seeds")
    spec = TeacherSpec(teacher_solver, teacher_steps)
    if teacher is None:
        teacher = teacher_trajectory(
            model, guidance=guidance, classes=classes, seeds=seeds, record=plan.timesteps, spec=spec
        )
    elif (teacher.classes, teacher.seeds, teacher.guidance) != (tuple(classes), tuple(seeds), float(guidance)):
        raise ValueError("teacher: recorded for other classes, seeds or guidance than this fit")
    if teacher.timesteps[0] != plan.timesteps[0]:
        raise ValueError(f"teacher: starts at t = {teacher.timesteps[0]}, the plan at t = {plan.timesteps[0]}")
    schedule, ptype = model.noise_schedule, model.info.prediction_type
    denoise = model.denoiser(list(classes), guidance)
    x_start = initial_noise(seeds, model.info.sample_shape)
    mse_before = _mse(sample(denoise, x_start, plan, schedule, ptype), teacher.final)

    ts = plan.timesteps
    targets: list[float | None] = [*ts[1:], plan.final_timestep]
    ratios: list[float] = []
    step_mse: list[float] = []
    mode = ["forward_ad"]
    history: list[_Output] = []
    x, x_before = x_start, None
    steps = range(len(ts))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"dc-fit nfe={nfe} cfg={guidance:g}", leave=False)
    for i in steps:  # mirrors sampler.sample, with r_i fitted before the predictor of step i
        t = ts[i]
        a, s = schedule.alpha_sigma(t)
        x0, eps = to_data_and_noise(denoise(x, plan.network_time(i), i).to(x.dtype), x, a, s, ptype)
        current = _Output(t=t, lam=log_snr(a, s), x0=x0, eps=eps)
        if i > 0 and plan.steps[i - 1].corrector:
            x = corrector_step(x_before, history, current, schedule.alpha_sigma(ts[i - 1]), (a, s), plan.steps[i - 1])
        history.append(current)
        ratio, loss = 1.0, math.nan
        if i >= plan.dc_order:
            end = schedule.alpha_sigma(targets[i])
            ctx = _StepContext(x, list(history), plan, i, (a, s), end, teacher.state_at(targets[i]), denoise, ptype)
            ratio, loss = _fit_ratio(ctx, iterations, lr, mode)
            if progress:
                steps.set_postfix(r=f"{ratio:.3f}", mse=f"{loss:.2e}")
        ratios.append(ratio)
        step_mse.append(loss)
        if ratio != 1.0:
            history[-1] = dynamic_compensation(history, ratio, plan.dc_order)
        x_before = x
        x = predictor_step(x, history, (a, s), schedule.alpha_sigma(targets[i]), plan.steps[i])
        del history[: -max(plan.dc_order + 1, 3)]
    return FittedRatios(
        nfe=plan.num_steps,
        guidance=float(guidance),
        ratios=tuple(ratios),
        mse_before=mse_before,
        mse_after=_mse(x, teacher.final),
        step_mse=tuple(step_mse),
        teacher=teacher.spec,
        num_samples=len(seeds),
        dc_order=plan.dc_order,
    )


def dc_schedule(model_name: str, plan: SolverPlan, ratios: Sequence[float] | FittedRatios) -> Schedule:
    """The plan with DC-Solver ratios as a runnable, exportable `Schedule`."""
    values = ratios.ratios if isinstance(ratios, FittedRatios) else tuple(ratios)
    return Schedule(model=model_name, solver=with_dc_ratios(plan, values), meta={"method": "dc-solver"}).validate()


# -------------------------------------------------------------------------------- cascade polynomial regression


def _features(nfe: int, guidance: float, steps: Sequence[int]) -> np.ndarray:
    """Rows x^k g^j n^l, flattened in (k, j, l) order, for x = (step + 1) / nfe, g = guidance / 12, n = nfe / 50."""
    x = (np.asarray(steps, dtype=np.float64) + 1.0) / nfe
    g, n = guidance / GUIDANCE_SCALE, nfe / NFE_SCALE
    xk = x[:, None] ** np.arange(4)
    gj_nl = np.outer(g ** np.arange(3), n ** np.arange(3)).ravel()
    return (xk[:, :, None] * gj_nl[None, None, :]).reshape(len(x), 36)


@dataclass(frozen=True)
class CascadeRegression:
    """DC-Solver's CPR (§3.4). coefficients[k][j][l] multiplies x^k (guidance/12)^j (NFE/50)^l; steps below
    `warmup` (= dc_order) are 1 and are not fitted."""

    coefficients: tuple[tuple[tuple[float, ...], ...], ...]
    warmup: int = 2
    fitted_on: tuple[tuple[int, float], ...] = field(default=(), compare=False)

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.coefficients, dtype=np.float64)

    @staticmethod
    def from_array(
        coefficients: np.ndarray, warmup: int = 2, fitted_on: Sequence[tuple[int, float]] = ()
    ) -> CascadeRegression:
        c = np.asarray(coefficients, dtype=np.float64).reshape(4, 3, 3)
        nested = tuple(tuple(tuple(float(v) for v in row) for row in block) for block in c)
        return CascadeRegression(nested, warmup, tuple((int(n), float(g)) for n, g in fitted_on))

    @staticmethod
    def fit(fits: Sequence[FittedRatios], warmup: int | None = None) -> CascadeRegression:
        """Least squares over every non-warm-up ratio of every fitted (NFE, guidance) set (columns scaled to unit
        norm for conditioning; minimum-norm solution if the grid does not determine all 36 coefficients)."""
        if not fits:
            raise ValueError("fits: need at least one FittedRatios")
        warmup = fits[0].dc_order if warmup is None else warmup
        rows, values = [], []
        for f in fits:
            steps = list(range(warmup, f.nfe))
            rows.append(_features(f.nfe, f.guidance, steps))
            values.append(np.asarray(f.ratios, dtype=np.float64)[warmup:])
        a, b = np.concatenate(rows), np.concatenate(values)
        scale = np.linalg.norm(a, axis=0)
        scale[scale == 0] = 1.0
        solution, *_ = np.linalg.lstsq(a / scale, b, rcond=None)
        return CascadeRegression.from_array(solution / scale, warmup, [(f.nfe, f.guidance) for f in fits])

    def predict(self, nfe: int, guidance: float) -> tuple[float, ...]:
        """Ratios for every step of an `nfe`-step plan at this guidance (warm-up steps exactly 1)."""
        fitted = _features(nfe, guidance, range(self.warmup, nfe)) @ self.array.ravel()
        return (1.0,) * min(self.warmup, nfe) + tuple(float(r) for r in fitted)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": CASCADE_FORMAT,
                "variables": {
                    "x": "(step + 1) / nfe",
                    "g": f"guidance / {GUIDANCE_SCALE:g}",
                    "n": f"nfe / {NFE_SCALE:g}",
                },
                "coefficients_kjl": self.array.tolist(),
                "warmup": self.warmup,
                "fitted_on": [list(p) for p in self.fitted_on],
            },
            indent=2,
        )

    @staticmethod
    def from_json(text: str) -> CascadeRegression:
        data = json.loads(text)
        if data.get("format") != CASCADE_FORMAT:
            raise ValueError(f"format: {data.get('format')!r} is not {CASCADE_FORMAT!r}")
        return CascadeRegression.from_array(
            np.asarray(data["coefficients_kjl"]), int(data["warmup"]), [tuple(p) for p in data.get("fitted_on", [])]
        )

    def save(self, path: str | Path) -> Path:
        from schedsearch.results.atomic import atomic_write_text

        return atomic_write_text(path, self.to_json())

    @staticmethod
    def load(path: str | Path) -> CascadeRegression:
        return CascadeRegression.from_json(Path(path).read_text())


@dataclass(frozen=True)
class CascadeLooReport:
    """Leave-one-out over the fitted grid: MSE between CPR-predicted and fitted ratios (non-warm-up steps) of each
    held-out (NFE, guidance), and the same for the trivial prediction r = 1."""

    held_out: tuple[tuple[int, float], ...]
    mse: tuple[float, ...]
    mse_ones: tuple[float, ...]
    predicted: tuple[tuple[float, ...], ...]

    @property
    def mean_mse(self) -> float:
        return float(np.mean(self.mse))

    @property
    def mean_mse_ones(self) -> float:
        return float(np.mean(self.mse_ones))


def cascade_leave_one_out(fits: Sequence[FittedRatios]) -> CascadeLooReport:
    """Fit the CPR on all sets but one, predict the held-out set's ratios; repeat for every set."""
    held, mse, ones, predicted = [], [], [], []
    for i, f in enumerate(fits):
        cpr = CascadeRegression.fit([g for j, g in enumerate(fits) if j != i], warmup=f.dc_order)
        pred = cpr.predict(f.nfe, f.guidance)
        truth = np.asarray(f.ratios[f.dc_order :])
        held.append((f.nfe, f.guidance))
        mse.append(float(np.mean((np.asarray(pred[f.dc_order :]) - truth) ** 2)))
        ones.append(float(np.mean((1.0 - truth) ** 2)))
        predicted.append(pred)
    return CascadeLooReport(tuple(held), tuple(mse), tuple(ones), tuple(predicted))
