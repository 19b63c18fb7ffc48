"""A found schedule in the runtime's own format, so inference needs diffusers or cache-dit alone, not schedsearch.

- `diffusers`: the cache config's keyword arguments (`<name>.diffusers.json`, read with the config class named in
  it) and `<name>.diffusers.py`, the lines that enable it on a stock pipeline and call it with the schedule's
  number of steps on the pipeline's own scheduler.
- `cache-dit`: `<name>.cache-dit.yaml`, the `cache_config` section `cache_dit.load_configs` reads, and
  `<name>.cache-dit.py`: `cache_dit.enable_cache(pipe, **cache_dit.load_configs(path))`.

A schedule the runtime cannot run as it was scored is not exported in its format; `runtime_files` says why
(`NotExpressible`), and the export writes that reason instead of a file that would run something else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from schedsearch.spaces.policy_plan import RuntimePolicy
from schedsearch.spaces.schedule import Schedule

FORMATS = ("schedsearch", "diffusers", "cache-dit")
# diffusers' function that attaches each config to any transformer (`enable_cache` calls it, but only transformers
# with diffusers' CacheMixin have `enable_cache`: PixArt's and DiT's do not in 0.42)
DIFFUSERS_APPLY = {
    "FirstBlockCacheConfig": "apply_first_block_cache",
    "MagCacheConfig": "apply_mag_cache",
    "TaylorSeerCacheConfig": "apply_taylorseer_cache",
    "PyramidAttentionBroadcastConfig": "apply_pyramid_attention_broadcast",
    "FasterCacheConfig": "apply_faster_cache",
}
DIFFUSERS_CONFIG_CLASS = {
    "first_block_cache": "FirstBlockCacheConfig",
    "mag_cache": "MagCacheConfig",
    "taylorseer_cache": "TaylorSeerCacheConfig",
    "pyramid_attention_broadcast": "PyramidAttentionBroadcastConfig",
    "faster_cache": "FasterCacheConfig",
}
# Settings a stock pipeline supplies itself when the config is enabled with `pipe.transformer.enable_cache`: the
# timestep callbacks PAB and FasterCache read (`pipe.current_timestep`).
_TIMESTEP_CALLBACK = {"pyramid_attention_broadcast", "faster_cache"}
# The solvers a stock pipeline runs by name: its own scheduler, or (models without one, the builtin DiT) diffusers'
# DPM-Solver++ 2M with its defaults, which the policy space's fallback plan equals (tests/test_sampler_equivalence).
STOCK_SCHEDULERS = ("pipeline", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DDIMScheduler",
                    "EulerDiscreteScheduler")  # `pipeline`, or a class the snippet builds from the pipeline's config


@dataclass(frozen=True)
class NotExpressible:
    """Why a schedule has no file in a runtime's format."""

    reason: str


def runtime_files(schedule: Schedule, fmt: str, stem: str, model_kind: str | None = None
                  ) -> dict[str, str] | NotExpressible:
    """File name -> text of `schedule` in format `fmt` ("diffusers" or "cache-dit"), or why not.

    The solver must be a stock scheduler at the schedule's step count: the pipeline's own (`meta["scheduler"]` =
    "pipeline", what the policy space builds for pipelines), so `num_inference_steps` is all the pipeline needs,
    or diffusers' `DPMSolverMultistepScheduler` with its defaults (models without a pipeline scheduler). A found
    solver plan (orders, correctors, compensation per step) needs `schedsearch.apply_schedule`, except one rule
    throughout, which `solver_files` writes as a stock scheduler (`model_kind`: "vp" or "flow", `model_time_kind`).
    A static cache plan goes to cache-dit as a steps mask where that is the same computation."""
    from schedsearch.runtime.policy_runtime import runtime_kwargs

    policy = schedule.policy
    if policy is None and schedule.cache is not None and fmt == "cache-dit":
        found = static_as_dbcache(schedule)
        if isinstance(found, NotExpressible):
            return found
        policy = found
    elif policy is None and schedule.cache is None and fmt == "diffusers":
        return solver_files(schedule, stem, model_kind)
    elif policy is None:
        what = "a static cache plan" if schedule.cache is not None else "no runtime cache"
        return NotExpressible(f"the schedule has {what}, not a {fmt} runtime policy; run it with "
                              "schedsearch.apply_schedule")
    scheduler = stock_scheduler(schedule)
    if scheduler not in STOCK_SCHEDULERS:
        return NotExpressible("its solver plan is not a stock scheduler at some step count (the policy space's "
                              "plans are); run it with schedsearch.apply_schedule")
    steps = schedule.solver.num_steps
    kwargs = runtime_kwargs(policy, schedule.solver)
    if fmt == "diffusers":
        if policy.runtime != "diffusers":
            return NotExpressible(f"{policy.kind} is cache-dit's; export it with --format cache-dit")
        cls = DIFFUSERS_CONFIG_CLASS[policy.kind]
        data = {"format": "schedsearch.diffusers-cache/v1", "config_class": cls, "apply": DIFFUSERS_APPLY[cls],
                "config": kwargs,
                "num_inference_steps": steps, "scheduler": scheduler, "schedule_key": schedule.key}
        return {f"{stem}.diffusers.json": json.dumps(data, indent=2) + "\n",
                f"{stem}.diffusers.py": diffusers_snippet(cls, kwargs, steps, policy.kind, scheduler)}
    if fmt == "cache-dit":
        if policy.runtime != "cache-dit":
            return NotExpressible(f"{policy.kind} is diffusers'; export it with --format diffusers")
        return {f"{stem}.cache-dit.yaml": cache_dit_yaml(kwargs, schedule.key),
                f"{stem}.cache-dit.py": cache_dit_snippet(f"{stem}.cache-dit.yaml", steps, scheduler)}
    raise ValueError(f"format: {fmt!r} is not one of {FORMATS}")


def stock_scheduler(schedule: Schedule) -> str | None:
    """The stock scheduler the solver plan is: the policy space says so in `meta["scheduler"]`; otherwise a plan
    equal to diffusers' DPM-Solver++ 2M on linspace timesteps (the cache spaces' fixed solver) is that scheduler."""
    from schedsearch.spaces.baselines import dpmpp_2m_plan

    named = schedule.meta.get("scheduler")
    if named in STOCK_SCHEDULERS:
        return named
    plan = schedule.solver
    top = plan.timesteps[0]
    if float(top).is_integer() and plan == dpmpp_2m_plan(int(top) + 1, plan.num_steps):
        return "DPMSolverMultistepScheduler"
    return None


def static_as_dbcache(schedule: Schedule) -> RuntimePolicy | NotExpressible:
    """A static cache plan as cache-dit's DBCache with a static steps computation mask, where that runs the same
    computation. On a cached step DBCache computes the first Fn and last Bn blocks and adds the middle blocks'
    residual from the last computed step: exactly a unit plan of the blocks [Fn, N - Bn) (CacheQuant, DeepCache),
    and a block-skipping component plan whose reuse steps skip exactly those blocks whole and recompute everything
    else (the skipped blocks' residuals, all from the same step, telescope into the run's residual)."""
    from schedsearch.spaces.cache_plan import ComponentCachePlan, UnitCachePlan, block_names, block_slot_spans

    cache = schedule.cache
    if isinstance(cache, UnitCachePlan):
        group, total = cache.group, schedule.meta.get("num_blocks")
        fn, end = cache.start, cache.end
        refresh = set(cache.refresh_steps)
        mask = [1 if i in refresh else 0 for i in range(cache.num_steps)]
        if total is None:
            return NotExpressible("the schedule does not say how many blocks its model has (meta num_blocks), which "
                                  "cache-dit's Bn needs; export it from a cachequant study")
    elif isinstance(cache, ComponentCachePlan):
        names = block_names(cache.layout)
        groups = {n.rsplit(".", 1)[0] for n in names}
        group, total = (next(iter(groups)) if len(groups) == 1 else ""), len(names)
        reuse_rows = [row for row in cache.recompute if "0" in row]
        skipped = {tuple(s) for s, row in zip(cache.skipped_blocks(), cache.recompute, strict=True) if "0" in row}
        run = [i for i, skip in enumerate(next(iter(skipped))) if skip] if len(skipped) == 1 else []
        if not run or run != list(range(run[0], run[-1] + 1)):
            return NotExpressible("its reuse steps do not all skip one and the same contiguous run of whole blocks "
                                  "(with skip_reused_blocks); cache-dit caches one middle run of blocks per step")
        spans = block_slot_spans(cache.layout)
        canonical = "".join("0" * (b - a) if i in run else "1" * (b - a) for i, (a, b) in enumerate(spans))
        if any(row != canonical for row in reuse_rows):
            return NotExpressible("it reuses single components (attention or MLP) outside the skipped blocks; "
                                  "cache-dit reuses whole blocks only")
        fn, end = run[0], run[-1] + 1
        mask = [0 if "0" in row else 1 for row in cache.recompute]
    else:
        return NotExpressible(f"cache plans of kind {getattr(cache, 'kind', '?')} have no cache-dit form")
    if group != "transformer_blocks":
        return NotExpressible("cache-dit caches runs of `transformer_blocks`; this plan addresses other blocks")
    if fn < 1:
        return NotExpressible("its cached run starts at block 0, but cache-dit always computes its first Fn ≥ 1 "
                              "blocks (the probe of its residual difference)")
    params = {"Fn_compute_blocks": fn, "Bn_compute_blocks": int(total) - end, "residual_diff_threshold": 1.0,
              "max_warmup_steps": 0, "max_continuous_cached_steps": -1, "taylorseer_order": 0,
              "steps_computation_mask": tuple(mask), "steps_computation_policy": "static"}
    return RuntimePolicy("dbcache", tuple(params.items())).validate()


def _literal(value: Any) -> str:
    if isinstance(value, str) and value in ("float32", "float16", "bfloat16"):
        return f"torch.{value}"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
        return repr(tuple(value))
    return repr(value)


def _scheduler_lines(scheduler: str) -> str:
    if scheduler == "pipeline":
        return ""
    return (f"from diffusers import {scheduler}\n"
            f"pipe.scheduler = {scheduler}.from_config(pipe.scheduler.config)  # what the schedule was scored with\n")


def diffusers_snippet(cls: str, kwargs: dict[str, Any], steps: int, kind: str, scheduler: str = "pipeline") -> str:
    """Python lines that attach the config to a stock pipeline's transformer with diffusers' own `apply_*` function
    (what `enable_cache` calls; it works on transformers without `enable_cache` too) and say how to call it."""
    args = ", ".join(f"{k}={_literal(v)}" for k, v in kwargs.items())
    if kind in _TIMESTEP_CALLBACK:
        args += ", current_timestep_callback=lambda: pipe.current_timestep"
    apply = DIFFUSERS_APPLY[cls]
    return (f"# schedsearch export: attach to a loaded diffusers pipeline `pipe`, then call it with {steps} steps\n"
            "import torch\n"
            f"from diffusers.hooks import {cls}, {apply}\n\n"
            + _scheduler_lines(scheduler) +
            f"{apply}(pipe.transformer, {cls}({args}))\n"
            f"NUM_INFERENCE_STEPS = {steps}  # pipe(..., num_inference_steps=NUM_INFERENCE_STEPS)\n"
            "# A pipeline whose loop opens no cache context (SD3, PixArt, Sana in diffusers 0.42) runs the hooks only\n"
            "# inside one, and a transformer without diffusers' CacheMixin (PixArt, DiT) keeps their state between\n"
            "# calls unless it is reset first:\n"
            "#   from diffusers.hooks import HookRegistry\n"
            "#   from diffusers.models.cache_utils import CacheMixin\n"
            "#   HookRegistry.check_if_exists_or_initialize(pipe.transformer).reset_stateful_hooks()\n"
            '#   with CacheMixin.cache_context(pipe.transformer, "cond"):\n'
            "#       images = pipe(..., num_inference_steps=NUM_INFERENCE_STEPS).images\n")


def cache_dit_yaml(kwargs: dict[str, Any], key: str) -> str:
    """cache-dit's config file: a `cache_config` section (its loader turns `enable_taylorseer`/`taylorseer_order`
    into the calibrator config). Written by hand rather than with PyYAML: flat scalars and one list, and the
    comment line matters to readers."""
    lines = [f"# schedsearch export (schedule {key}): cache_dit.enable_cache(pipe, **cache_dit.load_configs(this))",
             "cache_config:"]
    for name, value in kwargs.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list):
            text = "[" + ", ".join(str(v) for v in value) + "]"
        else:
            text = repr(value) if not isinstance(value, str) else value
        lines.append(f"  {name}: {text}")
    return "\n".join(lines) + "\n"


def cache_dit_snippet(yaml_name: str, steps: int, scheduler: str = "pipeline") -> str:
    return (f"# schedsearch export: enable on a loaded diffusers pipeline `pipe`, then call it with {steps} steps\n"
            "import cache_dit\n\n"
            + _scheduler_lines(scheduler) +
            f"cache_dit.enable_cache(pipe, **cache_dit.load_configs({yaml_name!r}))\n"
            f"NUM_INFERENCE_STEPS = {steps}  # pipe(..., num_inference_steps=NUM_INFERENCE_STEPS)\n")


# --- solver plans as a stock diffusers scheduler -------------------------------------------------------------------


def model_time_kind(model: str) -> str | None:
    """"flow" or "vp" for the model a study ran on, from its name and local configs alone (no weights): the
    builtin models by name, a pipeline by its scheduler's config. None when it cannot be told here."""
    if model == "builtin:mnist-dit":
        return "vp"
    if model == "builtin:mnist-flow":
        return "flow"
    if not model.startswith("diffusers:"):
        return None
    from schedsearch.runtime.diffusers_models import _resolve

    try:
        _, index = _resolve(model.removeprefix("diffusers:"), None)
        config = json.loads((index.parent / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return None
    flow = str(config.get("_class_name", "")).startswith("FlowMatch") or bool(config.get("use_flow_sigmas"))
    return "flow" if flow or config.get("prediction_type") == "flow_prediction" else "vp"


def solver_files(schedule: Schedule, stem: str, kind: str | None) -> dict[str, str] | NotExpressible:
    """A solver plan with one rule throughout, as the stock scheduler that runs it and the `timesteps=` /
    `sigmas=` list a pipeline passes to it (`retrieve_timesteps`):

    - VP models: DPM-Solver++ multistep of order k ≤ 3 with diffusers' warm-up and lower-order final steps, DDIM
      being order 1 (Lu et al. 2022, §4.1), as `DPMSolverMultistepScheduler` with `timesteps=` (integers);
    - flow matching: FlowMatch Euler (every step first order) as `FlowMatchEulerDiscreteScheduler` with `sigmas=`
      the unshifted σ = t/T, which the pipeline's scheduler shifts as it was scored (static shift, or the
      resolution's dynamic one).
    Anything else (correctors, compensation, mixed orders, the analytical first step) needs apply_schedule."""
    from schedsearch.spaces.baselines import dpm_solver_plan

    plan = schedule.solver
    if schedule.cache is not None or schedule.policy is not None:
        return NotExpressible("it also reuses computation; a solver-only export would run something else")
    if plan.first_step != "model" or plan.final_timestep is not None or plan.noise_scale != 1.0 \
            or plan.clip_x0 is not None or any(s.dc_ratio != 1.0 or s.corrector for s in plan.steps):
        return NotExpressible("its plan uses the analytical first step, a corrector, compensation, a final "
                              "timestep above 0 or a start scale: no stock scheduler runs that; use apply_schedule")
    if kind is None:
        return NotExpressible("the export cannot tell whether the model is VP or flow matching from local configs")
    steps = plan.num_steps
    if kind == "flow":
        if any(s.order != 1 for s in plan.steps) or plan.timesteps[0] > 1000.0:
            return NotExpressible("on flow models only FlowMatch Euler plans (all steps first order) export")
        sigmas = [round(t / 1000.0, 8) for t in plan.timesteps]
        cls, overrides, argument = "FlowMatchEulerDiscreteScheduler", {}, {"sigmas": sigmas}
    else:
        ts = plan.timesteps
        if not all(float(t).is_integer() for t in ts) or plan.network_timesteps is not None:
            return NotExpressible("its timesteps are not integers; DPMSolverMultistepScheduler takes integer ones")
        order = max(s.order for s in plan.steps)
        expected = [s.order for s in dpm_solver_plan(ts, order=order, prediction="data").steps]
        # first-order steps are DDIM in either prediction form and under every rule; DPM-Solver++ 2M midpoint is
        # also UniPC's bh2 at order 2 (schedule.SolverStep)
        same = [s.order for s in plan.steps] == expected and all(
            s.order == 1 or (s.prediction == "data" and (s.rule == "dpmsolver" or (s.order == 2 and s.rule == "bh2")))
            for s in plan.steps)
        if not same:
            return NotExpressible("its steps are not DPM-Solver++ multistep of one order with diffusers' warm-up "
                                  "and lower-order final steps")
        cls = "DPMSolverMultistepScheduler"
        overrides = {"algorithm_type": "dpmsolver++", "solver_order": order, "solver_type": "midpoint",
                     "lower_order_final": True, "final_sigmas_type": "zero", "use_karras_sigmas": False}
        argument = {"timesteps": [int(t) for t in ts]}
    data = {"format": "schedsearch.diffusers-scheduler/v1", "scheduler_class": cls, "config_overrides": overrides,
            "num_inference_steps": steps, **argument, "schedule_key": schedule.key}
    name, values = next(iter(argument.items()))
    override_text = "".join(f", {k}={v!r}" for k, v in overrides.items())
    snippet = (f"# schedsearch export: the found solver plan as a stock scheduler; call the pipeline with {name}=\n"
               f"from diffusers import {cls}\n\n"
               f"pipe.scheduler = {cls}.from_config(pipe.scheduler.config{override_text})\n"
               f"{name.upper()} = {values!r}  # pipe(..., {name}={name.upper()})\n")
    return {f"{stem}.diffusers-scheduler.json": json.dumps(data, indent=2) + "\n",
            f"{stem}.diffusers-scheduler.py": snippet}
