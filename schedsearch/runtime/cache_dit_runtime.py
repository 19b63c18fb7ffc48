"""cache-dit (PyPI `cache-dit`, 1.5.x; an optional extra) as a runtime policy: DBCache with its TaylorSeer
calibrator, enabled through cache-dit's own `enable_cache` and configs, never re-implemented."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from schedsearch.errors import UnavailableError

CACHE_DIT_RANGE = ">=1.5,<1.6"


class CacheDitUnavailableError(UnavailableError):
    """cache-dit is not installed: the message names the extra."""


def require_cache_dit(field: str) -> None:
    """Refuse a cache-dit policy or export before any work when the library is missing."""
    if importlib.util.find_spec("cache_dit") is None:
        raise CacheDitUnavailableError(field, "needs cache-dit, which is not installed",
                                       f'pip install "schedsearch[cache-dit]" (cache-dit {CACHE_DIT_RANGE})')


# schedsearch family -> the pipeline-class prefix cache-dit registers its adapter under (cache_dit/caching/
# block_adapters/adapters.py). Families whose stock pipeline calls the transformer once per step with the CFG batch
# concatenated, as our denoisers do, so a step is one cache-dit step in both; Wan and HunyuanVideo 1.5 run CFG as
# separate calls in their pipelines (cache-dit's `_predefined_adapters_has_separate_cfg`), which our batched
# denoiser would not reproduce.
REGISTERED_PREFIX = {"dit": "DiT", "sd3": "StableDiffusion3", "pixart": "PixArt", "flux": "Flux", "sana": "Sana"}
_PATCH_ATTRIBUTES = ("forward", "_is_patched", "_norm1_emb")  # what a patch functor leaves on the module


def patch_state(network: Any) -> tuple[dict[str, Any], frozenset[str]]:
    """What a patch functor may overwrite, taken before cache-dit is enabled (building a registered adapter already
    applies its functor): the instance attributes it sets, and which of them were registered modules. An instance
    `forward` may be there already (diffusers' hook registry leaves its own)."""
    return ({a: network.__dict__[a] for a in _PATCH_ATTRIBUTES if a in network.__dict__},
            frozenset(a for a in _PATCH_ATTRIBUTES if a in network._modules))


def restore_patch_state(network: Any, state: tuple[dict[str, Any], frozenset[str]]) -> None:
    """After `cache_dit.disable_cache`: undo what the patch functor left (an instance `forward`, `_is_patched`, a
    registered `_norm1_emb` that would add keys to the state dict), putting back what `patch_state` saw."""
    saved, had_modules = state
    for name in _PATCH_ATTRIBUTES:
        if name in network._modules and name not in had_modules:
            del network._modules[name]
        if name in saved:
            network.__dict__[name] = saved[name]
        elif name in network.__dict__:
            del network.__dict__[name]


def dbcache_kwargs(policy: Any, plan: Any) -> dict[str, Any]:
    """The `cache_config` section cache-dit's `load_configs` reads (and `DBCacheConfig`'s keywords): Fn/Bn, the
    threshold, warm-up, the consecutive-cache limit and `num_inference_steps` = the plan's network calls (cache-dit
    counts one step per transformer call and refreshes its context after that many); `enable_taylorseer` with its
    order when the calibrator is on; a steps computation mask when the policy holds one."""
    get = policy.get
    out: dict[str, Any] = {
        "Fn_compute_blocks": get("Fn_compute_blocks"), "Bn_compute_blocks": get("Bn_compute_blocks"),
        "residual_diff_threshold": get("residual_diff_threshold"), "max_warmup_steps": get("max_warmup_steps"),
        "max_continuous_cached_steps": get("max_continuous_cached_steps"), "num_inference_steps": plan.nfe,
    }
    mask = policy.settings.get("steps_computation_mask")
    if mask is not None:
        if len(mask) != plan.nfe:
            raise ValueError(f"policy.params.steps_computation_mask: {len(mask)} entries for {plan.nfe} steps")
        out["steps_computation_mask"] = [int(v) for v in mask]
        out["steps_computation_policy"] = policy.settings.get("steps_computation_policy", "dynamic")
    order = int(get("taylorseer_order"))
    if order > 0:
        out["enable_taylorseer"] = True
        out["taylorseer_order"] = order
    return out


def cache_dit_configs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`dbcache_kwargs` -> `enable_cache`'s keyword arguments, through cache-dit's own YAML/dict loader, so what
    runs here is what `cache_dit.load_configs(file)` gives a user."""
    require_cache_dit("policy dbcache")
    import cache_dit

    configs = cache_dit.load_configs({"cache_config": dict(kwargs)})
    return {"cache_config": configs["cache_config"], "calibrator_config": configs["calibrator_config"]}


def _quiet() -> None:
    """cache-dit logs every enable, refresh and disable at INFO to stdout (its `CACHE_DIT_LOG_LEVEL` is read once,
    at its first import): keep its loggers to errors, as a study prints its own progress."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.ERROR)


class CacheDitRuntime:
    """cache-dit's DBCache on the bare transformer, with the adapter cache-dit registers for the model's pipeline
    (forward pattern, patch functor), driven by our sampler: the context is refreshed at the start of every run,
    since without a pipeline call cache-dit's context persists across runs (its automatic refresh fires a call
    late, so run 2's first call would count as run 1's last step)."""

    def __init__(self, model: Any, policy: Any, plan: Any) -> None:
        require_cache_dit("policy dbcache")
        import cache_dit

        _quiet()
        from cache_dit import BlockAdapter
        from cache_dit.caching.block_adapters.block_adapters import FakeDiffusionPipeline
        from cache_dit.caching.block_adapters.block_registers import BlockAdapterRegister

        family, network = model.info.family, model.network
        prefix = REGISTERED_PREFIX.get(family)
        if prefix is None or prefix not in BlockAdapterRegister._adapters:
            raise ValueError(f"dbcache: cache-dit has no adapter schedsearch can drive for family {family!r} "
                             f"(supported: {', '.join(REGISTERED_PREFIX)})")
        kwargs = dbcache_kwargs(policy, plan)
        blocks = len(network.transformer_blocks)
        if kwargs["Fn_compute_blocks"] + kwargs["Bn_compute_blocks"] > blocks:
            raise ValueError(f"dbcache: Fn_compute_blocks + Bn_compute_blocks = {kwargs['Fn_compute_blocks']} + "
                             f"{kwargs['Bn_compute_blocks']} exceeds the model's {blocks} transformer blocks")
        self._patch_state = patch_state(network)  # before the registered factory applies its patch functor
        registered = BlockAdapterRegister._adapters[prefix](FakeDiffusionPipeline(network))
        self.network, self._cache_dit = network, cache_dit
        adapter = BlockAdapter(transformer=network, blocks=registered.blocks,
                               forward_pattern=registered.forward_pattern, patch_functor=registered.patch_functor)
        cache_dit.enable_cache(adapter, **cache_dit_configs(kwargs))
        self._last_step: int | None = None

    def wrap(self, denoise: Any) -> Any:
        def cached(x: Any, t: float, step_index: int) -> Any:
            if self._last_step is None or step_index <= self._last_step:  # a new run
                self.reset()
            self._last_step = step_index
            return denoise(x, t, step_index)

        return cached

    def reset(self) -> None:
        self._cache_dit.refresh_context(self.network)
        self._last_step = None

    def remove(self) -> None:
        """cache-dit's `disable_cache`, then `restore_patch_state`, so the network is as before."""
        self._cache_dit.disable_cache(self.network)
        restore_patch_state(self.network, self._patch_state)


def cache_dit_steps_mask(preset: str, num_steps: int) -> tuple[int, ...]:
    """cache-dit's own steps computation mask preset (`cache_dit.steps_mask(total_steps=, mask_policy=)`: slow,
    medium, fast, ultra), 1 = compute."""
    require_cache_dit("steps computation mask")
    import cache_dit

    return tuple(int(v) for v in cache_dit.steps_mask(total_steps=num_steps, mask_policy=preset))
