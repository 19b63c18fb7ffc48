"""The bilevel strategy (ours): solver phase then cache phase on the best solvers, resumable, on a synthetic problem
with a known structure and through a real study on the builtin DiT."""

from __future__ import annotations

import numpy as np
import pytest

from schedsearch.search.bilevel import BilevelSearch, Subproblem
from schedsearch.spaces.base import GenomeSpec

N_BITS = 10
SOLVER = GenomeSpec(("real", "real"), (0.0, 0.0), (1.0, 1.0), ("a", "b"))
BITS = GenomeSpec.bits(N_BITS, [f"m{i}" for i in range(N_BITS)])
JOINT = GenomeSpec.concat(SOLVER, BITS)
W = np.linspace(0.05, 0.5, N_BITS)  # the error of reusing each component


def objectives(genomes) -> np.ndarray:
    """(error, cost), both minimised: a solver of more steps (b) is slower and better, a = 0.3 is the best
    timestep placement; every reused component (bit 0) saves a tenth of the cost and adds its error."""
    rows = []
    for g in genomes:
        a, b, bits = g[0], g[1], np.asarray(g[2:])
        cost = (1 + 4 * b) * (0.1 + 0.9 * bits.mean())
        rows.append([(a - 0.3) ** 2 + 1 / (1 + 4 * b) + float(W @ (1 - bits)), cost])
    return np.array(rows)


def solver_sub() -> Subproblem:
    def lower(g):
        return np.asarray(g[:2], dtype=float) if np.all(np.asarray(g[2:]) == 1) else None

    return Subproblem(SOLVER, lambda s: np.concatenate([s, np.ones(N_BITS)]), lower)


def cache_for(genes: np.ndarray) -> Subproblem:
    genes = np.asarray(genes, dtype=float)

    def lower(g):
        g = np.asarray(g, dtype=float)
        return g[2:] if np.array_equal(g[:2], genes) and not np.all(g[2:] == 1) else None

    seeds = [np.where(np.arange(N_BITS) % k == 0, 1.0, 0.0) for k in (2, 3, 4)]
    return Subproblem(BITS, lambda c: np.concatenate([genes, c]), lower, seeds, [np.ones(N_BITS)])


def make(seed: int = 0) -> BilevelSearch:
    seeds = [np.concatenate([[a, b], np.ones(N_BITS)]) for a in (0.1, 0.5) for b in (0.0, 0.5, 1.0)]
    seeds.append(np.concatenate([[0.2, 0.2], np.zeros(N_BITS)]))  # a cached seed: not the solver phase's
    return BilevelSearch(JOINT, 2, seed=seed, initial=seeds, solver=solver_sub(), cache_for=cache_for,
                         solver_evaluations=20, anchors=2,
                         solver_options={"initial_size": 8, "batch": 4, "n_estimators": 10,
                                         "evolution_generations": 10},
                         cache_options={"population": 6})


def drive(strategy: BilevelSearch, evaluations: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    X, F = [], []
    while len(X) < evaluations:
        genomes = strategy.ask()
        assert genomes
        values = objectives(genomes)
        strategy.tell(genomes, values)
        X += genomes
        F += list(values)
    return X, F


def non_dominated_indices(F: np.ndarray) -> list[int]:
    return [i for i in range(len(F)) if not any(np.all(F[j] <= F[i]) and np.any(F[j] < F[i])
                                                for j in range(len(F)))]


def test_solver_phase_then_cache_phase_on_the_best_solvers() -> None:
    strategy = make()
    X, F = drive(strategy, 20 + 4 * 6)
    phase1 = np.array([x for x in X[:20]])
    assert np.all(phase1[:, 2:] == 1)  # the solver phase asks uncached genomes only
    assert len(X[:20]) == 20 and len({x.tobytes() for x in X}) == len(X)
    # the anchors: phase 1's non-dominated solvers with the least error (brute force)
    F1 = np.array(F[:20])
    front = non_dominated_indices(F1)
    expected = sorted(front, key=lambda i: (F1[i, 0], i))[:2]
    assert [a.tolist() for a in strategy.anchors] == [phase1[i, :2].tolist() for i in expected]
    later = np.array(X[20:])
    assert not np.any(np.all(later[:, 2:] == 1, axis=1))  # the cache phase never asks an uncached genome
    owners = [next(i for i, a in enumerate(strategy.anchors) if np.array_equal(x[:2], a)) for x in later]
    assert owners.count(0) == owners.count(1) == 12  # one generation each in turn
    # the cache phase's seeds (every 2nd/3rd/4th component) ran on each anchor
    for anchor in strategy.anchors:
        assert any(np.array_equal(x, np.concatenate([anchor, np.arange(N_BITS) % 2 == 0])) for x in later)


def test_a_resumed_bilevel_search_asks_what_the_uninterrupted_one_asks() -> None:
    whole = make(seed=3)
    X, F = drive(whole, 20 + 3 * 6)  # phase 1, then three generations (anchor 0, 1, 0)
    resumed = make(seed=3)
    resumed.warm_start(X, np.array(F))
    assert [a.tolist() for a in resumed.anchors] == [a.tolist() for a in whole.anchors]
    assert np.array_equal(np.array(whole.ask()), np.array(resumed.ask()))


def test_a_resumed_solver_phase_continues_it() -> None:
    whole = make()
    X, F = drive(whole, 12)
    resumed = make()
    resumed.warm_start(X, np.array(F))
    assert resumed.anchors == [] and resumed.batch_size == 4
    assert np.all(np.array(resumed.ask())[:, 2:] == 1)


def test_sub_genomes_lifting_to_one_genome_are_told_each() -> None:
    """Two cache sub-genomes may lift to one joint genome (a gene the plan does not use); asked twice in a batch,
    the genome is told twice, each to the engine that asked it."""

    def coarse_cache_for(genes: np.ndarray) -> Subproblem:
        sub = cache_for(genes)
        return Subproblem(BITS, lambda c: np.concatenate([genes, c[:4], np.ones(N_BITS - 4)]), sub.lower, sub.initial,
                          sub.forbid)

    strategy = make()
    strategy.cache_for = coarse_cache_for
    X, _ = drive(strategy, 20 + 6 * 6)
    keys = [x.tobytes() for x in X[20:]]
    assert len(set(keys)) < len(keys)  # duplicates did occur, and every one was told
    assert not strategy._asked


def test_telling_a_genome_it_did_not_ask_is_an_error() -> None:
    strategy = make()
    strategy.ask()
    with pytest.raises(ValueError, match="did not ask"):
        strategy.tell([np.zeros(JOINT.size)], np.zeros((1, 2)))


def test_bilevel_is_refused_where_it_cannot_work() -> None:
    from schedsearch.errors import UserInputError
    from schedsearch.methods import check_combination

    with pytest.raises(UserInputError, match="--strategy"):
        check_combination("bilevel", "cache")
    for bad in (0, 1, 1.5, "half"):
        with pytest.raises(UserInputError, match="solver_share"):
            check_combination("bilevel", "joint", {"solver_share": bad})
    for bad in (1, 65, True):
        with pytest.raises(UserInputError, match="--screen"):
            check_combination("bilevel", "joint", {"screen": bad})
    check_combination("bilevel", "joint", {"screen": 0, "solver_share": 0.25})
    with pytest.raises(UserInputError, match="bilevel"):
        check_combination("ecad", "joint", {"solver_share": 0.5})


def test_a_bilevel_study_on_the_builtin_dit(builtin_model, tmp_path) -> None:
    from schedsearch.results.store import ResultStore
    from schedsearch.search.base import Budget
    from schedsearch.study import build_space, run_search

    result = run_search(model=builtin_model, space="joint", strategy="bilevel", objectives=["psnr", "macs"],
                        study="b", store=tmp_path / "r.db", budget=Budget(evaluations=24), samples=2,
                        cache_dir=tmp_path / "c", space_options={"nfe_range": (4, 5)}, validate=False,
                        progress=False, strategy_options={"population": 4, "solver_share": 0.5, "screen": 4})
    assert result.failed == 0 and result.evaluations == 24
    with ResultStore(tmp_path / "r.db") as store:
        records = store.records("b")
    schedules = [r.to_schedule() for r in records]
    assert all(s.cache is None for s in schedules[:12])
    cached = schedules[12:]
    assert cached and all(s.cache is not None for s in cached)
    # every cached schedule runs on one of the two best uncached solvers by PSNR on the front
    space = build_space("joint", builtin_model.info, "quick", {"nfe_range": (4, 5)})
    solvers = {s.solver for s in cached}
    assert len(solvers) == 2
    best = sorted(records[:12], key=lambda r: -r.metrics["psnr"])[0].to_schedule().solver
    assert best in solvers and all(space.decode(space.encode(s)).key == s.key for s in cached)
    # one reuse-error table and one DP feature table per anchor, kept beside the teacher
    assert len(list((tmp_path / "c").rglob("reuse_errors_*.npy"))) == 2


def test_phase_one_counts_distinct_solvers_as_the_store_does() -> None:
    """Two proposals that decode to one schedule leave one record (the second is answered from the store): phase 1
    still ends after `solver_evaluations` tells (a repeating predictor cannot hold it up), its anchors come from the
    distinct solvers, and a study rebuilt from its records (one per schedule) picks the same anchors and asks what
    the uninterrupted one asks."""
    step = 0.1

    def canonical(g):
        return np.concatenate([np.round(np.asarray(g[:2]) / step) * step, np.asarray(g[2:])])

    def lower(g):
        return canonical(g)[:2] if np.all(np.asarray(g[2:]) == 1) else None

    coarse = Subproblem(SOLVER, lambda s: np.concatenate([s, np.ones(N_BITS)]), lower)

    def build() -> BilevelSearch:
        strategy = make(seed=1)
        strategy.solver = coarse
        return strategy

    whole = build()
    asked, store = 0, {}
    while asked < 20:  # phase 1's batches end exactly at its 20 tells
        genomes = whole.ask()
        asked += len(genomes)
        values = objectives([canonical(g) for g in genomes])
        whole.tell(genomes, values)
        for g, v in zip(genomes, values, strict=True):
            store.setdefault(canonical(g).tobytes(), (canonical(g), v))
    assert asked == 20 and len(store) < 20 and not whole.anchors  # repeats happened; phase 1 is over all the same
    for _ in range(3):
        genomes = whole.ask()
        values = objectives(genomes)
        whole.tell(genomes, values)
        for g, v in zip(genomes, values, strict=True):
            store.setdefault(g.tobytes(), (g, v))
    resumed = build()
    resumed.warm_start([g for g, _ in store.values()], np.array([v for _, v in store.values()]))
    assert [a.tolist() for a in resumed.anchors] == [a.tolist() for a in whole.anchors]
    assert np.array_equal(np.array(whole.ask()), np.array(resumed.ask()))
