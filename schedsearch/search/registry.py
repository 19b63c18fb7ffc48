"""Strategies by CLI name, their presets, and which spaces each makes sense on. No torch.

`quick` shrinks populations so that every strategy finishes on 2 CPU cores in minutes; `paper` keeps the seed
methods' published defaults (ECAD population 72, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from schedsearch.search.base import Strategy, as_value_matrix, genome_key
from schedsearch.spaces.base import SearchSpace

STRATEGIES = ("ecad", "nsga2", "tpe", "optuna-nsga2", "dp", "predictor", "dc-fit")
PRESETS = ("quick", "paper")
# Strategies tied to one space: they are the seed method's own procedure for that representation.
ONLY_ON = {"dp": "cachequant", "dc-fit": "dc"}


class FixedStrategy(Strategy):
    """Asks a precomputed list of genomes once (dc-fit's fitted ratios, imported schedules), then nothing."""

    name = "fixed"

    def __init__(self, spec: Any, n_objectives: int, *, seed: int = 0, initial: Sequence[np.ndarray] = (),
                 genomes: Sequence[np.ndarray] = ()) -> None:
        super().__init__(spec, n_objectives, seed=seed, initial=initial)
        self._pending = [spec.clip(g) for g in genomes]
        self.values = np.zeros((0, n_objectives))

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        count = len(self._pending) if n is None else n
        out, self._pending = self._pending[:count], self._pending[count:]
        return out

    def tell(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        self.values = np.concatenate([self.values, as_value_matrix(values, len(genomes), self.n_objectives)])

    def warm_start(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        done = {genome_key(g) for g in genomes}
        self._pending = [g for g in self._pending if genome_key(g) not in done]


def check_combination(strategy: str, space: str) -> None:
    """A combination that makes no sense is an error before any work (issue: dp on the solver space)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy: unknown {strategy!r}; choose from {', '.join(STRATEGIES)}")
    needed = ONLY_ON.get(strategy)
    if needed is not None and space != needed:
        raise ValueError(
            f"--strategy {strategy} works on --space {needed} only (it is the seed method's own procedure for that "
            f"representation), not on --space {space}"
        )


def make_strategy(
    name: str,
    space: SearchSpace,
    n_objectives: int,
    *,
    preset: str = "quick",
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> Strategy:
    """Build a strategy seeded with the space's encoded baselines (ECAD/S³ seed their first population so)."""
    check_combination(name, space.name)
    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown {preset!r}; choose from {', '.join(PRESETS)}")
    opts = dict(options or {})
    quick = preset == "quick"
    initial = [space.encode(s) for _, s in space.baselines()] + list(opts.pop("seeds", []))
    forbid = space.all_recompute_genomes() if hasattr(space, "all_recompute_genomes") else []
    spec = space.genome
    if name == "ecad":
        from schedsearch.search.genetic import EcadGenetic

        population = opts.pop("population", 16 if quick else 72)
        # generation 0 is every seed, however many (ECAD's gen_000 is its whole heuristic population)
        return EcadGenetic(spec, n_objectives, seed=seed, initial=initial, population=population,
                           forbid=forbid, **opts)
    if name == "nsga2":
        from schedsearch.search.pymoo_nsga import PymooNSGA

        population = opts.pop("population", 16 if quick else 72)
        return PymooNSGA(spec, n_objectives, seed=seed, initial=initial[:population], population=population,
                         forbid=forbid, **opts)
    if name in ("tpe", "optuna-nsga2"):
        from schedsearch.search.optuna_sampler import OptunaStrategy

        sampler = "tpe" if name == "tpe" else "nsga2"
        defaults = {"population": 16, "n_startup_trials": 8, "batch": 8} if quick else {}
        return OptunaStrategy(spec, n_objectives, seed=seed, initial=initial, sampler=sampler, **{**defaults, **opts})
    if name == "predictor":
        from schedsearch.search.predictor import PredictorSearch

        defaults = {"initial_size": max(12, min(len(initial), 24)), "batch": 8, "n_estimators": 50,
                    "evolution_generations": 60} if quick else {}
        return PredictorSearch(spec, n_objectives, seed=seed, initial=initial, forbid=forbid, **{**defaults, **opts})
    if name == "dp":
        from schedsearch.search.dynamic import DPStrategy

        if "distance" not in opts:
            raise ValueError("strategy dp: needs the unit feature-distance table (computed by the CLI/run_search)")
        return DPStrategy(spec, n_objectives, seed=seed, encode=getattr(space, "refresh_genome", None), **opts)
    if name == "dc-fit":
        if "genomes" not in opts:
            raise ValueError("strategy dc-fit: needs fitted ratio genomes (computed by the CLI/run_search)")
        return FixedStrategy(spec, n_objectives, seed=seed, genomes=opts["genomes"])
    raise AssertionError(name)
