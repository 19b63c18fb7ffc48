"""diffusers' own rule-based caches (FirstBlockCache, PyramidAttentionBroadcast) as external baselines.

They run through diffusers' public `apply_*` functions and its `cache_context`, exactly as `enable_cache` would,
on any transformer (also those without `CacheMixin`, such as `DiTTransformer2DModel`), so our searched schedules
are compared with them on the same model, sampler and cost accounting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    PyramidAttentionBroadcastConfig,
    apply_first_block_cache,
    apply_pyramid_attention_broadcast,
)
from diffusers.models.cache_utils import CacheMixin

Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]
KINDS = ("first_block_cache", "pyramid_attention_broadcast")


class DiffusersCache:
    """One diffusers cache config applied to `network`; `wrap(denoise)` supplies the step and timestep it needs."""

    def __init__(self, network: torch.nn.Module, kind: str, **params: Any) -> None:
        self.network, self.kind, self.timestep = network, kind, None
        if kind == "first_block_cache":
            self.config: Any = FirstBlockCacheConfig(**params)
            apply_first_block_cache(network, self.config)
        elif kind == "pyramid_attention_broadcast":
            params.setdefault("current_timestep_callback", lambda: self.timestep)
            self.config = PyramidAttentionBroadcastConfig(**params)
            apply_pyramid_attention_broadcast(network, self.config)
        else:
            raise ValueError(f"kind: unknown {kind!r}; use one of {KINDS}")

    def wrap(self, denoise: Denoiser) -> Denoiser:
        def cached(x: torch.Tensor, t: float, step_index: int) -> torch.Tensor:
            if step_index == 0:
                self.reset()
            self.timestep = t
            with CacheMixin.cache_context(self.network, "batch", step_index=step_index, timestep=t):
                return denoise(x, t, step_index)

        return cached

    def reset(self) -> None:
        if hasattr(self.network, "_diffusers_hook"):
            self.network._diffusers_hook.reset_stateful_hooks()

    def remove(self) -> None:
        """diffusers' own `disable_cache` path (it only reads `_cache_config` from the module)."""
        self.network._cache_config = self.config
        CacheMixin.disable_cache(self.network)
        del self.network._cache_config

    def __enter__(self) -> DiffusersCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
