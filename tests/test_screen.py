"""The reuse-error predictor and ECAD's screened GA (ours): known values, brute force, resumability, the run path."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from pymoo.indicators.hv import HV

from schedsearch.calibration.reuse_errors import ReuseErrorModel, component_distances
from schedsearch.search.genetic import EcadGenetic, rank_by_prediction
from schedsearch.spaces.base import GenomeSpec

# ---- the error model ------------------------------------------------------------------------------------------------


def brute_error(distances: np.ndarray, bits: np.ndarray) -> float:
    total = 0.0
    for c in range(bits.shape[1]):
        last = 0
        for i in range(bits.shape[0]):
            if bits[i, c]:
                last = i
            else:
                total += distances[c, last, i]
    return total


def test_error_composes_the_table_along_the_plan_as_brute_force() -> None:
    rng = np.random.default_rng(0)
    table = rng.random((5, 9, 9))
    model = ReuseErrorModel("x", table)
    for _ in range(50):
        bits = rng.random((9, 5)) < 0.5
        bits[0] = True
        assert model.error_of_bits(bits) == pytest.approx(brute_error(table, bits), rel=1e-12)
    assert model.error_of_bits(np.ones((9, 5), dtype=bool)) == 0.0
    bits = np.ones((9, 5), dtype=bool)
    bits[4, 2] = bits[5, 2] = False  # slot 2 reused at steps 4 and 5 from step 3
    assert model.error_of_bits(bits) == pytest.approx(table[2, 3, 4] + table[2, 3, 5])
    with pytest.raises(ValueError, match="does not fit"):
        model.error_of_bits(np.ones((8, 5), dtype=bool))


@pytest.fixture(scope="module")
def dit_errors(builtin_model):
    from schedsearch.study import build_space

    space = build_space("cache", builtin_model.info, "quick", {"num_steps": 6})
    return space, component_distances(builtin_model, space.solver, [1, 7], [0, 1])


def test_component_distances_on_the_builtin_dit(dit_errors) -> None:
    space, model = dit_errors
    table = model.distances
    assert table.shape == (len(space.slots), 6, 6)
    assert np.allclose(table, table.transpose(0, 2, 1))
    assert np.all(np.diagonal(table, axis1=1, axis2=2) == 0)
    off = table[:, ~np.eye(6, dtype=bool)]
    assert np.all(off > 0)
    # reusing further back errs more, on average over slots (features drift along the trajectory)
    assert table[:, 1, 5].mean() > table[:, 4, 5].mean()


def test_more_reuse_predicts_more_error(dit_errors) -> None:
    space, model = dit_errors
    errors = [model.error(space.refresh_schedule(list(range(0, 6, n))).cache) for n in (1, 2, 3, 5)]
    assert errors[0] == 0.0
    assert errors == sorted(errors) and len(set(errors)) == 4
    wrong = type(model)("other[1](a)", model.distances)
    with pytest.raises(ValueError, match=r"cache\.layout"):
        wrong.error(space.refresh_schedule([0, 3]).cache)


# ---- the screened GA ------------------------------------------------------------------------------------------------

N_BITS = 30
SPEC = GenomeSpec.bits(N_BITS)
W = np.random.default_rng(1).integers(1, 10, N_BITS).astype(float)


def knapsack(x: np.ndarray) -> np.ndarray:
    """Minimise (ones, lost weight + 3 × adjacent pairs of ones)."""
    x = np.asarray(x, dtype=float)
    return np.array([x.sum(), W @ (1 - x) + 3.0 * float(x[:-1] @ x[1:])])


def perfect(genomes) -> np.ndarray:
    return np.array([knapsack(g) for g in genomes])


def run(strategy: EcadGenetic, evaluations: int) -> np.ndarray:
    told: list[np.ndarray] = []
    while len(told) < evaluations:
        genomes = strategy.ask()
        values = perfect(genomes)
        strategy.tell(genomes, values)
        told += list(values)
    return np.array(told[:evaluations])


def test_rank_by_prediction_orders_by_front_then_crowding() -> None:
    values = np.array([[0.0, 4.0], [1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [4.0, 0.0], [2.0, 3.0], [5.0, 5.0]])
    # front 0 holds rows 0-4 (0 and 4 compete but are not candidates); 5 is front 1, 6 front 2
    order = rank_by_prediction(values, np.array([1, 2, 3, 5, 6]), 5)
    assert set(order[:3]) == {1, 2, 3} and order[3:] == [5, 6]
    assert rank_by_prediction(values, np.array([6, 5]), 1) == [5]
    # within a front the most isolated first: the extremes (infinite crowding), then the widest gap
    values = np.array([[0.0, 10.0], [1.0, 9.0], [2.0, 8.0], [8.0, 2.0], [10.0, 0.0]])
    assert rank_by_prediction(values, np.arange(5), 5)[:3] == [0, 4, 3]


def test_generation_zero_is_bounded_to_the_best_predicted_seeds() -> None:
    seeds = [np.array(b, dtype=float) for b in itertools.islice(itertools.product((0, 1), repeat=N_BITS), 1, 61)]
    ga = EcadGenetic(SPEC, 2, population=8, seed=0, initial=seeds, surrogate=perfect, initial_limit=8)
    first = ga.ask()
    assert len(first) == 8
    chosen = {tuple(g) for g in first}
    best = {tuple(seeds[i]) for i in rank_by_prediction(perfect(seeds), np.arange(60), 8)}
    assert chosen == best
    ga.tell(first, perfect(first))
    later: list[tuple] = []
    for _ in range(30):  # the other seeds enter through the screen when they compete
        asked = ga.ask()
        later += [tuple(g) for g in asked]
        ga.tell(asked, perfect(asked))
    assert {tuple(s) for s in seeds} - chosen & set(later)


def test_unscreened_bounded_seeds_spread_and_immigrate() -> None:
    seeds = [np.eye(N_BITS)[i] for i in range(20)]
    ga = EcadGenetic(SPEC, 2, population=8, seed=0, initial=seeds, initial_limit=4)
    first = ga.ask()
    assert len(first) == 8 and sum(any(np.array_equal(f, s) for s in seeds) for f in first) == 4
    ga.tell(first, perfect(first))
    second = ga.ask()
    immigrants = [g for g in second if any(np.array_equal(g, s) for s in seeds)]
    assert len(immigrants) == 2  # a quarter of the generation


def test_screened_ga_resumed_asks_what_the_uninterrupted_run_asks() -> None:
    seeds = [np.eye(N_BITS)[i] + np.eye(N_BITS)[(i + 5) % N_BITS] for i in range(30)]
    kwargs = dict(population=8, seed=4, initial=seeds, surrogate=perfect, screen_pool=6, initial_limit=8)
    whole = EcadGenetic(SPEC, 2, **kwargs)
    X, F = [], []
    for _ in range(3):
        genomes = whole.ask()
        X += genomes
        F += list(perfect(genomes))
        whole.tell(genomes, perfect(genomes))
    resumed = EcadGenetic(SPEC, 2, **kwargs)
    resumed.warm_start(X, np.array(F))
    assert np.array_equal(np.array(whole.ask()), np.array(resumed.ask()))


def test_a_good_screen_finds_more_at_equal_evaluations() -> None:
    ref = np.array([N_BITS + 1.0, W.sum() + 3.0 * N_BITS])
    hv = HV(ref_point=ref)
    gains = []
    for seed in range(3):
        plain = run(EcadGenetic(SPEC, 2, population=12, seed=seed), 96)
        screened = run(EcadGenetic(SPEC, 2, population=12, seed=seed, surrogate=perfect, screen_pool=8), 96)
        gains.append(hv(screened) / hv(plain))
    assert min(gains) > 1.0


def test_screen_is_refused_where_it_cannot_predict() -> None:
    from schedsearch.errors import UserInputError
    from schedsearch.methods import check_combination

    with pytest.raises(UserInputError, match="--screen"):
        check_combination("ecad", "joint", {"screen": 8})
    for bad in (1, 65, 2.5, True, "8"):
        with pytest.raises(UserInputError, match="--screen"):
            check_combination("ecad", "cache", {"screen": bad})
    with pytest.raises(UserInputError, match="screen"):
        check_combination("nsga2", "cache", {"screen": 8})


def test_a_screened_study_runs_and_keeps_its_table(builtin_model, tmp_path) -> None:
    from schedsearch.search.base import Budget
    from schedsearch.study import run_search

    result = run_search(model=builtin_model, space="cache", strategy="ecad", objectives=["psnr", "macs"],
                        study="s", store=tmp_path / "r.db", budget=Budget(evaluations=16), samples=2,
                        cache_dir=tmp_path / "c", space_options={"num_steps": 5}, validate=False, progress=False,
                        strategy_options={"population": 8, "screen": 4})
    assert result.evaluations == 16 and result.failed == 0
    assert len(list((tmp_path / "c").rglob("reuse_errors_*.npy"))) == 1
