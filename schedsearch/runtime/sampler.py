"""The unified sampler: one loop whose every step is described by a `SolverPlan` (S³ / USF, Liu et al. ICLR 2024).

Per step it evaluates the model once (CFG pair included), optionally corrects the previous step with UniC, optionally
applies DC-Solver's dynamic compensation, then takes a UniP-p predictor step in data or noise form. With the plans of
`spaces.baselines` this reproduces diffusers' DDIM, DPM-Solver(++) multistep and UniPC (bh1/bh2) to float precision.

Notation follows UniPC (Zhao et al. 2023, Alg. 1-2 and eq. 5-8): h = λ_t - λ_s, hh = -h for the data prediction
(x0) and +h for the noise prediction, r_k = (λ_{s_k} - λ_s) / h, D_k = (m_k - m_0) / r_k, and the B(h) choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from schedsearch.runtime.noise import NoiseSchedule, log_snr, to_data_and_noise
from schedsearch.spaces.schedule import SolverPlan, SolverStep

# denoise(x, t, step_index) -> raw model output (guidance already applied)
Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]


@dataclass(frozen=True, eq=False)
class _Output:
    """A model evaluation: where (t, λ) and what (data and noise estimates)."""

    t: float
    lam: float
    x0: torch.Tensor
    eps: torch.Tensor
    clipped: bool = False  # x0 clipped to the plan's clip_x0 range; eps left as the model gave it (DDIM's clip_sample)

    def value(self, prediction: str) -> torch.Tensor:
        return self.x0 if prediction == "data" else self.eps


def _uni_coefficients(hh: float, rks: list[float], order: int, rule: str) -> tuple[float, np.ndarray, np.ndarray]:
    """B(h) and the (order × order) system R ρ = b of UniPC eq. 6 (rks includes the final 1).

    The "dpmsolver" rule has no B(h) of its own; where it reaches UniPC code (order 2, correctors) it is bh2."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    b_value = hh if rule == "bh1" else h_phi_1
    rows, rhs = [], []
    r = np.asarray(rks, dtype=np.float64)
    for i in range(1, order + 1):
        rows.append(r ** (i - 1))
        rhs.append(h_phi_k * factorial / b_value)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return b_value, np.stack(rows), np.asarray(rhs)


def _history_terms(
    history: list[_Output], lam_s: float, h: float, order: int, prediction: str
) -> tuple[list[float], list[torch.Tensor]]:
    """r_k and D_k for the order-1 older outputs (newest older output first)."""
    m0 = history[-1].value(prediction)
    rks, diffs = [], []
    for k in range(1, order):
        older = history[-1 - k]
        rk = (older.lam - lam_s) / h
        rks.append(rk)
        diffs.append((older.value(prediction) - m0) / rk)
    return rks, diffs


def _finite_terms(rks: list[float], diffs: list[torch.Tensor]) -> tuple[list[float], list[torch.Tensor], bool]:
    """The history terms without the points at λ = −∞ (pure noise, α = 0: zero terminal SNR, where CogVideoX's
    DDIM starts), and whether any was dropped. There r_k = −∞, so D_k = 0 and, in the limit of R ρ = b, ρ_k = 0:
    the step is the one of the remaining points with ρ solved from their system (not the fixed ρ = 1/2 UniPC uses
    for its own order 2, which is a convention of that order, not this limit). Without the drop the solve is NaN."""
    keep = [k for k, r in enumerate(rks) if math.isfinite(r)]
    if len(keep) == len(rks):
        return rks, diffs, False
    return [rks[k] for k in keep], [diffs[k] for k in keep], True


def _from_pure_noise(newest: _Output, a_t: float, s_t: float) -> torch.Tensor:
    """A step from α_s = 0 (λ_s = −∞) to (α_t, σ_t): the limit of every order and of both forms is the DDIM step
    α_t·x0 + σ_t·ε of the newest output (e^{−h} = 0); the noise form's own expression is ∞·0 there. CogVideoX's
    DDIM takes exactly this first step (x0 = −v, ε = x at ᾱ = 0)."""
    return a_t * newest.x0 + s_t * newest.eps


def _base_step(
    x: torch.Tensor, m0: torch.Tensor, a_s: float, s_s: float, a_t: float, s_t: float, hh: float, data: bool
) -> torch.Tensor:
    """First-order exponential-integrator step (DDIM): UniPC's x_t_ term."""
    if data:
        return (s_t / s_s) * x - (a_t * math.expm1(hh)) * m0
    return (a_t / a_s) * x - (s_t * math.expm1(hh)) * m0


def predictor_step(
    x: torch.Tensor,
    history: list[_Output],
    alpha_sigma_s: tuple[float, float],
    alpha_sigma_t: tuple[float, float],
    step: SolverStep,
) -> torch.Tensor:
    """UniP-p (UniPC eq. 5): from the newest output's point s to t. Order 2 uses ρ = 1/2 (with bh2 this is
    DPM-Solver++(2M) midpoint); order ≥ 3 solves R ρ = b, the exponential-integrator Taylor rule."""
    (a_s, s_s), (a_t, s_t) = alpha_sigma_s, alpha_sigma_t
    data = step.prediction == "data"
    newest = history[-1]
    m0 = newest.value(step.prediction)
    if newest.lam == -math.inf:  # from pure noise: only a first step can start there
        return _from_pure_noise(newest, a_t, s_t)
    if s_t == 0.0:  # end point σ = 0: the denoised estimate (order 1 is enforced by SolverPlan.validate)
        return m0 if data else (x - s_s * m0) / a_s
    lam_t = log_snr(a_t, s_t)
    h = lam_t - newest.lam
    hh = -h if data else h
    if step.order == 1 and data and newest.clipped:
        # diffusers' DDIM with clip_sample: the clipped x0 beside the model's own ε (not the ε implied by x0)
        return a_t * m0 + s_t * newest.eps
    x_t = _base_step(x, m0, a_s, s_s, a_t, s_t, hh, data)
    if step.order == 1:
        return x_t
    scale = a_t if data else s_t
    if step.order == 3 and step.rule == "dpmsolver":
        return x_t + _dpmsolver_third_order_terms(history, h, hh, step.prediction, scale)
    rks, diffs = _history_terms(history, newest.lam, h, step.order, step.prediction)
    rks, diffs, limit = _finite_terms(rks, diffs)
    if not rks:
        return x_t
    order = len(rks) + 1
    b_value, rows, rhs = _uni_coefficients(hh, [*rks, 1.0], order, step.rule)
    rhos = [0.5] if order == 2 and not limit else np.linalg.solve(rows[:-1, :-1], rhs[:-1]).tolist()
    residual = sum(rho * d for rho, d in zip(rhos, diffs, strict=True))
    return x_t - (scale * b_value) * residual


def _dpmsolver_third_order_terms(
    history: list[_Output], h: float, hh: float, prediction: str, scale: float
) -> torch.Tensor:
    """The D1/D2 terms of DPM-Solver(++) 3M (Lu et al. 2022b, Alg. 3; diffusers' third-order update), written with
    hh = -h (data) or +h (noise) so one expression serves both forms."""
    m0, m1, m2 = (history[-k].value(prediction) for k in (1, 2, 3))
    r0 = (history[-1].lam - history[-2].lam) / h
    r1 = (history[-2].lam - history[-3].lam) / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi = math.expm1(hh)
    return (scale * (1.0 - phi / hh)) * d1 - (scale * ((phi - hh) / hh**2 - 0.5)) * d2


def corrector_step(
    x_prev: torch.Tensor,
    history: list[_Output],
    current: _Output,
    alpha_sigma_s: tuple[float, float],
    alpha_sigma_t: tuple[float, float],
    step: SolverStep,
) -> torch.Tensor:
    """UniC-p (UniPC eq. 8): recompute the step that produced the current point from `x_prev`, now also using the
    model output at the current point (which the next step needs anyway: no extra NFE)."""
    (a_s, s_s), (a_t, s_t) = alpha_sigma_s, alpha_sigma_t
    data = step.prediction == "data"
    newest = history[-1]
    if newest.lam == -math.inf and (not data or step.rule == "bh1"):
        # from pure noise the correction's coefficient grows without bound in the noise form (e^h − 1) and with
        # bh1's B(h) = h: no limit, so that step stays the predictor's (its exact limit); data-form bh2 keeps UniC
        return _from_pure_noise(newest, a_t, s_t)
    m0 = newest.value(step.prediction)
    h = current.lam - newest.lam
    hh = -h if data else h
    x_t = _base_step(x_prev, m0, a_s, s_s, a_t, s_t, hh, data)
    rks, diffs = _history_terms(history, newest.lam, h, step.order, step.prediction)
    rks, diffs, limit = _finite_terms(rks, diffs)
    order = len(rks) + 1
    b_value, rows, rhs = _uni_coefficients(hh, [*rks, 1.0], order, step.rule)
    rhos = [0.5] if order == 1 and not limit else np.linalg.solve(rows, rhs).tolist()
    residual = sum(rho * d for rho, d in zip(rhos[:-1], diffs, strict=True))
    residual = residual + rhos[-1] * (current.value(step.prediction) - m0)
    return x_t - ((a_t if data else s_t) * b_value) * residual


def dynamic_compensation(history: list[_Output], ratio: float | torch.Tensor, dc_order: int) -> _Output:
    """DC-Solver (Zhao et al. ECCV 2024, eq. 11-12): Lagrange interpolation of the last dc_order + 1 outputs, in model
    time, at τ = t_{i-1} + r (t_i - t_{i-1}); r = 1 returns the newest output.

    `ratio` may be a 0-dim (float64) tensor, also a dual or requires-grad one: the weights become tensors and the
    result is differentiable in r (DC-Solver §3.3 fits r by gradient descent); a float ratio computes as before."""
    points = history[-(dc_order + 1) :]
    t_new, t_old = points[-1].t, points[-2].t
    tau = t_old + ratio * (t_new - t_old)
    weights = []
    for i, p in enumerate(points):
        w = 1.0
        for j, q in enumerate(points):
            if i != j:
                w *= (tau - q.t) / (p.t - q.t)
        weights.append(w)
    x0 = sum(w * p.x0 for w, p in zip(weights, points, strict=True))
    eps = sum(w * p.eps for w, p in zip(weights, points, strict=True))
    return _Output(t=points[-1].t, lam=points[-1].lam, x0=x0, eps=eps)


class PlanRunner:
    """The state `sample` carries between steps (the output history, the state before the last predictor step), so
    a caller that owns the model call, e.g. a diffusers pipeline loop through `runtime.apply.ScheduleScheduler`, runs
    exactly the same step code. Call `step(x, model_output)` once per plan step, in order."""

    def __init__(self, plan: SolverPlan, noise_schedule: NoiseSchedule, prediction_type: str = "epsilon") -> None:
        self.plan = plan.validate()
        self.noise_schedule, self.prediction_type = noise_schedule, prediction_type
        self.targets: list[float | None] = [*plan.timesteps[1:], plan.final_timestep]
        self.history: list[_Output] = []
        self.x_before: torch.Tensor | None = None
        self.step_index = 0

    def fork(self) -> PlanRunner:
        """A runner in the same state that steps on independently (the outputs are immutable and shared; the
        history list is not), so two plans that agree on their first steps can continue from one computed prefix."""
        twin = object.__new__(PlanRunner)
        twin.__dict__.update(self.__dict__)
        twin.history = list(self.history)
        return twin

    def needs_model(self, step_index: int) -> bool:
        """False only for USF's analytical first step, which takes no model output."""
        return not (step_index == 0 and self.plan.first_step == "zero_x0")

    def step(self, x: torch.Tensor, model_output: torch.Tensor | None) -> torch.Tensor:
        """Correct the previous step (UniC) with this output, compensate (DC), predict to the next timestep."""
        i, plan, history, schedule = self.step_index, self.plan, self.history, self.noise_schedule
        if i >= plan.num_steps:
            raise IndexError(f"the plan has {plan.num_steps} steps; step {i} was asked for")
        if (model_output is None) == self.needs_model(i):
            raise ValueError(
                f"step {i}: " + ("needs a model output" if self.needs_model(i) else "takes no model output")
            )
        t = plan.timesteps[i]
        a, s = schedule.alpha_sigma(t)
        if model_output is None:  # USF analytical first step: x0 ≈ 0
            x0, eps = torch.zeros_like(x), x / s
        else:
            x0, eps = to_data_and_noise(model_output.to(x.dtype), x, a, s, self.prediction_type)
        clip = plan.clip_x0
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        current = _Output(t=t, lam=log_snr(a, s), x0=x0, eps=eps, clipped=clip is not None)
        if i > 0 and plan.steps[i - 1].corrector:
            x = corrector_step(
                self.x_before, history, current, schedule.alpha_sigma(plan.timesteps[i - 1]), (a, s), plan.steps[i - 1]
            )
        history.append(current)
        if plan.steps[i].dc_ratio != 1.0:
            history[-1] = dynamic_compensation(history, plan.steps[i].dc_ratio, plan.dc_order)
        self.x_before = x
        x = predictor_step(x, history, (a, s), schedule.alpha_sigma(self.targets[i]), plan.steps[i])
        del history[: -max(plan.dc_order + 1, 3)]  # bounded memory: no rule looks further back
        self.step_index = i + 1
        return x


def start_latent(x_start: torch.Tensor, plan: SolverPlan) -> torch.Tensor:
    """The state before step 0: the noise as a float tensor, times the plan's `noise_scale`."""
    x = x_start if x_start.is_floating_point() else x_start.float()
    return x * plan.noise_scale if plan.noise_scale != 1.0 else x


def sample(
    denoise: Denoiser,
    x_start: torch.Tensor,
    plan: SolverPlan,
    noise_schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    progress: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run `plan` from the pure-noise sample `x_start` (already scaled to σ at timesteps[0]); return x at the end.

    The model is called once per step (the analytical first step skips the first call). Coefficients are computed in
    float64; the state keeps the dtype of `x_start` (float32 in production; float64 in equivalence tests).
    `callback(step_index, x)` sees the state after every step.
    """
    runner = PlanRunner(plan, noise_schedule, prediction_type)
    ts = plan.timesteps
    x = start_latent(x_start, plan)
    steps = range(len(ts))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    for i in steps:
        output = denoise(x, plan.network_time(i), i) if runner.needs_model(i) else None
        x = runner.step(x, output)
        if callback is not None:
            callback(i, x)
    return x
