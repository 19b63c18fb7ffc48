"""Denoisers made of several networks, one per noise range: Wan 2.2's high- and low-noise transformers.

WanPipeline.__call__ (diffusers pipeline_wan.py) runs `transformer` at every timestep t >= boundary_ratio · T and
`transformer_2` below, each with its own guidance scale. We keep both as one `ExpertPair` module, so that everything
which observes "the network" of a `LoadedModel` (the row counter of the evaluators, FlopCounterMode, the cache hooks)
sees every denoiser pass whichever transformer makes it: the denoiser calls the pair with the index of the expert
whose noise range the step lies in (`spaces.baselines.expert_of_time`, the one rule the spaces use too), and the pair
forwards the call to that transformer unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
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
