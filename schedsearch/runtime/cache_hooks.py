"""Run a cache plan on a diffusers model without editing it: one diffusers `ModelHook` per cached module.

Like diffusers' own `hooks/first_block_cache.py`, each hook replaces its module's forward through the
`HookRegistry`; unlike those rule-based caches, the decision is read from an explicit plan at the sampler's step
index. State is kept per CFG branch (`branch`): our denoisers run cond and uncond as one batch ("batch"), a caller
that runs them as separate passes sets `branch` to "cond"/"uncond" before each. State resets between runs.

A model of two transformers (Wan 2.2, `runtime.experts.ExpertPair`) gets the plan's hooks on both, each hook with its
own state: a plan's row at a step applies to whichever transformer runs that step, and a reuse takes that
transformer's own last output, never the other's (other weights). Each transformer's first step therefore has
nothing to reuse: `check_expert_starts` refuses a plan that reuses there before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

from schedsearch.errors import UserInputError
from schedsearch.runtime.experts import experts_of
from schedsearch.runtime.models import ModelInfo, block_module_name, model_layout
from schedsearch.spaces.baselines import forced_recompute_steps, step_experts
from schedsearch.spaces.cache_plan import CachePlan, ComponentCachePlan, UnitCachePlan, block_names, slot_names
from schedsearch.spaces.errors import ScheduleError
from schedsearch.spaces.schedule import SolverPlan

__all__ = ["CachePlanMismatchError", "CacheRuntime", "check_expert_starts", "model_layout"]

COMPONENT_HOOK = "schedsearch_component_reuse"
UNIT_HOOK = "schedsearch_unit_reuse"
BLOCK_HOOK = "schedsearch_block_skip"
DEEPCACHE_GROUP = "deepcache"  # UnitCachePlan.group naming a UNet's DeepCache branch (start 0, end 1)

Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]


class CachePlanMismatchError(UserInputError):
    """The plan's shape does not fit the model; the message gives expected and given shapes."""


@dataclass
class StepContext:
    """Where the sampler is: set by the wrapped denoiser before each model call, read by every hook."""

    step_index: int = -1
    branch: str = "batch"
    calls: int = 0


@dataclass
class _BranchCache:
    values: dict[str, Any] = field(default_factory=dict)


class ComponentReuseHook(ModelHook):
    """ECAD plain reuse: recompute when the plan's bit is 1, else return the last computed output of this module."""

    _is_stateful = True

    def __init__(self, context: StepContext, recompute: np.ndarray, name: str, slot: int = -1) -> None:
        super().__init__()
        self.context, self.recompute, self.name = context, recompute, name  # recompute: bool[steps]
        self.slot = slot  # the plan column it reads (`CacheRuntime.retarget`)
        # keep an output only if the next step reuses it: an all-recompute plan then holds no tensors at all
        self.keep = np.append(~recompute[1:], False)
        self.cache = _BranchCache()

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ctx = self.context
        if self.recompute[ctx.step_index]:
            output = self.fn_ref.original_forward(*args, **kwargs)
            if self.keep[ctx.step_index]:
                self.cache.values[ctx.branch] = output
            else:
                self.cache.values.pop(ctx.branch, None)
            return output
        if ctx.branch not in self.cache.values:
            raise RuntimeError(f"{self.name}: step {ctx.step_index} reuses an output that was never computed")
        return self.cache.values[ctx.branch]

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.cache = _BranchCache()
        return module


def stream_inputs(meta: TransformerBlockMetadata | None, args: tuple,
                   kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A block's (hidden, encoder hidden) inputs as diffusers' registry names them (encoder None for one stream;
    an unregistered block's first argument as the hidden states)."""
    if meta is None:
        return (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]), None
    hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
    if meta.return_encoder_hidden_states_index is None:
        return hidden, None
    return hidden, meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)


def _stream_outputs(meta: TransformerBlockMetadata | None, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A block's (hidden, encoder hidden) outputs; a tensor is the hidden states alone."""
    if isinstance(output, torch.Tensor):
        return output, None
    if meta is None:
        raise TypeError("cache: the block returned a tuple and diffusers' TransformerBlockRegistry does not "
                        "describe it")
    encoder = None if meta.return_encoder_hidden_states_index is None else output[
        meta.return_encoder_hidden_states_index]
    return output[meta.return_hidden_states_index], encoder


def _as_block_output(meta: TransformerBlockMetadata | None, hidden: torch.Tensor,
                     encoder: torch.Tensor | None) -> Any:
    """(hidden, encoder) in the block's own return format."""
    if meta is None or meta.return_encoder_hidden_states_index is None:
        return hidden
    out: list[Any] = [None, None]
    out[meta.return_hidden_states_index] = hidden
    out[meta.return_encoder_hidden_states_index] = encoder
    return tuple(out)


class BlockSkipHook(ModelHook):
    """`skip_reused_blocks`: at a step that reuses every component of this block, return its input plus the residual
    from the last step it ran (hidden states, and encoder hidden states of MM-DiT blocks, located with diffusers'
    `TransformerBlockRegistry` as its FirstBlockCache does), so the block's adaLN modulation is skipped too."""

    _is_stateful = True

    def __init__(self, context: StepContext, skip: np.ndarray, metadata: TransformerBlockMetadata,
                 block: str = "") -> None:
        super().__init__()
        self.context, self.skip, self.meta, self.block = context, skip, metadata, block
        self.keep = np.append(skip[1:], False)  # store a residual only if the next step skips the block
        self.cache = _BranchCache()

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ctx = self.context
        hidden, encoder = stream_inputs(self.meta, args, kwargs)
        if not self.skip[ctx.step_index]:
            output = self.fn_ref.original_forward(*args, **kwargs)
            if self.keep[ctx.step_index]:
                out_hidden, out_encoder = _stream_outputs(self.meta, output)
                encoder_residual = None if out_encoder is None or encoder is None else out_encoder - encoder
                self.cache.values[ctx.branch] = (out_hidden - hidden, encoder_residual)
            else:
                self.cache.values.pop(ctx.branch, None)
            return output
        if ctx.branch not in self.cache.values:
            raise RuntimeError(f"block skip: step {ctx.step_index} skips a block that never ran")
        hidden_residual, encoder_residual = self.cache.values[ctx.branch]
        encoder = encoder if encoder_residual is None else encoder + encoder_residual
        return _as_block_output(self.meta, hidden + hidden_residual, encoder)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.cache = _BranchCache()
        return module


class UnitReuseHook(ModelHook):
    """DeepCache/FORA-style unit: on non-refresh steps the first block of the unit returns input + cached residual
    and the others pass their input through; on refresh steps the unit runs and its residual is stored. MM-DiT
    blocks (SD3, Flux) carry two streams: both residuals are kept, each located with diffusers'
    `TransformerBlockRegistry` as for block skipping; a last block that returns no text stream (SD3's
    context-pre-only block) leaves the text stream as it came in, since nothing reads it after that block."""

    _is_stateful = True

    def __init__(self, context: StepContext, refresh: np.ndarray, shared: dict[str, Any], first: bool, last: bool,
                 metadata: TransformerBlockMetadata | None = None):
        super().__init__()
        self.context, self.refresh, self.shared, self.first, self.last = context, refresh, shared, first, last
        self.meta = metadata
        self.keep = np.append(~refresh[1:], False)  # store the residual only if the next step reuses it

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ctx, key = self.context, self.context.branch
        hidden, encoder = stream_inputs(self.meta, args, kwargs)
        if not self.refresh[ctx.step_index]:
            residuals = self.shared.setdefault("residual", {})
            if key not in residuals:
                raise RuntimeError(f"unit cache: step {ctx.step_index} reuses a unit that was never computed")
            if self.first:
                hidden_residual, encoder_residual = residuals[key]
                hidden = hidden + hidden_residual
                encoder = encoder if encoder_residual is None or encoder is None else encoder + encoder_residual
            return _as_block_output(self.meta, hidden, encoder)
        keep = self.keep[ctx.step_index]
        if self.first and keep:
            self.shared.setdefault("input", {})[key] = (hidden, encoder)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.last and keep:
            out_hidden, out_encoder = _stream_outputs(self.meta, output)
            in_hidden, in_encoder = self.shared["input"].pop(key)
            encoder_residual = None if out_encoder is None or in_encoder is None else out_encoder - in_encoder
            self.shared.setdefault("residual", {})[key] = (out_hidden - in_hidden, encoder_residual)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.shared.clear()
        return module


def block_metadata(module: torch.nn.Module) -> TransformerBlockMetadata | None:
    """diffusers' description of a block's inputs and outputs (which argument and which output index is each
    stream), or None for a module it does not register (a UNet branch). Dual-stream blocks (Flux, SD3) return
    (text, image) pairs; SD3's last block returns (None, image)."""
    try:
        return TransformerBlockRegistry.get(type(module))
    except ValueError:
        return None


def check_expert_starts(info: ModelInfo, solver: SolverPlan, cache: CachePlan | None) -> None:
    """Refuse, before any work, a cache plan that reuses at the first step a transformer of a two-transformer model
    runs (Wan 2.2): that transformer has computed nothing yet, and the other's outputs come from other weights."""
    boundary = info.extra.get("expert_boundary") if info.extra else None
    if boundary is None or cache is None:
        return
    experts = step_experts(solver, boundary)
    for step in forced_recompute_steps(solver, boundary)[1:]:
        full = cache.refresh_mask()[step] if isinstance(cache, UnitCachePlan) else "0" not in cache.recompute[step]
        if not full:
            name = "transformer_2" if experts[step] else "transformer"
            unit = isinstance(cache, UnitCachePlan)
            field = "cache.refresh_steps" if unit else f"cache.recompute[{step}]"
            raise ScheduleError(field, f"step {step} is the first step {name} runs (below boundary_ratio="
                                f"{boundary['ratio']}), so it has nothing cached to reuse",
                                f"refresh the unit at step {step}" if unit else f"recompute every slot at step {step}")


class CacheRuntime:
    """Hooks for one plan on one network (on each transformer of an `ExpertPair`, each with its own state). Use as
    a context manager; `wrap(denoise)` drives the step index."""

    def __init__(self, network: torch.nn.Module, info: ModelInfo, plan: CachePlan) -> None:
        self.network, self.info, self.plan = network, info, plan
        self.networks = experts_of(network)
        if info.extra and "expert_boundary" in info.extra and len(self.networks) != 2:
            raise TypeError(f"CacheRuntime: {info.name} runs two transformers: pass its ExpertPair (model.network)")
        self.context = StepContext()
        self._hooked: list[tuple[torch.nn.Module, str]] = []
        if isinstance(plan, ComponentCachePlan):
            self._attach_components(plan)
        elif isinstance(plan, UnitCachePlan):
            self._attach_unit(plan)
        else:
            raise TypeError(f"cache plan: unsupported {type(plan).__name__}")

    def _attach_components(self, plan: ComponentCachePlan) -> None:
        expected = model_layout(self.info)
        if plan.layout != expected:
            raise CachePlanMismatchError(
                f"cache.layout: plan is for {plan.layout!r} but {self.info.name} has {expected!r}"
            )
        plan.validate()
        every = [self._blocks(network) for network in self.networks]
        skips = [self._block_skips(plan, blocks) for blocks in every]  # checked before anything is attached
        bits = np.array([[c == "1" for c in row] for row in plan.recompute], dtype=bool)  # (steps, slots)
        for blocks, block_skips in zip(every, skips, strict=True):
            self._attach_component_hooks(plan, blocks, bits)
            for block, (skip, metadata) in block_skips.items():
                self._register(blocks[block], BlockSkipHook(self.context, skip, metadata, block), BLOCK_HOOK)

    def _attach_component_hooks(self, plan: ComponentCachePlan, blocks: dict[str, torch.nn.Module],
                                bits: np.ndarray) -> None:
        for slot, name in enumerate(slot_names(plan.layout)):
            block, component = name.rsplit(".", 1)
            module = getattr(blocks[block], component)
            if module is None:  # absent in this block (SD3's last block has no ff_context): nothing to cache
                continue
            # a UNet block's `resnets` / `attentions` are ModuleLists its forward walks: each member reuses its own
            parts = list(module) if isinstance(module, torch.nn.ModuleList) else [module]
            for i, part in enumerate(parts):
                label = f"{name}.{i}" if len(parts) > 1 else name
                self._register(part, ComponentReuseHook(self.context, bits[:, slot], label, slot), COMPONENT_HOOK)

    def _blocks(self, network: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """'path.block' -> the block module of `network` (a UNet group of one block is its path itself)."""
        return {
            f"{g.path}.{b}": network.get_submodule(block_module_name(network, g.path, g.count, b))
            for g in self.info.block_groups
            for b in range(g.count)
        }

    def _block_skips(
        self, plan: ComponentCachePlan, blocks: dict[str, torch.nn.Module]
    ) -> dict[str, tuple[np.ndarray, TransformerBlockMetadata]]:
        """Per block that the plan ever skips: its skip mask and diffusers' metadata of where its states are."""
        if not plan.skip_reused_blocks:
            return {}
        skipped = np.array(plan.skipped_blocks(), dtype=bool)  # (steps, blocks)
        out = {}
        for j, block in enumerate(block_names(plan.layout)):
            if not skipped[:, j].any():
                continue
            cls = type(blocks[block])
            try:
                metadata = TransformerBlockRegistry.get(cls)
            except ValueError as exc:
                raise CachePlanMismatchError(
                    f"cache.skip_reused_blocks: {block} is a {cls.__name__}, which diffusers cannot skip as a "
                    "block; set skip_reused_blocks to false (plain component reuse)"
                ) from exc
            out[block] = (skipped[:, j], metadata)
        return out

    def _attach_unit(self, plan: UnitCachePlan) -> None:
        if plan.group == DEEPCACHE_GROUP:
            self._attach_deepcache(plan)
            return
        group = next((g for g in self.info.block_groups if g.path == plan.group), None)
        if group is None:
            known = [g.path for g in self.info.block_groups]
            raise CachePlanMismatchError(
                f"cache.group: {plan.group!r} is not a block group of {self.info.name}: {known}"
            )
        if plan.end > group.count:
            raise CachePlanMismatchError(
                f"cache.end: unit [{plan.start}, {plan.end}) exceeds the {group.count} blocks of {plan.group}"
            )
        plan.validate()
        refresh = np.array(plan.refresh_mask(), dtype=bool)
        for network in self.networks:
            shared: dict[str, Any] = {}  # the unit's residual: one per transformer
            for b in range(plan.start, plan.end):
                module = network.get_submodule(f"{plan.group}.{b}")
                hook = UnitReuseHook(self.context, refresh, shared, first=b == plan.start, last=b == plan.end - 1,
                                     metadata=block_metadata(module))
                self._register(module, hook, UNIT_HOOK)

    def _attach_deepcache(self, plan: UnitCachePlan) -> None:
        """DeepCache (Ma et al. 2024, §3.2) on a UNet: every module of the deep branch returns its output from the
        last refresh step, so up_blocks[-2] hands its cached feature to the shallow up_blocks[-1]; conv_in,
        down_blocks[0], up_blocks[-1] and conv_out run every step."""
        unit = self.info.extra.get("deepcache_unit")
        if unit is None:
            raise CachePlanMismatchError(f"cache.group: {self.info.name} is not a UNet; 'deepcache' needs one")
        if (plan.start, plan.end) != (0, 1):
            raise CachePlanMismatchError("cache.start/end: the deepcache unit is a single unit: use start 0, end 1")
        plan.validate()
        refresh = np.array(plan.refresh_mask(), dtype=bool)
        for name in unit["deep"]:
            hook = ComponentReuseHook(self.context, refresh, name)
            self._register(self.network.get_submodule(name), hook, UNIT_HOOK)

    def _register(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self._hooked.append((module, name))

    # -- prefix sharing (evaluation/prefix_tree.py): one set of hooks runs many plans of one layout --
    def retarget(self, plan: ComponentCachePlan) -> None:
        """Run `plan` (same layout and block skipping as the attached one) with these hooks from now on, keeping
        every output a hook computes, so that a state snapshotted under one plan can be continued by another that
        reuses what the first would have dropped. Outputs are unchanged: only what is kept differs."""
        if not isinstance(self.plan, ComponentCachePlan) or not isinstance(plan, ComponentCachePlan):
            raise TypeError("retarget: component cache plans only")
        if (plan.layout, plan.skip_reused_blocks) != (self.plan.layout, self.plan.skip_reused_blocks):
            raise ValueError("retarget: the plan must have the attached plan's layout and block skipping")
        plan.validate()
        bits = np.array([[c == "1" for c in row] for row in plan.recompute], dtype=bool)
        skipped = np.array(plan.skipped_blocks(), dtype=bool) if plan.skip_reused_blocks else None
        names = block_names(plan.layout)
        for module, name in self._hooked:
            hook = module._diffusers_hook.get_hook(name)
            if isinstance(hook, ComponentReuseHook):
                hook.recompute = bits[:, hook.slot]
                hook.keep = np.ones(len(bits), dtype=bool)
            elif isinstance(hook, BlockSkipHook):
                hook.skip = skipped[:, names.index(hook.block)]
                hook.keep = np.ones(len(bits), dtype=bool)
        self.plan = plan

    def snapshot(self) -> list[dict[str, Any]]:
        """Every hook's kept outputs (references: tensors are never modified in place)."""
        return [dict(module._diffusers_hook.get_hook(name).cache.values) for module, name in self._hooked]

    def restore(self, snapshot: list[dict[str, Any]]) -> None:
        for (module, name), values in zip(self._hooked, snapshot, strict=True):
            module._diffusers_hook.get_hook(name).cache = _BranchCache(dict(values))

    def reset(self) -> None:
        for module, name in self._hooked:
            module._diffusers_hook.get_hook(name).reset_state(module)

    def wrap(self, denoise: Denoiser) -> Denoiser:
        """The denoiser with the step index published to the hooks; a step index that goes back starts a new run."""

        def cached(x: torch.Tensor, t: float, step_index: int) -> torch.Tensor:
            if step_index <= self.context.step_index:
                self.reset()
            self.context.step_index = step_index
            self.context.calls += 1
            return denoise(x, t, step_index)

        return cached

    def remove(self) -> None:
        """Detach every hook: the network's forwards are exactly what they were before."""
        for module, name in self._hooked:
            registry = module._diffusers_hook
            registry.remove_hook(name, recurse=False)
            if not registry.hooks:  # leave no trace: drop the registry and the instance-level forward it set
                del module._diffusers_hook
                bound = module.__dict__.get("forward")
                if getattr(bound, "__func__", None) is type(module).forward:
                    del module.forward
        self._hooked.clear()

    def __enter__(self) -> CacheRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
