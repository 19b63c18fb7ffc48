"""Run a whole `Schedule` (solver plan + cache plan or runtime policy) on a loaded model, batch by batch.

Streaming on purpose: callers score each batch and drop it, so a study's memory does not grow with its samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from schedsearch.runtime.cache_hooks import CacheRuntime, check_expert_starts
from schedsearch.runtime.models import LoadedModel, initial_noise
from schedsearch.runtime.policy_runtime import PolicyRuntime
from schedsearch.runtime.sampler import sample
from schedsearch.spaces.errors import ScheduleError
from schedsearch.spaces.schedule import Schedule


@contextmanager
def counting_rows(network: torch.nn.Module) -> Iterator[list[int]]:
    """Model work while the context is open: `rows[0]` counts one per sample row of every network call (a CFG pair
    in one batch counts two), by a forward pre-hook on the network, removed on exit."""
    rows = [0]

    def count(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        rows[0] += int(first.shape[0]) if torch.is_tensor(first) and first.ndim else 1

    handle = network.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def check_schedule_for(model: LoadedModel, schedule: Schedule, *, hooks: bool = True) -> Schedule:
    """A schedule runs on the model it was made for: same name, valid timesteps for its training range, and (with
    `hooks`) a cache plan that fits the network: its hooks are attached and removed again, the same checks a run
    makes, so a command fails before it builds any teacher image. `hooks=False` where the run attaches them next
    (or they are attached already)."""
    if schedule.model != model.info.name:
        raise ScheduleError(
            "model", f"schedule is for {schedule.model!r} but the loaded model is {model.info.name!r}",
            "load the model the schedule was found for, or search again for this one",
        )
    schedule = schedule.validate(model.info.num_train_timesteps, max_timestep=model.info.max_timestep)
    check_expert_starts(model.info, schedule.solver, schedule.cache)
    if hooks and schedule.cache is not None:
        CacheRuntime(model.network, model.info, schedule.cache).remove()
    if hooks and schedule.policy is not None:
        attach_runtime(model, schedule).remove()
    return schedule


def attach_runtime(model: LoadedModel, schedule: Schedule) -> CacheRuntime | PolicyRuntime | None:
    """Attach what the schedule reuses computation with: its static cache plan's hooks or its runtime policy."""
    if schedule.cache is not None:
        return CacheRuntime(model.network, model.info, schedule.cache)
    if schedule.policy is not None:
        if "expert_boundary" in model.info.extra:
            raise ScheduleError("policy", f"{model.info.name} runs two transformers, and a runtime policy keeps the "
                                "state of one", "use a static cache plan (--space cache)")
        try:
            return PolicyRuntime(model, schedule.policy, schedule.solver)
        except ValueError as exc:  # the runtime's own check of its config against this network
            raise ScheduleError("policy", str(exc), "choose another policy kind for this model") from exc
    return None


def run_batches(
    model: LoadedModel,
    schedule: Schedule,
    conditions: Sequence[Any],
    seeds: Sequence[int],
    guidance: float | None = None,
    batch_size: int = 64,
    progress: bool = False,
    *,
    runtime: CacheRuntime | PolicyRuntime | None = None,
    decode: bool = True,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (slice of the inputs, images) per batch: decoded in [-1, 1], or the final latents with `decode=False`;
    sample i depends on seeds[i] only. `conditions`: one per seed (class ids, prompts), or one batch's conditions
    as the model's denoiser takes them (a tensor or a dict of embeddings), run as one batch. The one place a
    schedule runs on a loaded model (`schedsearch sample`, `apply_schedule(model).sample`, calibration sets, the
    evaluators). `runtime`: cache hooks already attached for this schedule (kept attached); by default they are
    attached here and removed at the end."""
    check_schedule_for(model, schedule, hooks=False)
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size} must be at least 1")
    whole = not isinstance(conditions, Sequence) or isinstance(conditions, str)
    if whole:  # one batch's conditions as the denoiser takes them (a tensor, a dict of embeddings): one batch
        batch_size = max(batch_size, len(seeds))
    elif len(conditions) != len(seeds):
        raise ValueError(f"conditions ({len(conditions)}) and seeds ({len(seeds)}) must have the same length")
    owned = runtime is None and (schedule.cache is not None or schedule.policy is not None)
    if owned:
        runtime = attach_runtime(model, schedule)
    try:
        for start in range(0, len(seeds), batch_size):
            part = slice(start, min(len(seeds), start + batch_size))
            denoise = model.denoiser(conditions if whole else list(conditions[part]), guidance)
            if runtime is not None:
                runtime.reset()
                denoise = runtime.wrap(denoise)
            x = initial_noise(seeds[part], model.info.sample_shape)
            with torch.no_grad():
                out = sample(denoise, x, schedule.solver, model.noise_schedule, model.info.prediction_type,
                             progress=progress)
                yield part, model.decode(out) if decode else out
    finally:
        if owned and runtime is not None:
            runtime.remove()
