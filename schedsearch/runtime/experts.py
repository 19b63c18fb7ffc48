"""Denoisers made of several networks, one per noise range: Wan 2.2's high- and low-noise transformers.

WanPipeline.__call__ (diffusers pipeline_wan.py) runs `transformer` at every timestep t >= boundary_ratio · T and
`transformer_2` below, each with its own guidance scale. We keep both as one `ExpertPair` module, so that everything
which observes "the network" of a `LoadedModel` (the row counter of the evaluators, FlopCounterMode, the cache hooks)
sees every denoiser pass whichever transformer makes it: the denoiser calls the pair with the index of the expert
whose noise range the step lies in (`spaces.baselines.expert_of_time`, the one rule the spaces use too), and the pair
forwards the call to that transformer unchanged. Observers that hook the network's blocks by path
(`get_submodule("blocks.3")`: CacheQuant's unit features, the screen's reuse errors) get an `ExpertsAt`, which
registers their hooks on that block of each transformer, so they too see whichever transformer runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


class ExpertPair(torch.nn.Module):
    """The pipeline's `transformer` (expert 0: high noise) and `transformer_2` (expert 1: low noise) as one module.

    Both must have the same block structure (one cache-plan layout serves both: a plan's row at a step applies to
    whichever transformer runs that step); widths may differ. `config`, `dtype` and `device` are the first expert's,
    as WanPipeline reads them from `transformer` (its latents' channels, patch size and dtype)."""

    def __init__(self, high_noise: torch.nn.Module, low_noise: torch.nn.Module) -> None:
        super().__init__()
        self.experts = torch.nn.ModuleList([high_noise, low_noise])
        self._forced: int | None = None

    def forward(self, *args: Any, expert: int, **kwargs: Any) -> Any:
        chosen = expert if self._forced is None else self._forced
        return self.experts[chosen](*args, **kwargs)

    def get_submodule(self, target: str) -> Any:
        """A path inside the transformers ("blocks.0.attn1") names that module of each: an `ExpertsAt`."""
        if target == "" or target.split(".")[0] == "experts":
            return super().get_submodule(target)
        return ExpertsAt([expert.get_submodule(target) for expert in self.experts])

    @contextmanager
    def routed_to(self, expert: int) -> Iterator[None]:
        """Every call runs `expert` while open: how a cost table is measured per expert on one probe input."""
        self._forced = expert
        try:
            yield
        finally:
            self._forced = None

    @property
    def config(self) -> Any:
        return self.experts[0].config

    @property
    def dtype(self) -> torch.dtype:
        return self.experts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.experts[0].device


def experts_of(network: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """The networks that do the denoising: both transformers of an `ExpertPair`, else the network itself."""
    return tuple(network.experts) if isinstance(network, ExpertPair) else (network,)


class _Handles:
    """The hook handles of every expert, removed together."""

    def __init__(self, handles: Sequence[Any]) -> None:
        self.handles = list(handles)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ExpertsAt:
    """One submodule path in every expert of an `ExpertPair`: forward (pre-)hooks registered here are registered on
    each expert's module (the hook gets the module that ran), and an attribute that is a module in each is another
    `ExpertsAt` (a block's "attn1")."""

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.modules_each = tuple(modules)

    def register_forward_hook(self, hook: Any, **kwargs: Any) -> _Handles:
        return _Handles([m.register_forward_hook(hook, **kwargs) for m in self.modules_each])

    def register_forward_pre_hook(self, hook: Any, **kwargs: Any) -> _Handles:
        return _Handles([m.register_forward_pre_hook(hook, **kwargs) for m in self.modules_each])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "modules_each":
            raise AttributeError(name)
        found = [getattr(m, name) for m in self.modules_each]
        if all(f is None for f in found):
            return None
        if all(isinstance(f, torch.nn.Module) for f in found):
            return ExpertsAt(found)
        raise AttributeError(f"ExpertsAt: {name!r} is not a submodule of every expert")
