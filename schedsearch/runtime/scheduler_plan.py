"""A pipeline's own scheduler, with its settings, as a `SolverPlan`: the baseline users actually run.

diffusers' schedulers carry settings a linspace plan ignores: `timestep_spacing` and `steps_offset`, the flow
`shift` (static or resolution-dependent), Karras/exponential/beta sigmas. We let the scheduler compute its own
sigmas and timesteps (`set_timesteps`, on a copy) and read them back: the exact σ of every step becomes the plan's
integration time (`noise_schedule.time_at`), the value the network is called with becomes `network_timesteps` (diffusers
rounds it), and the solver class and options become the steps' order/rule/corrector (DDIM's `clip_sample` becomes
the plan's `clip_x0`). Settings our sampler cannot
express (dynamic thresholding, DPM-Solver's `heun` solver type, SDE variants) are refused with
the setting named rather than approximated.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from schedsearch.errors import UserInputError
from schedsearch.runtime.noise import FlowSchedule, NoiseSchedule
from schedsearch.spaces.baselines import ddim_plan, dpm_solver_plan, unipc_plan
from schedsearch.spaces.schedule import SolverPlan

SUPPORTED = (
    "DDIMScheduler",
    "CogVideoXDDIMScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
)
DDIM_CLASSES = ("DDIMScheduler", "CogVideoXDDIMScheduler")  # CogVideoX's: DDIM on its SNR-shifted ᾱ, never clipping
# schedulers that add fresh noise at every step: no deterministic plan reproduces them (refused on load)
STOCHASTIC = {"CogVideoXDPMScheduler": "it adds fresh noise at every step (DPM-Solver++(2M) SDE)"}


def _refuse(cls: str, setting: str, value: Any, fix: str) -> UserInputError:
    return UserInputError("scheduler", f"{cls} with {setting}={value!r} cannot be expressed as a schedsearch plan", fix)


def refuse_stochastic(scheduler: Any) -> None:
    """Refuse, before any work, a scheduler whose steps add fresh noise: the unified sampler is deterministic, and
    running it instead would silently sample something else than the pipeline does."""
    cls = type(scheduler).__name__
    if cls in STOCHASTIC:
        raise UserInputError("scheduler", f"{cls} is not supported: {STOCHASTIC[cls]}, which no schedsearch plan "
                             "expresses", f"supported: {', '.join(SUPPORTED)}; e.g. pipe.scheduler = "
                             "CogVideoXDDIMScheduler.from_config(pipe.scheduler.config)")


def _check_settings(scheduler: Any) -> None:
    cls, cfg = type(scheduler).__name__, scheduler.config
    refuse_stochastic(scheduler)
    if cls not in SUPPORTED:
        raise UserInputError("scheduler", f"{cls} is not supported as a baseline plan",
                             f"supported: {', '.join(SUPPORTED)}; or give the plan as a schedule file")
    if cfg.get("thresholding"):
        raise _refuse(cls, "thresholding", True, "dynamic thresholding clips x0 per step; set thresholding=False")
    if cls in DDIM_CLASSES and cfg.get("rescale_betas_zero_snr") and cfg.get("prediction_type") == "epsilon":
        raise _refuse(cls, "rescale_betas_zero_snr", True, "zero terminal SNR (ᾱ = 0 at the first step) needs "
                      "prediction_type='v_prediction': ε-prediction has no x0 at σ = ∞")
    if cls == "DPMSolverMultistepScheduler":
        if cfg.get("algorithm_type") not in ("dpmsolver++", "dpmsolver"):
            raise _refuse(cls, "algorithm_type", cfg.get("algorithm_type"), "use dpmsolver++ or dpmsolver (ODE)")
        if cfg.get("solver_type", "midpoint") != "midpoint":
            raise _refuse(cls, "solver_type", cfg.get("solver_type"), "use the default solver_type='midpoint'")
        if cfg.get("euler_at_final"):
            raise _refuse(cls, "euler_at_final", True, "leave it False")
    if cls == "UniPCMultistepScheduler" and not cfg.get("lower_order_final", True):
        raise _refuse(cls, "lower_order_final", False, "leave lower_order_final=True (the default)")
    if cls == "EulerDiscreteScheduler" and cfg.get("prediction_type") not in ("epsilon", "v_prediction"):
        raise _refuse(cls, "prediction_type", cfg.get("prediction_type"), "epsilon or v_prediction")
    if cls == "EulerDiscreteScheduler" and cfg.get("timestep_type", "discrete") != "discrete":
        raise _refuse(cls, "timestep_type", cfg.get("timestep_type"), "use timestep_type='discrete'")


def pipeline_sigmas(family: str, scheduler: Any, num_steps: int) -> list[float] | None:
    """The sigmas a family's pipeline passes to `set_timesteps` itself: Flux, LTX-Video and Qwen-Image (and ~45
    other diffusers pipelines) pass linspace(1, 1/N, N) unless the scheduler uses flow sigmas, HunyuanVideo
    linspace(1, 0, N + 1) without its last; others pass none."""
    if family in ("flux", "ltx", "qwen_image") and not scheduler.config.get("use_flow_sigmas"):
        return [1.0 - i * (1.0 - 1.0 / num_steps) / max(num_steps - 1, 1) for i in range(num_steps)]
    if family == "hunyuan_video":  # HunyuanVideoPipeline: linspace(1, 0, N + 1)[:-1]
        return [1.0 - i / num_steps for i in range(num_steps)]
    return None


def _run_set_timesteps(scheduler: Any, num_steps: int, noise_schedule: NoiseSchedule,
                       sigmas: list[float] | None = None) -> Any:
    """A fresh copy of the scheduler with `set_timesteps(num_steps)` run (with the schedule's shift as μ when the
    scheduler shifts dynamically), so the caller's scheduler is untouched."""
    copy = type(scheduler).from_config(scheduler.config)
    kwargs: dict[str, Any] = {}
    if scheduler.config.get("use_dynamic_shifting") and isinstance(noise_schedule, FlowSchedule):
        exponential = scheduler.config.get("time_shift_type", "exponential") == "exponential"
        kwargs["mu"] = math.log(noise_schedule.shift) if exponential else noise_schedule.shift
    if sigmas is not None:
        copy.set_timesteps(sigmas=sigmas, **kwargs)
    else:
        copy.set_timesteps(num_steps, **kwargs)
    return copy


def _check_ddim_targets(cls: str, cfg: Any, timesteps: tuple[float, ...]) -> None:
    """diffusers' DDIM steps from t to t − T // N, not to its next timestep: with trailing or linspace spacing at a
    step count N that does not divide T the two differ (CogVideoX at 3 steps: 666 → 333, then the model is called
    at 332), which a plan cannot express. Refused with the spacing named rather than approximated."""
    stride = int(cfg.num_train_timesteps) // len(timesteps)
    targets = [t - stride for t in timesteps]
    expected = [*timesteps[1:], None]
    for target, following in zip(targets, expected, strict=True):
        if (following is None and target >= 0) or (following is not None and target != following):
            spacing, total = cfg.get("timestep_spacing", "leading"), int(cfg.num_train_timesteps)
            raise _refuse(cls, "timestep_spacing", spacing, f"at {len(timesteps)} steps it steps from t to "
                          f"t - {stride} but calls the model at {list(timesteps)}: use a step count that divides "
                          f"{total} (e.g. {_divisor_near(total, len(timesteps))})")


def _divisor_near(total: int, steps: int) -> int:
    """The step count dividing `total` nearest to `steps` (the larger on a tie: more steps, not fewer)."""
    return min((d for d in range(1, total + 1) if total % d == 0), key=lambda d: (abs(d - steps), -d))


def plan_from_scheduler(scheduler: Any, num_steps: int, noise_schedule: NoiseSchedule,
                        sigmas: list[float] | None = None) -> SolverPlan:
    """The plan that runs exactly what `scheduler` (a diffusers scheduler, e.g. `pipe.scheduler`) runs in
    `num_steps` steps, in the model time of `noise_schedule` (the LoadedModel's); `sigmas` as the pipeline passes
    them to `set_timesteps` (see `pipeline_sigmas`). UserInputError when a setting cannot be expressed."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= 1000:
        raise UserInputError("--steps", f"{num_steps!r} is not an integer from 1 to 1000", "give a step count")
    _check_settings(scheduler)
    cls, cfg = type(scheduler).__name__, scheduler.config
    run = _run_set_timesteps(scheduler, num_steps, noise_schedule, sigmas)
    network = tuple(float(t) for t in run.timesteps)
    if cls in DDIM_CLASSES:  # integrates at its integer timesteps; ends at ᾱ = 1 (σ = 0) or at ᾱ_0
        _check_ddim_targets(cls, cfg, network)
        final = None if cfg.get("set_alpha_to_one", True) else 0.0
        clips = cls == "DDIMScheduler" and cfg.get("clip_sample")  # CogVideoXDDIMScheduler.step never clips
        clip = float(cfg.get("clip_sample_range", 1.0)) if clips else None
        plan = replace(ddim_plan(network, "data", final_timestep=final), clip_x0=clip)
        return plan.validate(noise_schedule.num_train_timesteps)
    sigmas = [float(s) for s in run.sigmas]
    times = tuple(noise_schedule.time_at(s) for s in sigmas[:-1])
    final = None if sigmas[-1] == 0.0 else noise_schedule.time_at(sigmas[-1])
    if isinstance(noise_schedule, FlowSchedule):  # the network time is σ·T (shifted): back to model time
        network = tuple(noise_schedule.time_at(t / noise_schedule.num_train_timesteps) for t in network)
    scale = 1.0
    if cls in ("EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"):  # Euler = DDIM (first-order, data)
        plan = ddim_plan(times, "data", final_timestep=final)
        if cls == "EulerDiscreteScheduler":  # its start, init_noise_sigma·ε in x/α, as a scale of our VP start
            scale = float(run.init_noise_sigma) / math.sqrt(sigmas[0] ** 2 + 1.0)
    elif cls == "DPMSolverMultistepScheduler":
        prediction = "data" if cfg.algorithm_type == "dpmsolver++" else "noise"
        plan = dpm_solver_plan(times, int(cfg.solver_order), prediction, bool(cfg.lower_order_final), final)
    else:  # UniPC
        prediction = "data" if cfg.get("predict_x0", True) else "noise"
        plan = unipc_plan(times, int(cfg.solver_order), cfg.solver_type, prediction,
                          disable_corrector=cfg.get("disable_corrector") or (), final_timestep=final)
    top = noise_schedule.num_train_timesteps - (0 if isinstance(noise_schedule, FlowSchedule) else 1)
    plan = replace(plan, network_timesteps=network, noise_scale=scale)
    return plan.validate(noise_schedule.num_train_timesteps, max_timestep=top)
