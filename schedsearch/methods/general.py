"""General-purpose multi-objective optimisers on any space: pymoo's NSGA-II/III and optuna's TPE and NSGA-II.

They are not seed methods; they are what a seed method is compared with, and a way to search a space no paper
searched (the joint space). Engines: `search/pymoo_nsga.py`, `search/optuna_sampler.py`.
On the `cache` space pymoo's NSGA-II starts, like ECAD, from CacheQuant's DP refresh placements
(`methods/cachequant.py`) besides the space's own seeds; it keeps only the first `population` of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from schedsearch.methods.base import Method

__all__ = ["TPE", "OptunaNSGA2", "PymooNSGA2"]


class PymooNSGA2(Method):
    name = "nsga2"
    title = "NSGA-II / NSGA-III (Deb et al. 2002; Deb & Jain 2014), pymoo's engine"
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {"quick": {"population": 16}, "paper": {"population": 72}}

    def prepare(self, model: Any, calibration: Any, space: Any, config: Any,
                objectives: Sequence[Any] = ()) -> dict[str, Any]:
        from schedsearch.methods.cachequant import cache_space_seeds

        options = dict(config.strategy_options)
        if space.name == "cache":
            options["seeds"] = cache_space_seeds(model, calibration, space, options)
        return options

    def engine(self, space: Any, n_objectives: int, *, seed: int, preset: str, initial: Sequence[Any],
               forbid: Sequence[Any], options: dict[str, Any]) -> Any:
        from schedsearch.search.pymoo_nsga import PymooNSGA

        population = options.pop("population")
        return PymooNSGA(space.genome, n_objectives, seed=seed, initial=list(initial)[:population],
                         population=population, forbid=forbid, **options)


class _Optuna(Method):
    sampler = ""
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "quick": {"population": 16, "n_startup_trials": 8, "batch": 8}, "paper": {}}

    def engine(self, space: Any, n_objectives: int, *, seed: int, preset: str, initial: Sequence[Any],
               forbid: Sequence[Any], options: dict[str, Any]) -> Any:
        from schedsearch.search.optuna_sampler import OptunaStrategy

        return OptunaStrategy(space.genome, n_objectives, seed=seed, initial=initial, sampler=self.sampler,
                              **options)


class TPE(_Optuna):
    name = "tpe"
    title = "optuna's TPE sampler (Bergstra et al. 2011; multi-objective: Ozaki et al. 2020)"
    sampler = "tpe"


class OptunaNSGA2(_Optuna):
    name = "optuna-nsga2"
    title = "optuna's NSGA-II sampler"
    sampler = "nsga2"
