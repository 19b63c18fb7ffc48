"""Strategies on analytic problems: ZDT1 (real genes) and a bi-objective bit problem with a brute-forced front."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import optuna
import pytest
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from schedsearch.search import EcadGenetic, OptunaStrategy, PredictorSearch, PymooNSGA
from schedsearch.search.base import Strategy
from schedsearch.spaces.base import GenomeSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)

# ---- problems -------------------------------------------------------------------------------------------------------
ZDT_N = 10
ZDT_SPEC = GenomeSpec(("real",) * ZDT_N, (0.0,) * ZDT_N, (1.0,) * ZDT_N)
ZDT_REF = np.array([1.1, 1.1])


def zdt1(x: np.ndarray) -> np.ndarray:
    g = 1 + 9 * np.mean(x[1:])
    return np.array([x[0], g * (1 - np.sqrt(x[0] / g))])


def zdt1_true_hv() -> float:
    f1 = np.linspace(0, 1, 4001)
    return HV(ref_point=ZDT_REF)(np.c_[f1, 1 - np.sqrt(f1)])


BITS = 10
BIT_SPEC = GenomeSpec.bits(BITS)
WEIGHTS = np.array([5.0, 3.0, 8.0, 1.0, 9.0, 2.0, 7.0, 4.0, 6.0, 10.0])
ALL_ONES = np.ones(BITS)


def bit_problem(x: np.ndarray) -> np.ndarray:
    """Minimise (ones, lost weight + 4 × adjacent pairs of ones): a conflict with a non-trivial front."""
    return np.array([x.sum(), WEIGHTS @ (1 - x) + 4.0 * float(x[:-1] @ x[1:])])


def all_bit_genomes() -> np.ndarray:
    return np.array(list(itertools.product((0.0, 1.0), repeat=BITS)))


def front(F: np.ndarray) -> np.ndarray:
    F = F[np.isfinite(F).all(axis=1)]
    return np.unique(F[NonDominatedSorting().do(F, only_non_dominated_front=True)], axis=0)


def true_bit_front(exclude: np.ndarray | None = None) -> np.ndarray:
    genomes = all_bit_genomes()
    if exclude is not None:
        genomes = genomes[~np.all(genomes == exclude, axis=1)]
    return front(np.array([bit_problem(x) for x in genomes]))


# ---- the loop -------------------------------------------------------------------------------------------------------
def run(strategy: Strategy, problem: Callable[[np.ndarray], np.ndarray], batches: int,
        n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    X, F = [], []
    for _ in range(batches):
        genomes = strategy.ask(n)
        values = np.array([problem(g) for g in genomes])
        strategy.tell(genomes, values)
        X += genomes
        F += list(values)
    return np.array(X), np.array(F)


def hv(values: np.ndarray, ref: np.ndarray) -> float:
    inside = values[np.isfinite(values).all(axis=1) & np.all(values <= ref, axis=1)]
    return float(HV(ref_point=ref)(inside)) if len(inside) else 0.0


def random_hv(spec: GenomeSpec, problem: Callable, budget: int, ref: np.ndarray, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    return hv(np.array([problem(spec.random(rng)) for _ in range(budget)]), ref)


BIT_REF = np.array([BITS + 1.0, WEIGHTS.sum() + 1.0])

MAKERS: dict[str, Callable[..., Strategy]] = {
    "ecad": lambda spec, **kw: EcadGenetic(spec, 2, population=kw.pop("population", 24), **kw),
    "pymoo": lambda spec, **kw: PymooNSGA(spec, 2, population=kw.pop("population", 24), **kw),
    "optuna-nsga2": lambda spec, **kw: OptunaStrategy(spec, 2, sampler="nsga2", population=kw.pop("population", 24),
                                                      **kw),
    "optuna-tpe": lambda spec, **kw: OptunaStrategy(spec, 2, sampler="tpe", batch=8, **kw),
    "predictor": lambda spec, **kw: PredictorSearch(spec, 2, initial_size=24, batch=8, surrogate="gradient_boosting",
                                                    n_estimators=20, evolution_population=32,
                                                    evolution_generations=10, **kw),
}


# ---- quality on ZDT1 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [EcadGenetic, PymooNSGA])
def test_nsga_zdt1_hypervolume_approaches_the_true_front(make: type[Strategy]) -> None:
    budget_generations = 40
    X, F = run(make(ZDT_SPEC, 2), zdt1, budget_generations)  # population 72 (the ECAD default): 2,880 evaluations
    ratio = hv(F, ZDT_REF) / zdt1_true_hv()
    assert ratio >= 0.93, ratio
    assert random_hv(ZDT_SPEC, zdt1, len(F), ZDT_REF) < 0.5 * zdt1_true_hv()  # the bar is not trivial
    assert all(((x >= 0) & (x <= 1)).all() for x in X)


def test_optuna_nsga2_zdt1_beats_random_sampling() -> None:
    _, F = run(OptunaStrategy(ZDT_SPEC, 2, sampler="nsga2", population=24), zdt1, 12)
    ref = np.array([1.1, 8.0])
    assert hv(F, ref) > random_hv(ZDT_SPEC, zdt1, len(F), ref) + 0.3


def test_predictor_zdt1_beats_random_sampling() -> None:
    spec = GenomeSpec(("real",) * 6, (0.0,) * 6, (1.0,) * 6)
    strategy = MAKERS["predictor"](spec)
    _, F = run(strategy, zdt1, 6)  # 24 + 5 × 8 = 64 evaluations
    ref = np.array([1.1, 8.0])
    randoms = [random_hv(spec, zdt1, len(F), ref, seed) for seed in range(5)]
    assert hv(F, ref) > max(randoms), (hv(F, ref), randoms)
    rho = strategy.rank_correlations
    assert [r["stage"] for r in rho] == [1, 2, 3, 4, 5] and all(r["n"] == 8 for r in rho)


def test_predictor_ranks_a_smooth_problem_well() -> None:
    spec = GenomeSpec(("real",) * 6, (0.0,) * 6, (1.0,) * 6)

    def two_bowls(x: np.ndarray) -> np.ndarray:
        return np.array([np.sum((x - 0.2) ** 2), np.sum((x - 0.8) ** 2)])

    strategy = PredictorSearch(spec, 2, initial_size=24, batch=12, surrogate="gradient_boosting", n_estimators=30,
                               evolution_population=32, evolution_generations=15)
    run(strategy, two_bowls, 5)
    rho = np.array([[r["f0"], r["f1"]] for r in strategy.rank_correlations])
    assert rho.shape == (4, 2)
    assert (np.nanmean(rho, axis=0) > 0.5).all(), strategy.rank_correlations


def test_predictor_random_forest_default_runs_and_is_honest_about_an_unlearnable_problem() -> None:
    noise = np.random.default_rng(5)
    strategy = PredictorSearch(BIT_SPEC, 1, initial_size=16, batch=6, n_estimators=10, evolution_population=16,
                               evolution_generations=5)
    run(strategy, lambda x: np.array([noise.random()]), 4)
    assert len(strategy.rank_correlations) == 3
    assert abs(np.nanmean([r["f0"] for r in strategy.rank_correlations])) < 0.6  # noise has no learnable ranks


# ---- quality on the bit problem (true front by brute force over 2^10 genomes) ---------------------------------------
@pytest.mark.parametrize(("name", "batches"), [("ecad", 15), ("pymoo", 15), ("optuna-nsga2", 15), ("predictor", 9)])
def test_bit_problem_finds_the_brute_force_front(name: str, batches: int) -> None:
    _, F = run(MAKERS[name](BIT_SPEC), bit_problem, batches)
    truth = true_bit_front()
    found = front(F)
    share = np.mean([any((row == f).all() for f in found) for row in truth])
    assert share >= (1.0 if name in ("ecad", "pymoo") else 0.8), (name, share, len(F))
    rng = np.random.default_rng(0)
    rand = front(np.array([bit_problem(BIT_SPEC.random(rng)) for _ in range(len(F))]))
    assert np.mean([any((row == f).all() for f in rand) for row in truth]) < 1.0  # random sampling misses some


# ---- contract: determinism, seeds, forbid, failures, resumption ----------------------------------------------------
@pytest.mark.parametrize("name", list(MAKERS))
def test_same_seed_same_proposals_other_seed_other_ones(name: str) -> None:
    a, _ = run(MAKERS[name](BIT_SPEC, seed=3), bit_problem, 3)
    b, _ = run(MAKERS[name](BIT_SPEC, seed=3), bit_problem, 3)
    c, _ = run(MAKERS[name](BIT_SPEC, seed=4), bit_problem, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", list(MAKERS))
def test_seeded_initial_genomes_come_first(name: str) -> None:
    seeds = [np.r_[np.ones(5), np.zeros(5)], np.r_[np.zeros(5), np.ones(5)], np.tile([1.0, 0.0], 5)]
    first = MAKERS[name](BIT_SPEC, initial=seeds).ask()
    for s in seeds:
        assert any(np.array_equal(s, g) for g in first), name
    assert len({g.tobytes() for g in first}) == len(first)


@pytest.mark.parametrize("name", ["ecad", "pymoo", "predictor"])
def test_forbidden_genome_is_never_proposed(name: str) -> None:
    genomes = all_bit_genomes()
    values = np.array([bit_problem(x) for x in genomes])
    best_f2 = genomes[np.argmin(values[:, 1])]  # Pareto-optimal: a search without `forbid` would propose it
    assert (values[:, 1] == values[:, 1].min()).sum() == 1
    other = np.r_[np.ones(2), np.zeros(8)]
    strategy = MAKERS[name](BIT_SPEC, forbid=[best_f2], initial=[best_f2, other])
    X, F = run(strategy, bit_problem, 10 if name != "predictor" else 5)
    assert not any(np.array_equal(x, best_f2) for x in X)
    assert any(np.array_equal(x, other) for x in X[:24])
    assert np.array_equal(front(F), true_bit_front(exclude=best_f2)) or name == "predictor"


def test_ecad_forbid_on_a_tiny_space_still_fills_generations() -> None:
    spec = GenomeSpec.bits(3)
    strategy = EcadGenetic(spec, 2, population=8, forbid=[np.ones(3)])
    X, _ = run(strategy, lambda x: np.array([x.sum(), 3 - x.sum()]), 5)
    assert not (X == 1).all(axis=1).any()


@pytest.mark.parametrize("name", list(MAKERS))
def test_failed_candidates_are_tolerated(name: str) -> None:
    def flaky(x: np.ndarray) -> np.ndarray:
        return np.full(2, np.inf) if x[0] == 1 and x[1] == 1 else bit_problem(x)

    strategy = MAKERS[name](BIT_SPEC)
    _, F = run(strategy, flaky, 6)
    assert (~np.isfinite(F).all(axis=1)).any()  # failures did happen
    assert len(front(F)) >= 3
    if isinstance(strategy, EcadGenetic | PymooNSGA):
        survivors = np.array(strategy.population_genomes())
        assert not ((survivors[:, 0] == 1) & (survivors[:, 1] == 1)).any()  # failed ones never survive
    if isinstance(strategy, OptunaStrategy):
        states = {t.state for t in strategy.study.trials}
        assert optuna.trial.TrialState.FAIL in states and optuna.trial.TrialState.RUNNING not in states


def test_ecad_resumed_after_a_generation_asks_what_the_uninterrupted_run_asks() -> None:
    whole = EcadGenetic(BIT_SPEC, 2, population=24, seed=7)
    g1 = whole.ask()
    f1 = np.array([bit_problem(g) for g in g1])
    whole.tell(g1, f1)
    resumed = EcadGenetic(BIT_SPEC, 2, population=24, seed=7)
    resumed.warm_start(g1, f1)
    assert np.array_equal(np.array(whole.ask()), np.array(resumed.ask()))


def test_ecad_resumed_with_new_seeds_evaluates_them_first() -> None:
    """A study resumed with seeds it has not evaluated (a newer schedsearch, or seeds given on resume) asks for
    exactly those first, then goes on breeding from the stored population."""
    old_seeds = [np.eye(BITS)[i] for i in range(3)]
    first = EcadGenetic(BIT_SPEC, 2, population=8, seed=3, initial=old_seeds)
    g1 = first.ask()
    f1 = np.array([bit_problem(g) for g in g1])
    new_seed = np.eye(BITS)[5] + np.eye(BITS)[6]
    resumed = EcadGenetic(BIT_SPEC, 2, population=8, seed=3, initial=[*old_seeds, new_seed])
    resumed.warm_start(g1, f1)
    asked = resumed.ask()
    assert len(asked) == 1 and np.array_equal(asked[0], new_seed)
    resumed.tell(asked, np.array([bit_problem(asked[0])]))
    offspring = resumed.ask()
    assert len(offspring) == 8 and not any(np.array_equal(o, g) for o in offspring for g in g1)


@pytest.mark.parametrize(("name", "before", "after"), [("ecad", 6, 8), ("pymoo", 6, 8), ("predictor", 4, 5)])
def test_warm_start_continues_the_search(name: str, before: int, after: int) -> None:
    first = MAKERS[name](BIT_SPEC, seed=1)
    X, F = run(first, bit_problem, before)
    resumed = MAKERS[name](BIT_SPEC, seed=1)
    resumed.warm_start(list(X), F)
    again = MAKERS[name](BIT_SPEC, seed=1)
    again.warm_start(list(X), F)
    X2, F2 = run(resumed, bit_problem, after)
    assert np.array_equal(X2, run(again, bit_problem, after)[0])  # resumption is deterministic
    seen = {x.tobytes() for x in X}
    assert sum(x.tobytes() not in seen for x in X2) >= len(X2) // 2  # it goes on rather than restarting
    truth = true_bit_front()
    found = front(np.vstack([F, F2]))
    assert np.mean([any((row == f).all() for f in found) for row in truth]) >= 0.9
    if isinstance(resumed, EcadGenetic | PymooNSGA):
        assert len(resumed.population_genomes()) == 24


def test_pymoo_nsga3_for_three_objectives() -> None:
    strategy = PymooNSGA(BIT_SPEC, 3, population=24)
    X, _ = run(strategy, lambda x: np.r_[bit_problem(x), x[::-1] @ WEIGHTS], 4)
    assert type(strategy.algorithm).__name__ == "NSGA3" and len(X) >= 4 * 20


def test_optuna_storage_resumes_without_double_telling(tmp_path) -> None:
    storage = str(tmp_path / "study.journal")
    first = OptunaStrategy(BIT_SPEC, 2, sampler="nsga2", population=8, storage=storage, study_name="s")
    X, F = run(first, bit_problem, 3)
    dangling = first.ask(2)  # the process dies with these asked; one of them was evaluated and stored
    X = np.vstack([X, dangling[:1]])
    F = np.vstack([F, [bit_problem(dangling[0])]])
    del first

    resumed = OptunaStrategy(BIT_SPEC, 2, sampler="nsga2", population=8, storage=storage, study_name="s",
                             initial=[X[0]])
    resumed.warm_start(list(X), F)
    trials = resumed.study.trials
    assert len(trials) == 3 * 8 + 2
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == len(X)
    assert states.count(optuna.trial.TrialState.FAIL) == 1  # the dangling one without a record
    run(resumed, bit_problem, 2)
    assert len(resumed.study.trials) == 3 * 8 + 2 + 16  # the already-evaluated initial genome is not enqueued again


def test_optuna_in_memory_warm_start_adds_trials() -> None:
    X, F = run(MAKERS["optuna-tpe"](BIT_SPEC), bit_problem, 3)
    F[0] = np.inf
    resumed = MAKERS["optuna-tpe"](BIT_SPEC)
    resumed.warm_start(list(X), F)
    states = [t.state for t in resumed.study.trials]
    assert len(states) == len(X) and states.count(optuna.trial.TrialState.FAIL) == 1
    assert len(resumed.ask()) == 8


@pytest.mark.parametrize("name", list(MAKERS))
def test_genes_of_every_kind_stay_valid(name: str) -> None:
    spec = GenomeSpec(("bit", "int", "real", "int", "real"), (0.0, -2.0, 0.5, 4.0, 0.0), (1.0, 3.0, 0.75, 4.0, 1.0))
    strategy = MAKERS[name](spec, initial=[np.array([1.0, 3.0, 0.6, 4.0, 0.2])])
    X, _ = run(strategy, lambda x: np.array([x[0] + x[1] + x[2], x[4] - x[1]]), 4)
    assert all(np.array_equal(spec.clip(x), x) for x in X)
    assert set(X[:, 0]) <= {0.0, 1.0} and set(X[:, 1]) <= set(range(-2, 4)) and set(X[:, 3]) == {4.0}
    assert len(set(X[:, 1])) > 1 and len(set(X[:, 2])) > 1


def test_ecad_mutation_is_pymoo_bitflip_as_ecad_configures_it() -> None:
    """ECAD's code: `BitflipMutation(prob=0.05)` in pymoo 0.6 = 5% of children mutated, each bit flipped with 1/n.
    Our deap operator must match pymoo's own on the share of changed children and the bits flipped in them."""
    from pymoo.core.population import Population
    from pymoo.core.problem import Problem
    from pymoo.operators.mutation.bitflip import BitflipMutation

    n, trials = 228, 6000
    spec = GenomeSpec.bits(n)
    ga = EcadGenetic(spec, 2, seed=3)
    parent = [float(b) for b in np.random.default_rng(0).integers(0, 2, n)]
    with ga._deap_random():
        ours = np.array([ga._mutate(parent) for _ in range(trials)]) != np.array(parent)
    X = np.tile(np.array(parent, dtype=bool), (trials, 1))
    pop = BitflipMutation(prob=0.05).do(Problem(n_var=n, xl=0, xu=1, vtype=bool), Population.new("X", X),
                                        random_state=np.random.default_rng(4))
    theirs = pop.get("X") != X
    for flips in (ours, theirs):
        changed = flips.any(axis=1)
        assert 0.022 < changed.mean() < 0.043  # 0.05 × (1 − (1 − 1/n)^n) ≈ 0.032
        assert 1.2 < flips[changed].sum(axis=1).mean() < 2.0  # Poisson(1) given ≥ 1 flip: 1.58
    with pytest.raises(ValueError, match="mutation_prob"):
        EcadGenetic(spec, 2, mutation_prob=1.5)


def test_nsga2_mutation_flips_every_childs_bits_at_bit_flip_prob() -> None:
    """`nsga2` (pymoo) is named for what it runs: every child mutated, each bit flipped with `bit_flip_prob` (0.05),
    not ECAD's 5% of children. Its own operator, applied to copies of one parent, shows both halves of that."""
    from pymoo.core.population import Population

    n, trials = 228, 3000
    strategy = PymooNSGA(GenomeSpec.bits(n), 2, seed=0, population=8)
    mutation = strategy.algorithm.mating.mutation
    parent = np.random.default_rng(0).integers(0, 2, n).astype(bool)
    X = np.tile(parent, (trials, 1))
    pop = mutation.do(strategy.problem, Population.new("X", X), random_state=np.random.default_rng(1))
    flips = pop.get("X") != X
    assert flips.any(axis=1).mean() > 0.99  # ECAD's: ≈ 0.03 of children (test above)
    assert abs(flips.mean() - 0.05) < 0.003  # 5% of the bits, so ≈ 11 of 228 per child
    custom = PymooNSGA(GenomeSpec.bits(n), 2, seed=0, population=8, bit_flip_prob=0.01)
    pop = custom.algorithm.mating.mutation.do(custom.problem, Population.new("X", X),
                                              random_state=np.random.default_rng(1))
    assert abs((pop.get("X") != X).mean() - 0.01) < 0.002
