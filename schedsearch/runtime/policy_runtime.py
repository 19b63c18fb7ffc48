"""Run a `RuntimePolicy` on a loaded model: the runtime's own cache, configured from the policy's settings.

`runtime_kwargs(policy, plan)` is the one translation from a policy to the keyword arguments of the runtime's
config class (diffusers' `*CacheConfig`, cache-dit's `DBCacheConfig`); the runtime here and the exports
(`results/runtime_export.py`) both use it, so what was scored is what is exported. `PolicyRuntime` has the
interface of `CacheRuntime` (`wrap`, `reset`, `remove`), so `run_batches` runs either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from schedsearch.runtime.diffusers_caches import TAYLORSEER_BLOCK_COMPONENTS, Denoiser, DiffusersCache
from schedsearch.runtime.noise import FlowSchedule, NoiseSchedule
from schedsearch.spaces.policy_plan import RuntimePolicy
from schedsearch.spaces.schedule import SolverPlan

__all__ = ["PolicyRuntime", "model_fixed_params", "network_timestep", "runtime_kwargs"]


def runtime_kwargs(policy: RuntimePolicy, plan: SolverPlan) -> dict[str, Any]:
    """The policy as the runtime's config takes it (JSON-able: lists for tuples, dtype names as strings).

    Window knobs become diffusers' (low, high) ranges; FasterCache's windows start at -1 as its defaults do.
    MagCache's `num_inference_steps` is the plan's number of network calls (its ratios are indexed by call).
    """
    s = policy.settings
    get = policy.get
    if policy.kind == "first_block_cache":
        return {"threshold": get("threshold")}
    if policy.kind == "mag_cache":
        return {"threshold": get("threshold"), "max_skip_steps": get("max_skip_steps"),
                "retention_ratio": get("retention_ratio"), "num_inference_steps": plan.nfe,
                "mag_ratios": list(s["mag_ratios"])}
    if policy.kind == "taylorseer_cache":
        out = {"cache_interval": get("cache_interval"), "max_order": get("max_order"),
               "disable_cache_before_step": get("disable_cache_before_step"),
               "taylor_factors_dtype": "float32"}
        if "cache_identifiers" in s:
            out["cache_identifiers"] = list(s["cache_identifiers"])
        return out
    if policy.kind == "pyramid_attention_broadcast":
        return {"spatial_attention_block_skip_range": get("spatial_attention_block_skip_range"),
                "spatial_attention_timestep_skip_range": [get("spatial_attention_timestep_low"),
                                                          get("spatial_attention_timestep_high")]}
    if policy.kind == "faster_cache":
        return {"spatial_attention_block_skip_range": get("spatial_attention_block_skip_range"),
                "spatial_attention_timestep_skip_range": [-1, get("spatial_attention_timestep_high")],
                "unconditional_batch_skip_range": get("unconditional_batch_skip_range"),
                "unconditional_batch_timestep_skip_range": [-1, get("unconditional_batch_timestep_high")]}
    if policy.kind == "dbcache":
        from schedsearch.runtime.cache_dit_runtime import dbcache_kwargs

        return dbcache_kwargs(policy, plan)
    raise ValueError(f"policy.kind: unknown {policy.kind!r}")


def diffusers_config_kwargs(policy: RuntimePolicy, plan: SolverPlan) -> dict[str, Any]:
    """`runtime_kwargs` with the values diffusers' dataclasses want: tuples, a torch dtype."""
    out = runtime_kwargs(policy, plan)
    for name, value in list(out.items()):
        if name.endswith("_range") and isinstance(value, list):
            out[name] = tuple(value)
    if "taylor_factors_dtype" in out:
        out["taylor_factors_dtype"] = getattr(torch, out["taylor_factors_dtype"])
    return out


def network_timestep(noise_schedule: NoiseSchedule, t: float) -> float:
    """The timestep a stock pipeline reports (`pipe.current_timestep`) at model time t: t itself for VP models,
    σ(t)·T for flow matching (diffusers' FlowMatch schedulers' unit), which PAB's and FasterCache's windows use."""
    if isinstance(noise_schedule, FlowSchedule):
        return noise_schedule.diffusers_sigma(t) * noise_schedule.num_train_timesteps
    return float(t)


class PolicyRuntime:
    """A runtime policy attached to `model.network` for runs of `plan`; `wrap(denoise)` gives the runtime the step
    and timestep it needs, `remove()` detaches it (the network is then as before)."""

    def __init__(self, model: Any, policy: RuntimePolicy, plan: SolverPlan) -> None:
        self.policy, self.plan, self.network = policy.validate(), plan, model.network
        if policy.runtime == "cache-dit":
            from schedsearch.runtime.cache_dit_runtime import CacheDitRuntime

            self._impl: Any = CacheDitRuntime(model, policy, plan)
            return
        kwargs = diffusers_config_kwargs(policy, plan)
        if policy.kind == "taylorseer_cache" and "cache_identifiers" not in kwargs:
            kwargs["cache_identifiers"] = default_taylorseer_identifiers(model.network)
        self._impl = DiffusersCache(model.network, policy.kind,
                                    timestep_map=lambda t: network_timestep(model.noise_schedule, t), **kwargs)

    def wrap(self, denoise: Denoiser) -> Denoiser:
        return self._impl.wrap(denoise)

    def reset(self) -> None:
        self._impl.reset()

    def remove(self) -> None:
        self._impl.remove()

    def __enter__(self) -> PolicyRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def default_taylorseer_identifiers(network: torch.nn.Module) -> list[str]:
    """diffusers' own TaylorSeer identifiers where they match a module of the network (SD3, Flux: `attn`), else the
    per-block attn1/attn2/ff of DiT/PixArt, whose attention modules diffusers' defaults miss."""
    import re

    from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS

    names = [name for name, _ in network.named_modules()]
    if any(re.fullmatch(p, n) for p in _TRANSFORMER_BLOCK_IDENTIFIERS for n in names):
        return list(_TRANSFORMER_BLOCK_IDENTIFIERS)
    return list(TAYLORSEER_BLOCK_COMPONENTS)


def model_fixed_params(model: Any, kinds: Sequence[str], num_steps: int, conditions: Any,
                       guidance: float | None, count: int | None = None) -> dict[str, dict[str, Any]]:
    """What the policies of `kinds` need from the model and are not searched: MagCache's magnitude ratios,
    calibrated with diffusers' own calibration mode on one run of the pipeline's scheduler at `num_steps` steps
    (diffusers interpolates them to other step counts, as a user's single calibration would be), and TaylorSeer's
    module identifiers where diffusers' defaults miss the model's attention modules. `conditions`: class ids or
    prompts, one per sample, or one batch of pre-encoded embeddings of `count` samples."""
    from schedsearch.runtime.diffusers_caches import calibrate_mag_ratios
    from schedsearch.runtime.models import initial_noise
    from schedsearch.runtime.sampler import sample

    out: dict[str, dict[str, Any]] = {}
    if "mag_cache" in kinds:
        plan = model.default_plan(num_steps)
        count = len(conditions) if count is None else count
        x = initial_noise(list(range(count)), model.info.sample_shape)
        denoise = model.denoiser(conditions if isinstance(conditions, dict) else list(conditions), guidance)
        ratios = calibrate_mag_ratios(
            model.network, denoise,
            lambda d: sample(d, x, plan, model.noise_schedule, model.info.prediction_type), plan.nfe)
        out["mag_cache"] = {"mag_ratios": tuple(round(r, 5) for r in ratios)}
    if "taylorseer_cache" in kinds:
        from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS

        identifiers = default_taylorseer_identifiers(model.network)
        if tuple(identifiers) != tuple(_TRANSFORMER_BLOCK_IDENTIFIERS):  # stored only where not diffusers' default
            out["taylorseer_cache"] = {"cache_identifiers": tuple(identifiers)}
    return out
