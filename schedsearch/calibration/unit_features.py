"""Per-step features of a cached unit and CacheQuant's distance table (Liu et al. CVPR 2025, §3.2).

One full-compute sampling run on a few calibration samples records, at every step, exactly what the cache runtime
would reuse: for a block range [start, end) of a block group the unit's residual (output of block end−1 minus input
of block start, as `UnitReuseHook` stores it), for a UNet's DeepCache branch the output of the deep branch's last
module. Reusing step s's feature at step i then errs by feature_s − feature_i, so D[s, i] = mean |F_s − F_i| (L1,
as CacheQuant's released code) measures the error caching introduces. CFG passes are recorded together (our
denoisers batch cond and uncond; separate passes are concatenated), so D covers both branches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from schedsearch.runtime.cache_hooks import DEEPCACHE_GROUP, CachePlanMismatchError, block_metadata, stream_inputs
from schedsearch.runtime.models import LoadedModel, initial_noise
from schedsearch.runtime.sampler import sample
from schedsearch.search.dynamic import cachequant_dp, feasible_interval
from schedsearch.spaces.cache_plan import UnitCachePlan
from schedsearch.spaces.schedule import SolverPlan

__all__ = ["DEFAULT_SEEDS", "UnitSpec", "cachequant_plans", "unit_feature_distances", "unit_features"]

UnitSpec = tuple[str, int, int]  # (group path or "deepcache", start, end): the cached unit as a UnitCachePlan names it
DEFAULT_SEEDS: tuple[int, ...] = tuple(range(8))  # CacheQuant calibrates on 8 samples


def _default_conditions(model: LoadedModel, n: int) -> list[int]:
    if model.info.conditioning != "class" or not model.info.num_classes:
        raise ValueError(f"conditions: {model.info.name} is conditioned on {model.info.conditioning}; give them")
    return [i % model.info.num_classes for i in range(n)]


def _hidden_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    return stream_inputs(block_metadata(module), args, kwargs)[0]


def _hidden_output(module: torch.nn.Module, output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    meta = block_metadata(module)
    if meta is not None and isinstance(output, (tuple, list)):
        return output[meta.return_hidden_states_index]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"unit features: the hooked module returned {type(output).__name__}, not a tensor")


def _unit_modules(model: LoadedModel, unit: UnitSpec) -> tuple[torch.nn.Module, torch.nn.Module, bool]:
    """(first module, last module, residual?) of the unit, checked against the model like CacheRuntime does."""
    group, start, end = unit
    info, net = model.info, model.network
    if group == DEEPCACHE_GROUP:
        deep = info.extra.get("deepcache_unit")
        if deep is None:
            raise CachePlanMismatchError(f"unit: {info.name} is not a UNet; 'deepcache' needs one")
        if (start, end) != (0, 1):
            raise CachePlanMismatchError("unit: the deepcache unit is a single unit: use start 0, end 1")
        last = net.get_submodule(deep["cached_output_of"])
        return last, last, False
    block_group = next((g for g in info.block_groups if g.path == group), None)
    if block_group is None:
        raise CachePlanMismatchError(
            f"unit: {group!r} is not a block group of {info.name}: {[g.path for g in info.block_groups]}"
        )
    if not 0 <= start < end <= block_group.count:
        raise CachePlanMismatchError(f"unit: [{start}, {end}) is not a block range of {group}[{block_group.count}]")
    return net.get_submodule(f"{group}.{start}"), net.get_submodule(f"{group}.{end - 1}"), True


def unit_features(
    model: LoadedModel,
    plan: SolverPlan,
    unit: UnitSpec,
    conditions: Sequence[Any],
    seeds: Sequence[int],
    guidance: float | None = None,
) -> list[torch.Tensor | None]:
    """Per step, the feature the cache runtime would store for `unit` (float32, CPU; batch axis first, CFG passes
    concatenated); None for steps without a model call (an analytic first step)."""
    first, last, residual = _unit_modules(model, unit)
    step = [-1]
    inputs: list[torch.Tensor] = []
    features: list[list[torch.Tensor]] = [[] for _ in range(plan.num_steps)]

    def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append(_hidden_input(module, args, kwargs))

    def after(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        out = _hidden_output(module, output)
        feature = out - inputs.pop(0) if residual else out
        features[step[0]].append(feature.detach().float().cpu())

    # one condition per sample (class ids, prompts), or one batch's conditions as the denoiser takes them
    batch = conditions if not isinstance(conditions, Sequence) else list(conditions)
    denoise = model.denoiser(batch, guidance)

    def recording(x: torch.Tensor, t: float, step_index: int) -> torch.Tensor:
        step[0] = step_index
        return denoise(x, t, step_index)

    handles = [last.register_forward_hook(after, with_kwargs=True)]
    if residual:
        handles.append(first.register_forward_pre_hook(before, with_kwargs=True))
    try:
        x = initial_noise(seeds, model.info.sample_shape)
        with torch.no_grad():
            sample(recording, x, plan, model.noise_schedule, model.info.prediction_type)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(f) if f else None for f in features]


def unit_feature_distances(
    model: LoadedModel,
    plan: SolverPlan,
    unit: UnitSpec,
    conditions: Sequence[Any] | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    guidance: float | None = None,
    *,
    batch_size: int | None = None,
) -> np.ndarray:
    """CacheQuant §3.2's table: D[s, i] = mean L1 distance between the unit's features at steps s and i over the
    calibration samples (one full-compute run; `batch_size` bounds memory by running the samples in chunks).
    Shape (T, T), symmetric, zero diagonal; rows and columns of steps without a model call are 0."""
    seeds = list(seeds)
    whole = conditions is not None and not isinstance(conditions, Sequence)  # one batch's denoiser conditions
    if not whole:
        conditions = list(conditions) if conditions is not None else _default_conditions(model, len(seeds))
        if len(conditions) != len(seeds):
            raise ValueError(f"conditions: {len(conditions)} given for {len(seeds)} seeds")
    T = plan.num_steps
    total = torch.zeros(T, T, dtype=torch.float64)
    count = 0
    chunk = len(seeds) if whole else batch_size or len(seeds)
    for lo in range(0, len(seeds), chunk):
        part = conditions if whole else conditions[lo : lo + chunk]
        feats = unit_features(model, plan, unit, part, seeds[lo : lo + chunk], guidance)
        steps = [i for i, f in enumerate(feats) if f is not None]
        stacked = torch.stack([feats[i].flatten() for i in steps]).double()  # (T_eval, elements)
        index = torch.tensor(steps)
        for row, s in enumerate(steps):
            total[s, index] += (stacked - stacked[row]).abs().sum(dim=1)
        count += stacked.shape[1]
    return (total / count).numpy()


def cachequant_plans(
    model: LoadedModel,
    plan: SolverPlan,
    unit: UnitSpec,
    conditions: Sequence[Any] | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    guidance: float | None = None,
    intervals: Sequence[int] | None = None,
    *,
    distance: np.ndarray | None = None,
) -> list[tuple[int, UnitCachePlan]]:
    """CacheQuant's refresh steps for each interval N (default 2..T//2, infeasible ones skipped): the DP over the
    unit's feature-distance table (computed here unless `distance` is given), as validated UnitCachePlans.
    The DP runs over the evaluated steps only, so an analytic first step is never a refresh step."""
    group, start, end = unit
    if distance is None:
        distance = unit_feature_distances(model, plan, unit, conditions, seeds, guidance)
    offset = plan.num_steps - plan.nfe
    table = np.asarray(distance)[offset:, offset:]
    T = len(table)
    if intervals is None:
        intervals = [n for n in range(2, max(2, T // 2) + 1) if feasible_interval(T, n)]
    plans = []
    for n in intervals:
        result = cachequant_dp(table, n)
        steps = tuple(s + offset for s in result.refresh_steps)
        cache = UnitCachePlan(group, start, end, steps, plan.num_steps)
        plans.append((n, cache.validate(plan.num_steps, offset)))
    return plans
