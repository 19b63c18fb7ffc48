"""ECAD (Aggarwal et al. 2025, "Evolutionary Caching to Accelerate Your Off-the-Shelf Diffusion Model").

- space: `cache` (`spaces/cache_mask.py`): one recompute bit per step × block × component (ECAD's binary cache
  schedule), plus ours: a bit that skips fully reused blocks whole (FORA/DeepCache residual reuse).
- strategy: `ecad` (`search/genetic.py`): NSGA-II selection, 4-point crossover p=0.9, bit-flip mutation as the
  released code runs pymoo's `BitflipMutation(prob=0.05)` (5% of children, 1/n per bit), population 72 (`paper`),
  constraint ≠ all-recompute. Generation 0 is every seed.
- runtime: diffusers hooks that reuse a component's output (`runtime/cache_hooks.py`).
- seeds: ECAD's heuristic population (FORA every N, per-component every N, evenly spaced, block subsets; the
  space's `baselines()`), and ours: windowed FORA, CacheQuant's DP placements (`methods/cachequant.py`) and
  (`shift_seeds`, on outside the quick preset) every whole-stack refresh with one refresh moved a step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from schedsearch.errors import UserInputError
from schedsearch.methods.base import Method

__all__ = ["Ecad", "shifted_refresh_genomes"]


class Ecad(Method):
    name = "ecad"
    title = "ECAD (Aggarwal et al. 2025): NSGA-II over recompute bits"
    recipe_options = ("shift_seeds",)
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {"quick": {"population": 16}, "paper": {"population": 72}}

    def check(self, space: str, options: Mapping[str, Any]) -> None:
        super().check(space, options)
        if options.get("shift_seeds") and space != "cache":
            raise UserInputError("--shift-seeds", f"seeds the ecad strategy on --space cache only, not on {space}",
                                 "drop it")

    def prepare(self, model: Any, calibration: Any, space: Any, config: Any) -> dict[str, Any]:
        from schedsearch.methods.cachequant import cache_space_seeds

        options = dict(config.strategy_options)
        shift = options.pop("shift_seeds", config.preset != "quick")
        if space.name != "cache":
            return options
        seeds = cache_space_seeds(model, calibration, space, options)
        if shift:
            own = [space.encode(s) for _, s in space.baselines()]
            seeds += shifted_refresh_genomes(space, own + seeds)
        options["seeds"] = seeds
        return options

    def engine(self, space: Any, n_objectives: int, *, seed: int, preset: str, initial: Sequence[Any],
               forbid: Sequence[Any], options: dict[str, Any]) -> Any:
        from schedsearch.search.genetic import EcadGenetic

        # generation 0 is every seed, however many (ECAD's gen_000 is its whole heuristic population)
        return EcadGenetic(space.genome, n_objectives, seed=seed, initial=initial, forbid=forbid, **options)


def shifted_refresh_genomes(space: Any, genomes: Sequence[Any]) -> list[Any]:
    """Ours: every whole-stack refresh among `genomes` (of a `cache` space) with one refresh moved one step earlier
    or later, the refresh count (so the MACs) unchanged. Bit-flip mutation cannot make this move (it takes two whole
    rows flipped together), and uniform spacing is a convention, not an optimum: on the builtin DiT, FORA every 4's
    refresh at step 8 moved to 9 gains 0.23 dB at equal MACs. Inputs, duplicates and all-recompute are left out."""
    import numpy as np

    seen = {tuple(np.asarray(g, dtype=float)) for g in genomes}
    seen |= {tuple(g) for g in space.all_recompute_genomes()}
    out = []
    for genome in genomes:
        found = space.whole_stack_refresh(genome)
        if found is None:
            continue
        steps, skip = found
        for i, step in enumerate(steps[1:], start=1):
            for moved in (step - 1, step + 1):
                if moved <= space.first or moved >= space.num_steps or moved in steps:
                    continue
                new = sorted((*steps[:i], moved, *steps[i + 1 :]))
                g = space.encode(space.refresh_schedule(new, skip))
                if tuple(g) not in seen:
                    seen.add(tuple(g))
                    out.append(g)
    return out
