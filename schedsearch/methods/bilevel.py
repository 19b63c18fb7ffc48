"""Bilevel (ours): S³'s predictor on the solver genes of the `joint` space, then ECAD's GA with the reuse-error screen
on the cache genes of the best solvers it found (`search/bilevel.py` says why two levels).

- space: `joint` only (solver × cache; the compensation genes stay at 1: DC-Solver's ratios are fitted, not searched,
  by `dc-fit` on the `dc` space).
- phase 1: S³'s predictor (`search/predictor.py`) on uncached solver schedules, seeded with every hand-made solver of
  the NFE range, for `solver_share` of the study's evaluation budget (`solver_evaluations` to give a count; 96
  when the budget is not in evaluations).
- phase 2: for each of the `anchors` best solver plans, the `cache` space of that plan (`spaces/cache_mask.py`)
  searched by ECAD's GA (`search/genetic.py`) from ECAD's heuristic seeds and CacheQuant's DP placements on that
  plan, screened (`screen`, default 8; 0 turns it off) by the reuse-error table measured on that plan
  (`calibration/reuse_errors.py`). Each anchor costs one 8-sample feature run for the DP seeds and one for the
  screen, cached beside the teacher images like the cache space's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from schedsearch.errors import UserInputError
from schedsearch.methods.base import Method

__all__ = ["Bilevel", "bilevel_subproblems"]

# engine option -> which level takes it
SOLVER_OPTIONS = ("initial_size", "batch", "surrogate", "n_estimators", "evolution_population",
                  "evolution_generations")
CACHE_OPTIONS = ("population", "crossover_points", "crossover_prob", "mutation_prob", "bit_flip_prob",
                 "screen_pool", "initial_limit")
DEFAULT_SOLVER_EVALUATIONS = 96  # phase 1 when the budget is not counted in evaluations


class Bilevel(Method):
    name = "bilevel"
    title = "Bilevel (ours): S³'s predictor on solver genes, then ECAD's screened GA on the best solvers' masks"
    spaces = ("joint",)
    recipe_options = ("screen", "solver_share")
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "quick": {"anchors": 2, "population": 16, "batch": 8, "n_estimators": 50, "evolution_generations": 60},
        "paper": {"anchors": 2, "population": 72}}

    def check(self, space: str, options: Mapping[str, Any]) -> None:
        super().check(space, options)
        share = options.get("solver_share")
        if share is not None and not (isinstance(share, int | float) and 0 < share < 1):
            raise UserInputError("strategy_options.solver_share", f"{share!r} is not a fraction in (0, 1)",
                                 "give e.g. 0.5 (half the evaluations search solvers, half their caching)")
        screen = options.get("screen")
        if screen is not None and (isinstance(screen, bool) or not isinstance(screen, int)
                                   or not (screen == 0 or 2 <= screen <= 64)):
            raise UserInputError("--screen", f"{screen!r} is not a pool factor", "give 0 (off) or 2..64, e.g. 8")

    def prepare(self, model: Any, calibration: Any, space: Any, config: Any,
                objectives: Sequence[Any] = ()) -> dict[str, Any]:
        options = dict(config.strategy_options)
        share = options.pop("solver_share", 0.5)
        screen = options.pop("screen", 8)
        if "solver_evaluations" not in options:
            total = config.budget.evaluations
            options["solver_evaluations"] = max(1, round(share * total)) if total else DEFAULT_SOLVER_EVALUATIONS
        options["solver"], options["cache_for"] = bilevel_subproblems(model, calibration, space, objectives, screen)
        if screen:
            options["screen_pool"] = screen
        return options

    def engine(self, space: Any, n_objectives: int, *, seed: int, preset: str, initial: Sequence[Any],
               forbid: Sequence[Any], options: dict[str, Any]) -> Any:
        from schedsearch.search.bilevel import BilevelSearch

        if "solver" not in options:
            raise UserInputError("strategy_options.solver", "bilevel needs the model to build its subproblems",
                                 "run it through run_search, which builds them")
        options = dict(options)
        solver_options = {k: options.pop(k) for k in SOLVER_OPTIONS if k in options}
        cache_options = {k: options.pop(k) for k in CACHE_OPTIONS if k in options}
        if "screen_pool" in cache_options:  # screened: generation 0 holds the best predicted seeds only
            cache_options.setdefault("initial_limit", cache_options.get("population", 72))
        seeds = sum(options["solver"].lower(g) is not None for g in initial)
        solver_options.setdefault("initial_size", min(seeds, max(12, options["solver_evaluations"] // 2)) or 12)
        return BilevelSearch(space.genome, n_objectives, seed=seed, initial=initial, solver_options=solver_options,
                             cache_options=cache_options, **options)


def bilevel_subproblems(model: Any, calibration: Any, space: Any, objectives: Sequence[Any],
                        screen: int | None) -> tuple[Any, Any]:
    """The solver subproblem of a `joint` space (uncached, compensation off) and the factory of each anchor's cache
    subproblem (its `cache` space's genes, seeds and screen, measured on the anchor's solver plan)."""
    import numpy as np

    from schedsearch.methods.cachequant import cache_space_seeds
    from schedsearch.methods.ecad import reuse_error_model, screen_for
    from schedsearch.search.bilevel import Subproblem
    from schedsearch.spaces.cache_mask import CacheMaskSpace
    from schedsearch.spaces.schedule import Schedule

    if space.name != "joint" or not space.cache:
        raise UserInputError("--space", "bilevel searches the joint space with its cache part",
                             "use --space joint (cache on)")
    size = space.solver_space.genome.size
    name = space.structure.name

    def lift_solver(genes: np.ndarray) -> np.ndarray:
        plan = space.decode(np.concatenate([genes, space.genome.clip(np.ones(space.genome.size))[size:]])).solver
        return space.encode(Schedule(name, plan))

    def lower_solver(genome: np.ndarray) -> np.ndarray | None:
        schedule = space.decode(genome)
        uncached = schedule.cache is None and all(step.dc_ratio == 1.0 for step in schedule.solver.steps)
        return space.genome.clip(genome)[:size] if uncached else None

    solver = Subproblem(space.solver_space.genome, lift_solver, lower_solver)

    def cache_for(genes: np.ndarray) -> Subproblem:
        plan = space.decode(lift_solver(genes)).solver
        sub = CacheMaskSpace(space.structure, solver=plan, block_skip=space.block_skip)

        def lift(bits: np.ndarray) -> np.ndarray:
            return space.encode(Schedule(name, plan, sub.decode(bits).cache))

        def lower(genome: np.ndarray) -> np.ndarray | None:
            schedule = space.decode(genome)
            if schedule.cache is None or schedule.solver != plan:
                return None
            return sub.encode(Schedule(name, plan, schedule.cache))

        initial = [sub.encode(s) for _, s in sub.baselines()] + cache_space_seeds(model, calibration, sub, {})
        surrogate = screen_for(sub, reuse_error_model(model, calibration, sub), objectives) if screen else None
        return Subproblem(sub.genome, lift, lower, initial, sub.all_recompute_genomes(), surrogate)

    return solver, cache_for
