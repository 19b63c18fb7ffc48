"""diffusers' own rule-based caches as external baselines: FirstBlockCache, PyramidAttentionBroadcast, TaylorSeer,
FasterCache and MagCache (diffusers 0.42, `diffusers/hooks/*.py`).

They run through diffusers' public `apply_*` functions and its `cache_context`, exactly as `enable_cache` would,
on any transformer (also those without `CacheMixin`, such as `DiTTransformer2DModel`), so our searched schedules
are compared with them on the same model, sampler and cost accounting (`objectives.cost.observe_units`).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    ModelHook,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.models.cache_utils import CacheMixin

from schedsearch.spaces.policy_plan import DIFFUSERS_KINDS

Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]
KINDS = DIFFUSERS_KINDS  # the runtime policies' diffusers kinds are these configs, by the same names
# TaylorSeer's default identifiers ("^transformer_blocks.*attn", re.fullmatch) match no module of DiT/PixArt, whose
# attention modules are named attn1/attn2: point them at the per-block components the cache plans also address.
TAYLORSEER_BLOCK_COMPONENTS = (r"transformer_blocks\.\d+\.(attn1|attn2|ff)",)
# FasterCache splits these keyword inputs (and every positional tensor) into the uncond/cond halves; DiT's class
# labels are one of them.
FASTER_CACHE_SPLIT_KWARGS = ("hidden_states", "encoder_hidden_states", "timestep", "attention_mask",
                             "encoder_attention_mask", "class_labels")  # fmt: skip
_BATCH_ORDER_HOOK = "schedsearch_cfg_batch_order"
MAG_RATIOS_PATH = Path(__file__).resolve().parents[1] / "assets" / "mnist_dit_mag_ratios.json"


class _SwapCfgHalves(ModelHook):
    """Swap the two batch halves of every tensor input and of the output: our denoisers concatenate [cond, uncond]
    (schedsearch.runtime.models), FasterCache's denoiser hook expects [uncond, cond] (`_get_cond_input` keeps
    chunk 1). Registered outside FasterCache's hook, so FasterCache sees its own layout; output is swapped back."""

    @staticmethod
    def _swap(value: Any, batch: int) -> Any:
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch and batch % 2 == 0:
            a, b = value.chunk(2)
            return torch.cat([b, a])
        return value

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        batch = next(v for v in [*args, *kwargs.values()] if torch.is_tensor(v)).shape[0]
        args = tuple(self._swap(a, batch) for a in args)
        kwargs = {k: self._swap(v, batch) for k, v in kwargs.items()}
        output = self.fn_ref.original_forward(*args, **kwargs)
        if torch.is_tensor(output):
            return self._swap(output, batch)
        if isinstance(output, tuple):
            return (self._swap(output[0], batch), *output[1:])
        output.sample = self._swap(output.sample, batch)
        return output


class DiffusersCache:
    """One diffusers cache config applied to `network`; `wrap(denoise)` supplies the step and timestep it needs.

    Kinds and what they need on `builtin:mnist-dit` (DiTTransformer2DModel, CFG as one [cond, uncond] batch):

    - `first_block_cache`, `pyramid_attention_broadcast`: as diffusers applies them.
    - `taylorseer_cache`: `cache_identifiers` default to TAYLORSEER_BLOCK_COMPONENTS (attn1/attn2/ff of every
      `transformer_blocks.i`), since diffusers' defaults match no DiT module; Taylor factors kept in float32.
    - `faster_cache`: spatial-attention reuse on `transformer_blocks.*.attn1` (diffusers' default identifiers) plus
      CFG-Cache, which runs the network on the conditional half only and rebuilds the unconditional output from
      the last low/high-frequency difference (FFT over H, W: `tensor_format="BCHW"`, the DiT's output layout).
      It needs the batch as [uncond, cond] with the halves in kwargs it knows; we add `class_labels` to the split
      kwargs and put a batch-swapping hook outside FasterCache's (`cond_first=True`, our denoisers' order).
      Attention is only skipped on steps whose uncond branch is skipped (FasterCache's own rule). Without a CFG
      pair (guidance 1) pass `is_guidance_distilled=True`, or FasterCache would take half the samples for the
      unconditional branch. Token-layout outputs (Flux, SD3: B×S×C) have no FFT format in diffusers 0.42
      (`tensor_format` must be BCFHW, BFCHW or BCHW), so there only the attention part could apply.
    - `mag_cache`: needs the model's magnitude ratios (`mag_ratios`; for the builtin model `builtin_mag_ratios()`,
      made with `calibrate_mag_ratios`) and `num_inference_steps` = network calls per run.
    """

    def __init__(self, network: torch.nn.Module, kind: str, *, cond_first: bool = True,
                 timestep_map: Callable[[float], float] | None = None, **params: Any) -> None:
        """`timestep_map`: model time -> the timestep a stock pipeline reports to the timestep callbacks (PAB's and
        FasterCache's windows): σ·T for flow matching (`policy_runtime.network_timestep`); identity by default."""
        self.network, self.kind, self.timestep = network, kind, None
        self._timestep_map = timestep_map or float
        self._last_step: int | None = None
        if kind == "first_block_cache":
            self.config: Any = FirstBlockCacheConfig(**params)
            apply_first_block_cache(network, self.config)
        elif kind == "pyramid_attention_broadcast":
            params.setdefault("current_timestep_callback", lambda: self.timestep)
            self.config = PyramidAttentionBroadcastConfig(**params)
            apply_pyramid_attention_broadcast(network, self.config)
        elif kind == "taylorseer_cache":
            params.setdefault("cache_identifiers", list(TAYLORSEER_BLOCK_COMPONENTS))
            params.setdefault("taylor_factors_dtype", torch.float32)
            self.config = TaylorSeerCacheConfig(**params)
            _require_match(network, self.config.cache_identifiers or [], kind)
            apply_taylorseer_cache(network, self.config)
        elif kind == "faster_cache":
            params.setdefault("current_timestep_callback", lambda: self.timestep)
            params.setdefault("tensor_format", "BCHW")
            params.setdefault("attention_weight_callback", lambda _: 0.5)  # diffusers' default, without its warning
            params.setdefault("_unconditional_conditional_input_kwargs_identifiers", list(FASTER_CACHE_SPLIT_KWARGS))
            self.config = FasterCacheConfig(**params)
            apply_faster_cache(network, self.config)
            if cond_first and not self.config.is_guidance_distilled:
                HookRegistry.check_if_exists_or_initialize(network).register_hook(_SwapCfgHalves(), _BATCH_ORDER_HOOK)
        elif kind == "mag_cache":
            self.config = MagCacheConfig(**params)
            if not _has_block_list(network):
                raise ValueError(
                    f"mag_cache: {type(network).__name__} has no ModuleList of transformer blocks that diffusers' "
                    "apply_mag_cache recognises (named one of diffusers.hooks._common._ALL_TRANSFORMER_BLOCK_"
                    "IDENTIFIERS); MagCache skips the run of blocks from the first to the last, so it cannot apply"
                )
            apply_mag_cache(network, self.config)
        else:
            raise ValueError(f"kind: unknown {kind!r}; use one of {KINDS}")

    def wrap(self, denoise: Denoiser) -> Denoiser:
        def cached(x: torch.Tensor, t: float, step_index: int) -> torch.Tensor:
            if self._last_step is None or step_index <= self._last_step:  # a new run (also one starting at step 1)
                self.reset()
            if self.kind == "mag_cache" and not self.config.calibrate and step_index >= self.config.num_inference_steps:
                raise ValueError(
                    f"mag_cache: step {step_index} but num_inference_steps={self.config.num_inference_steps}; "
                    "set it to the run's number of network calls (its ratios are indexed by call)"
                )
            self._last_step, self.timestep = step_index, self._timestep_map(t)
            with CacheMixin.cache_context(self.network, "batch", step_index=step_index, timestep=t):
                return denoise(x, t, step_index)

        return cached

    def reset(self) -> None:
        if hasattr(self.network, "_diffusers_hook"):
            self.network._diffusers_hook.reset_stateful_hooks()

    def remove(self) -> None:
        """diffusers' own `disable_cache` path (it only reads `_cache_config` from the module), and our batch-order
        hook if FasterCache needed one."""
        registry = HookRegistry.check_if_exists_or_initialize(self.network)
        if registry.get_hook(_BATCH_ORDER_HOOK) is not None:
            registry.remove_hook(_BATCH_ORDER_HOOK, recurse=False)
        self.network._cache_config = self.config
        CacheMixin.disable_cache(self.network)
        del self.network._cache_config

    def __enter__(self) -> DiffusersCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _require_match(network: torch.nn.Module, patterns: list[str], kind: str) -> None:
    """diffusers applies identifier-based caches silently to nothing when no module name matches: fail instead."""
    import re

    if not any(re.fullmatch(p, name) for name, _ in network.named_modules() for p in patterns):
        raise ValueError(f"{kind}: no module of {type(network).__name__} matches the identifiers {patterns}")


def _has_block_list(network: torch.nn.Module) -> bool:
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    return any(
        name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList) and len(child) > 0
        for name, child in network.named_children()
    )


def calibrate_mag_ratios(
    network: torch.nn.Module, denoise: Denoiser, run: Callable[[Denoiser], Any], num_inference_steps: int
) -> list[float]:
    """MagCache's own calibration mode (`MagCacheConfig(calibrate=True)`, diffusers/hooks/mag_cache.py): one full
    run, per step the mean ratio of residual norms ‖r_t‖/‖r_{t-1}‖ over tokens; diffusers prints the list at the
    end of the run, which we read back."""
    printed = io.StringIO()
    with (
        DiffusersCache(network, "mag_cache", calibrate=True, num_inference_steps=num_inference_steps) as cache,
        contextlib.redirect_stdout(printed),
    ):
        run(cache.wrap(denoise))
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("[") and line.endswith("]")]
    if not lines:
        raise RuntimeError("mag_cache calibration printed no ratios: did the run make num_inference_steps calls?")
    return [float(r) for r in ast.literal_eval(lines[-1])]


def builtin_mag_ratios() -> list[float]:
    """The builtin model's MagCache ratios (calibrated by benchmarks/cache_baselines.py --calibrate-mag)."""
    return json.loads(MAG_RATIOS_PATH.read_text())["mag_ratios"]
