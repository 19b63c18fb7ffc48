"""CacheQuant (Liu et al., "CacheQuant: Comprehensively Accelerated Diffusion Models", CVPR 2025), its caching half.

- space: `cachequant` (`spaces/cache_interval.py`): the refresh steps of one cached unit (a DiT block range, or a
  UNet's DeepCache branch); between refreshes the unit's residual is reused (`runtime/cache_hooks.py`).
- strategy: `dp` (`search/dynamic.py`): §3.2's dynamic programme over the unit's step-to-step L1 feature distance,
  groups of length ⌈N/2⌉..2N, swept over the interval N. Full precision only, like the released code.
- model-side work (`prepare`): the distance table from one full run on 8 calibration samples
  (`calibration/unit_features.py`), computed once per (calibration set, solver plan, unit) and kept beside the
  teacher images.
- also: the DP's placements seed ECAD's (and pymoo's) `cache` space (`cache_space_seeds`), with and without block
  skipping; uniform FORA / DeepCache refresh is one placement of each refresh count, the DP's is another.
"""

from __future__ import annotations

from typing import Any

from schedsearch.methods.base import Procedure

__all__ = ["CacheQuant", "cache_space_seeds", "dp_distance", "dp_seed_genomes"]

FEATURE_SAMPLES = 8  # calibration samples of the feature run (§3.2 uses a small calibration batch)


class CacheQuant(Procedure):
    name = "dp"
    title = "CacheQuant (Liu et al., CVPR 2025): dynamic-programming refresh steps"
    spaces = ("cachequant",)
    computes = "distance"
    computes_what = "the unit's feature-distance table (methods.cachequant.dp_distance)"

    def compute(self, model: Any, calibration: Any, space: Any, config: Any) -> Any:
        return dp_distance(model, calibration, space)

    def build(self, space: Any, n_objectives: int, seed: int, options: dict[str, Any]) -> Any:
        from schedsearch.search.dynamic import DPStrategy

        return DPStrategy(space.genome, n_objectives, seed=seed, encode=getattr(space, "refresh_genome", None),
                          **options)


def dp_distance(model: Any, calibration: Any, space: Any) -> Any:
    """CacheQuant §3.2: the unit's step-to-step feature distances (T × T) over the evaluated steps of
    `space.solver`, from one full run on the first 8 calibration samples; cached beside the teacher images."""
    from schedsearch.calibration.unit_features import unit_feature_distances
    from schedsearch.spaces.schedule import Schedule

    spec = calibration.spec
    k = min(FEATURE_SAMPLES, len(spec))
    unit = (space.group, *space.unit)
    table = calibration.cached_array(
        "unit_distances", f"{Schedule(spec.model, space.solver).key}{unit}{k}",
        lambda: unit_feature_distances(model, space.solver, unit, list(spec.conditions[:k]), list(spec.seeds[:k]),
                                       spec.guidance))
    offset = space.solver.num_steps - space.solver.nfe
    return table[offset:, offset:]


def dp_seed_genomes(model: Any, calibration: Any, space: Any) -> list[Any]:
    """Ours: the DP's refresh steps for every interval of its sweep, for the whole block stack, as `cache`-space
    genomes without and with block skipping. The DP places as many refreshes as FORA every N where the features
    change most, so the GA starts past those baselines."""
    from schedsearch.search.dynamic import dp_sweep
    from schedsearch.spaces.cache_interval import CacheIntervalSpace

    unit_space = CacheIntervalSpace(space.structure, solver=space.solver)
    offset = space.solver.num_steps - space.solver.nfe
    plans = dp_sweep(dp_distance(model, calibration, unit_space), step_offset=offset)
    return [space.encode(space.refresh_schedule(p.refresh_steps, skip))
            for p in plans.values() for skip in (False, True)]


def cache_space_seeds(model: Any, calibration: Any, space: Any, options: dict[str, Any]) -> list[Any]:
    """Extra seeds of a GA on the `cache` space: the user's `seeds` if given, else the DP's placements where the
    space can skip blocks (the residual reuse the DP's distance describes)."""
    if "seeds" in options:
        return list(options["seeds"])
    return dp_seed_genomes(model, calibration, space) if space.block_skip else []
