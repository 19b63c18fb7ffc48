"""Run an exported `Schedule` where users generate images: in a diffusers pipeline, or on a schedsearch model.

`apply_schedule(pipe, schedule)` swaps the pipeline's scheduler for a `ScheduleScheduler` (the solver plan) and
attaches the cache plan's hooks to its transformer/UNet; `remove()` puts everything back, after which the pipeline's
output is bit-identical to before. The pipeline's own loop keeps making the model calls (CFG batch, guidance,
learned-σ split), so everything it does around the denoiser stays the pipeline's; only the update rule and the
cache decisions come from the schedule.

Call the pipeline with `num_inference_steps=schedule.solver.num_steps`: the plan fixes the timesteps and the
scheduler refuses any other count rather than silently run something else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from schedsearch.runtime.cache_hooks import CacheRuntime, check_expert_starts
from schedsearch.runtime.experts import experts_of
from schedsearch.runtime.models import LoadedModel
from schedsearch.runtime.noise import FlowSchedule, NoiseSchedule
from schedsearch.runtime.policy_runtime import PolicyRuntime
from schedsearch.runtime.sampler import PlanRunner
from schedsearch.spaces.errors import ScheduleError
from schedsearch.spaces.schedule import Schedule, SolverPlan

__all__ = ["AppliedSchedule", "ScheduleScheduler", "apply_schedule"]


def pipeline_timesteps(plan: SolverPlan, noise_schedule: NoiseSchedule) -> list[float]:
    """The plan's timesteps as the pipeline hands them to its network: unchanged for VP models; σ(t)·T for flow
    matching, the unit of diffusers' FlowMatch schedulers (Flux's pipeline divides it by 1000 itself)."""
    times = [plan.network_time(i) for i in range(plan.num_steps)]
    if isinstance(noise_schedule, FlowSchedule):
        return [noise_schedule.diffusers_sigma(t) * noise_schedule.num_train_timesteps for t in times]
    return [float(t) for t in times]


class ScheduleScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that executes a `SolverPlan` with the unified sampler's step code (`PlanRunner`).

    The pipeline evaluates the model at `timesteps[i]` and passes the output to `step`, which converts it with the
    wrapped scheduler's prediction type and noise schedule, applies UniC / DC compensation exactly as
    `runtime.sampler.sample` does, and returns the next sample. Timesteps are float32 tensors (never rounded to
    integers), as diffusers' float-timestep schedulers hand them to the network.

    Its config mirrors the wrapped scheduler's, because pipelines read settings from it (Flux / SD3: the shift).
    Call `remove()` on the `AppliedSchedule` before `pipe.save_pretrained`: this class is not a diffusers one.
    """

    order = 1

    def __init__(
        self,
        plan: SolverPlan,
        noise_schedule: NoiseSchedule,
        prediction_type: str,
        base: Any = None,
        on_reset: Callable[[], None] | None = None,
    ) -> None:
        base_config = {k: v for k, v in dict(getattr(base, "config", {}) or {}).items() if not k.startswith("_")}
        self.register_to_config(**(base_config | {"prediction_type": prediction_type}))
        self.plan = plan.validate()
        self.noise_schedule, self.prediction_type = noise_schedule, prediction_type
        self.base, self.on_reset = base, on_reset
        self.model_timesteps = pipeline_timesteps(plan, noise_schedule)
        self.timesteps = torch.tensor(self.model_timesteps, dtype=torch.float32)
        # diffusers' `sigmas` (σ for flow, σ/α for VP; the end point last): pipelines read them, e.g. WanPipeline
        # passes sigmas[i] to its cache context
        ends = [*plan.timesteps, plan.final_timestep]
        self.sigmas = torch.tensor([noise_schedule.diffusers_sigma(t) for t in ends], dtype=torch.float32)
        self.num_inference_steps = plan.num_steps
        # x_T is N(0, I) in both VP (σ_T ≈ 1) and flow (σ = 1) form, times the plan's noise_scale (Euler's start)
        self.init_noise_sigma = float(plan.noise_scale)
        self.runner: PlanRunner | None = None
        self._begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        """Steps taken in the current run (None before `set_timesteps`): the cache hooks' step index."""
        return None if self.runner is None else self.runner.step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index != 0:
            raise ValueError("ScheduleScheduler runs its plan from the first step (no img2img strength)")
        self._begin_index = begin_index

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        **kwargs: Any,
    ) -> None:
        """Start a run. The plan fixes the timesteps: a different count or explicit `timesteps` are errors;
        `sigmas` is ignored (Flux's pipeline always passes its default ones); `mu` (dynamic shift) must agree with
        the shift the schedule's noise schedule was built with, i.e. the resolution it was applied for."""
        n = self.plan.num_steps
        if num_inference_steps is not None and num_inference_steps != n:
            raise ValueError(
                f"num_inference_steps={num_inference_steps}, but the applied schedule has {n} steps: "
                f"call the pipeline with num_inference_steps={n}"
            )
        if timesteps is not None and [float(t) for t in timesteps] != self.timesteps.tolist():
            raise ValueError("timesteps=: the applied schedule fixes the timesteps; do not pass any")
        if mu is not None and isinstance(self.noise_schedule, FlowSchedule):
            shift = math.exp(mu) if self.config.get("time_shift_type", "exponential") == "exponential" else mu
            if not math.isclose(shift, self.noise_schedule.shift, rel_tol=1e-5):
                raise ValueError(
                    f"the pipeline's dynamic shift {shift:.6g} (from mu) differs from the schedule's "
                    f"{self.noise_schedule.shift:.6g}: generate at the resolution given to apply_schedule(resolution=)"
                )
        self.timesteps = self.timesteps.to(device) if device is not None else self.timesteps
        self.runner = PlanRunner(self.plan, self.noise_schedule, self.prediction_type)
        if self.on_reset is not None:
            self.on_reset()

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One plan step from `sample` given the model output at `timesteps[step_index]`."""
        if self.runner is None:
            raise RuntimeError("ScheduleScheduler.step before set_timesteps: let the pipeline drive it")
        i = self.runner.step_index
        if i >= self.plan.num_steps:
            raise IndexError(f"the applied schedule has {self.plan.num_steps} steps; the pipeline asked for more")
        expected = self.model_timesteps[i]
        if not math.isclose(float(timestep), expected, rel_tol=1e-5, abs_tol=1e-4):
            raise ValueError(f"step {i}: the pipeline passed timestep {float(timestep)}, the schedule has {expected}")
        prev = self.runner.step(sample, model_output)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.base is None or not hasattr(self.base, "add_noise"):
            raise NotImplementedError("add_noise: the wrapped scheduler has none")
        return self.base.add_noise(original_samples, noise, timesteps)

    def __len__(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))


@dataclass(eq=False)
class AppliedSchedule:
    """A schedule attached to a pipeline or a `LoadedModel`; `remove()` (or leaving the `with` block) detaches it."""

    schedule: Schedule
    target: Any
    model: LoadedModel
    scheduler: ScheduleScheduler | None = None
    runtime: CacheRuntime | PolicyRuntime | None = None
    _undo: tuple[Callable[[], None], ...] = ()
    removed: bool = False

    def sample(
        self, conditions: Any, seeds: Sequence[int], guidance: float | None = None, *, decode: bool = True
    ) -> torch.Tensor:
        """Run the schedule on the model (one batch; sample i depends on seeds[i] only): decoded images in [-1, 1],
        or the final latents with `decode=False`. For pipelines, call the pipeline itself."""
        if self.removed:
            raise RuntimeError("this schedule was removed; apply it again")
        if self.scheduler is not None:
            raise TypeError("applied to a pipeline: call the pipeline (num_inference_steps=plan.num_steps)")
        from schedsearch.runtime.execute import run_batches

        seeds = list(seeds)
        ((_, out),) = run_batches(self.model, self.schedule, conditions, seeds, guidance, batch_size=max(1, len(seeds)),
                                  runtime=self.runtime, decode=decode)
        return out

    def remove(self) -> None:
        """Restore the original scheduler and drop every hook (idempotent)."""
        if self.removed:
            return
        for undo in reversed(self._undo):
            undo()
        self.removed = True

    def __enter__(self) -> AppliedSchedule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _same_model(name: str, target: Any) -> bool:
    """Does the schedule's model name (`diffusers:<path or id>`) denote the pipeline's `name_or_path`?"""
    given = getattr(target, "name_or_path", None)
    if not given or not name.startswith("diffusers:"):
        return False
    wanted = name.removeprefix("diffusers:")
    if wanted == given:
        return True
    a, b = Path(wanted).expanduser(), Path(given).expanduser()
    return a.is_dir() and b.is_dir() and a.resolve() == b.resolve()


def _mismatch(schedule: Schedule, actual: str) -> ScheduleError:
    return ScheduleError(
        "model",
        f"schedule is for {schedule.model!r} but it is applied to {actual!r}",
        "apply it to the model it was found for, or pass strict=False to run it anyway",
    )


def apply_schedule(
    target: Any, schedule: Schedule, *, strict: bool = True, resolution: int | None = None,
    num_frames: int | None = None,
) -> AppliedSchedule:
    """Attach `schedule` to a diffusers pipeline (its scheduler and denoiser) or to a `LoadedModel`.

    strict: the schedule's model name must match (`diffusers:<path or hub id>` against `pipe.name_or_path`, or the
        loaded model's name); False skips the check (timesteps and cache shape are still validated).
    resolution: for pipelines, the image size (pixels) that will be generated if not the pipeline's default; flow
        models' shift depends on it; `num_frames` likewise for video pipelines.
    A pipeline of two transformers (Wan 2.2) gets the cache hooks and the step driver on both: its own loop picks
    the transformer of each step, as without a schedule.
    Pipelines then run the schedule when called with `num_inference_steps=schedule.solver.num_steps`; a LoadedModel's
    `AppliedSchedule.sample(conditions, seeds, guidance)` runs it. USF's analytical first step ("zero_x0") saves a
    model call that a pipeline's loop always makes, so such plans run on a LoadedModel only.
    """
    if isinstance(target, LoadedModel):
        if strict and schedule.model != target.info.name:
            raise _mismatch(schedule, target.info.name)
        schedule.validate(target.info.num_train_timesteps, max_timestep=target.info.max_timestep)
        check_expert_starts(target.info, schedule.solver, schedule.cache)
        from schedsearch.runtime.execute import attach_runtime

        runtime = attach_runtime(target, schedule)
        undo = (runtime.remove,) if runtime is not None else ()
        return AppliedSchedule(schedule, target, target, runtime=runtime, _undo=undo)
    if not hasattr(target, "scheduler") or not hasattr(target, "components"):
        raise TypeError(f"apply_schedule: expected a diffusers pipeline or a LoadedModel, got {type(target).__name__}")
    from schedsearch.runtime.diffusers_models import loaded_model_from_pipeline, prediction_type_of

    if isinstance(target.scheduler, ScheduleScheduler):
        raise RuntimeError("a schedule is already applied to this pipeline: remove() it first")
    if schedule.policy is not None:
        fmt = "cache-dit" if schedule.policy.runtime == "cache-dit" else "diffusers"
        raise ScheduleError("policy", f"a {schedule.policy.kind} policy runs on a pipeline through {fmt} itself, "
                            "not through schedsearch", f"export it with `schedsearch export --format {fmt}` (or "
                            "`pick --format ...`) and enable the written config as its snippet shows")
    if strict and not _same_model(schedule.model, target):
        raise _mismatch(schedule, f"diffusers:{getattr(target, 'name_or_path', None) or '<in-memory pipeline>'}")
    if schedule.solver.first_step == "zero_x0":
        raise ScheduleError(
            "solver.first_step",
            "the analytical first step ('zero_x0') skips a model call, but a pipeline's loop calls the model at "
            "every timestep",
            "run it with apply_schedule(load_model(...), schedule).sample(...), or use a plan with first_step 'model'",
        )
    model = loaded_model_from_pipeline(target, name=schedule.model, resolution=resolution, num_frames=num_frames)
    schedule.validate(model.info.num_train_timesteps, max_timestep=model.info.max_timestep)
    check_expert_starts(model.info, schedule.solver, schedule.cache)
    original, config = target.scheduler, target._internal_dict
    undo: list[Callable[[], None]] = []
    runtime = None
    try:
        on_reset = None
        if schedule.cache is not None:
            runtime = CacheRuntime(model.network, model.info, schedule.cache)
            undo.append(runtime.remove)
            on_reset = _reset(runtime)
        scheduler = ScheduleScheduler(
            schedule.solver, model.noise_schedule, prediction_type_of(original), base=original, on_reset=on_reset
        )
        if runtime is not None:  # on each transformer the pipeline calls (Wan 2.2: both, one counter of calls)
            drive = _step_driver(runtime, scheduler)
            for network in experts_of(model.network):
                undo.append(network.register_forward_pre_hook(drive).remove)
        target.scheduler = scheduler
        undo.append(lambda: _restore_scheduler(target, original, config))
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    return AppliedSchedule(schedule, target, model, scheduler=scheduler, runtime=runtime, _undo=tuple(undo))


def _reset(runtime: CacheRuntime) -> Callable[[], None]:
    def reset() -> None:  # a new pipeline call: no cached output of the last run may be reused
        runtime.reset()
        runtime.context.step_index = -1

    return reset


def branch_of_call(call: int) -> str:
    """The cache branch of the `call`-th denoiser call within a step: the first is "batch" (a CFG-batched call, or
    the conditional pass), later ones their own ("call1": the unconditional pass of Flux's true CFG and of the
    pipelines that run `cache_context("cond")` and `("uncond")` as separate calls). Each branch keeps its own cached
    outputs, as diffusers' hooks keep state per cache context, so the passes never reuse each other's."""
    return "batch" if call == 0 else f"call{call}"


def _step_driver(runtime: CacheRuntime, scheduler: ScheduleScheduler) -> Callable[..., None]:
    """Forward pre-hook on the denoiser: publish the scheduler's step counter to the cache hooks, as
    `CacheRuntime.wrap` does for our own sampler, and which call of the step this is (`branch_of_call`). Pipelines
    call the denoiser in the same order at every step, so a call's branch is the same pass at every step."""
    call = [0]

    def drive(module: torch.nn.Module, args: Any) -> None:
        step = scheduler.step_index
        if step is None:
            raise RuntimeError("the denoiser was called before the scheduler's set_timesteps: run the pipeline")
        ctx = runtime.context
        call[0] = call[0] + 1 if step == ctx.step_index else 0
        ctx.step_index = step
        ctx.branch = branch_of_call(call[0])
        ctx.calls += 1

    return drive


def _restore_scheduler(target: Any, original: Any, config: Mapping[str, Any]) -> None:
    target.scheduler = original
    target._internal_dict = config  # exactly the config it had (setting the attribute rewrote its entry)
