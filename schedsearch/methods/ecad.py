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
- ours, off by default (`screen`: a pool factor, e.g. 8): each generation breeds `screen` times the children it
  evaluates and runs those the reuse-error predictor (`calibration/reuse_errors.py`: CacheQuant's distance table per
  component, composed along the plan) and the exact cost objectives rank best; generation 0 is then bounded to
  `population` seeds (`initial_limit`), the best predicted, and the other seeds wait as immigrants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from schedsearch.errors import UserInputError
from schedsearch.methods.base import Method

__all__ = ["Ecad", "reuse_error_model", "screen_for", "shifted_refresh_genomes"]


class Ecad(Method):
    name = "ecad"
    title = "ECAD (Aggarwal et al. 2025): NSGA-II over recompute bits"
    recipe_options = ("shift_seeds", "screen")
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {"quick": {"population": 16}, "paper": {"population": 72}}

    def check(self, space: str, options: Mapping[str, Any]) -> None:
        super().check(space, options)
        if options.get("shift_seeds") and space != "cache":
            raise UserInputError("--shift-seeds", f"seeds the ecad strategy on --space cache only, not on {space}",
                                 "drop it")
        screen = options.get("screen")
        if screen is not None:
            if space != "cache":
                raise UserInputError("--screen", f"predicts component cache plans (--space cache), not {space}",
                                     "drop it")
            if isinstance(screen, bool) or not isinstance(screen, int) or not 2 <= screen <= 64:
                raise UserInputError("--screen", f"{screen!r} is not a pool factor", "give an integer in 2..64, "
                                     "e.g. 8 (children bred per child evaluated)")

    def prepare(self, model: Any, calibration: Any, space: Any, config: Any,
                objectives: Sequence[Any] = ()) -> dict[str, Any]:
        from schedsearch.methods.cachequant import cache_space_seeds

        options = dict(config.strategy_options)
        shift = options.pop("shift_seeds", config.preset != "quick")
        pool = options.pop("screen", None)
        if space.name != "cache":
            return options
        seeds = cache_space_seeds(model, calibration, space, options)
        if shift:
            own = [space.encode(s) for _, s in space.baselines()]
            seeds += shifted_refresh_genomes(space, own + seeds)
        options["seeds"] = seeds
        if pool is not None:
            options["surrogate"] = screen_for(space, reuse_error_model(model, calibration, space), objectives)
            options["screen_pool"] = pool
            options.setdefault("initial_limit", options.get("population") or self.presets[config.preset][
                "population"])
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


def reuse_error_model(model: Any, calibration: Any, space: Any) -> Any:
    """The reuse-error table of `space.solver` from one full run on the first 8 calibration samples (as
    CacheQuant's feature run), kept beside the teacher images (computed once per calibration set and plan)."""
    from schedsearch.calibration.reuse_errors import ReuseErrorModel, component_distances
    from schedsearch.methods.cachequant import FEATURE_SAMPLES
    from schedsearch.spaces.schedule import Schedule

    spec = calibration.spec
    k = min(FEATURE_SAMPLES, len(spec))
    conditions = spec.conditions if not isinstance(spec.conditions, Sequence) else list(spec.conditions[:k])
    table = calibration.cached_array(
        "reuse_errors", f"{Schedule(spec.model, space.solver).key}{space.layout}{k}",
        lambda: component_distances(model, space.solver, conditions, list(spec.seeds[:k]), spec.guidance).distances)
    return ReuseErrorModel(space.layout, table)


def screen_for(space: Any, errors: Any, objectives: Sequence[Any]) -> Any:
    """The GA's screen on a `cache` space: per genome, each cost objective's exact value (no sampling) and, for
    every image objective, the predicted reuse error; all minimised (a `max` cost is negated)."""
    import numpy as np

    if not objectives:
        raise ValueError("screen: the study's objectives are needed (run_search passes them to prepare)")

    def predict(genomes: Sequence[Any]) -> Any:
        rows = []
        for genome in genomes:
            schedule = space.decode(genome)
            error = errors.error(schedule.cache)
            row = []
            for objective in objectives:
                if objective.kind == "cost":
                    value = objective.value(schedule)
                    row.append(value if objective.direction == "min" else -value)
                else:
                    row.append(error)
            rows.append(row)
        return np.array(rows, dtype=float)

    return predict
