"""CacheQuant (Liu et al. CVPR 2025, §3.2): the refresh-step DP against brute force, the unit feature table on the
builtin model, and the DP strategy's ask/tell."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from schedsearch.search.dynamic import (
    DPResult,
    DPStrategy,
    cachequant_dp,
    feasible_interval,
    group_length_bounds,
    optimal_segmentation,
    plan_cost,
    refresh_bits,
)
from schedsearch.spaces.base import GenomeSpec


def compositions(T: int):
    """Every split of range(T) into contiguous groups, as the tuple of group starts."""
    for cuts in itertools.product((0, 1), repeat=T - 1):
        yield (0, *(i + 1 for i, c in enumerate(cuts) if c))


def split_cost(table: np.ndarray, starts: tuple[int, ...]) -> float:
    bounds = (*starts, len(table))
    return sum(float(table[a, a:b].sum()) for a, b in itertools.pairwise(bounds))


def lengths(starts: tuple[int, ...], T: int) -> list[int]:
    return [b - a for a, b in itertools.pairwise((*starts, T))]


def brute_force(table: np.ndarray, lo: int, hi: int, k: int | None) -> tuple[float, set[tuple[int, ...]]]:
    T = len(table)
    best, argbest = math.inf, set()
    for starts in compositions(T):
        ls = lengths(starts, T)
        if (k is not None and len(ls) != k) or min(ls) < lo or max(ls) > hi:
            continue
        c = split_cost(table, starts)
        if c < best - 1e-12:
            best, argbest = c, {starts}
        elif abs(c - best) <= 1e-12:
            argbest.add(starts)
    return best, argbest


@pytest.mark.parametrize("T", [1, 2, 3, 5, 7, 8, 10, 12])
@pytest.mark.parametrize("N", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("free", [False, True])
def test_dp_matches_brute_force(T, N, free):
    rng = np.random.default_rng(1000 * T + 10 * N + free)
    lo, hi = group_length_bounds(N)
    k = None if free else math.ceil(T / N)
    for trial in range(4):
        table = rng.random((T, T)) if trial % 2 else rng.integers(0, 4, (T, T)).astype(float)  # ints: many ties
        np.fill_diagonal(table, 0.0)
        best, argbest = brute_force(table, lo, hi, k)
        if not math.isfinite(best):
            assert not free or lo > T
            with pytest.raises(ValueError, match="infeasible"):
                cachequant_dp(table, N, free_groups=free)
            continue
        result = cachequant_dp(table, N, free_groups=free)
        assert result.cost == pytest.approx(best, abs=1e-12)
        assert result.refresh_steps in argbest  # optimal, and the reported cost is the plan's cost
        assert split_cost(table, result.refresh_steps) == pytest.approx(result.cost, abs=1e-12)
        assert plan_cost(table, result.refresh_steps) == pytest.approx(result.cost, abs=1e-12)
        assert all(lo <= n <= hi for n in result.group_lengths)
        assert free or len(result.refresh_steps) == k
        assert result.refresh_steps[0] == 0 and sum(result.group_lengths) == T


def test_hand_cases():
    # features jump after step 3 of 6: with N = 3 (two groups of 2..6 steps) the DP refreshes at the jump
    f = np.array([0.0, 0.1, 0.2, 0.3, 5.0, 5.1])
    table = np.abs(f[:, None] - f[None, :])
    r = cachequant_dp(table, 3)
    assert r == DPResult((0, 4), pytest.approx(0.1 + 0.2 + 0.3 + 0.1), 6)
    assert r.group_lengths == (4, 2)
    # constant features: every split costs 0; ties go to the earliest split point
    assert cachequant_dp(np.zeros((4, 4)), 2) == DPResult((0, 1), 0.0, 4)
    # N = 1: every step its own group, cost 0 (the diagonal)
    assert cachequant_dp(np.ones((5, 5)) - np.eye(5), 1) == DPResult((0, 1, 2, 3, 4), 0.0, 5)
    # one group covering everything when T ≤ N ≤ 2N
    assert cachequant_dp(np.arange(9.0).reshape(3, 3), 3).refresh_steps == (0,)


def test_length_bounds_are_cachequants():
    assert group_length_bounds(1) == (1, 2)
    assert group_length_bounds(4) == (2, 8)
    assert group_length_bounds(5) == (3, 10)
    # the paper's settings: SD 50 steps N=5 -> 10 groups of 3..10; LDM 250 steps N=20 -> 13 groups of 10..40
    r = cachequant_dp(np.random.default_rng(0).random((50, 50)), 5)
    assert len(r.refresh_steps) == 10 and min(r.group_lengths) >= 3 and max(r.group_lengths) <= 10
    r = cachequant_dp(np.random.default_rng(0).random((250, 250)), 20)
    assert len(r.refresh_steps) == 13 and min(r.group_lengths) >= 10 and max(r.group_lengths) <= 40


def test_infeasible_and_bad_inputs():
    with pytest.raises(ValueError, match=r"T=2, N=5.*infeasible"):
        cachequant_dp(np.zeros((2, 2)), 5)  # one group of 2 steps, but groups need ≥ 3
    assert not feasible_interval(2, 5) and feasible_interval(6, 5)
    with pytest.raises(ValueError, match="interval"):
        cachequant_dp(np.zeros((4, 4)), 0)
    with pytest.raises(ValueError, match="square"):
        cachequant_dp(np.zeros((4, 3)), 2)
    with pytest.raises(ValueError, match="NaN"):
        cachequant_dp(np.full((4, 4), np.nan), 2)
    with pytest.raises(ValueError, match="3 groups"):
        optimal_segmentation(np.zeros((5, 5)), 2, 4, num_groups=3)


def test_dp_strategy_asks_once():
    T = 10
    rng = np.random.default_rng(3)
    table = rng.random((T, T))
    np.fill_diagonal(table, 0)
    spec = GenomeSpec.bits(T)
    strategy = DPStrategy(spec, 2, distance=table)
    assert sorted(strategy.plans) == [2, 3, 4, 5]
    genomes = strategy.ask()
    expected = {refresh_bits(cachequant_dp(table, n).refresh_steps, T).tobytes() for n in (2, 3, 4, 5)}
    assert {g.tobytes() for g in genomes} == expected and len(genomes) == len(expected)  # deduplicated
    assert all(g[0] == 1 for g in genomes)
    assert strategy.ask() == []
    strategy.tell(genomes, np.ones((len(genomes), 2)))
    assert strategy.values.shape == (len(genomes), 2)
    assert strategy.ask(4) == []
    # resuming: evaluated plans are not asked again; asking in small batches drains the same sweep
    resumed = DPStrategy(spec, 2, distance=table, intervals=[2, 3])
    resumed.warm_start(genomes[:1], np.zeros((1, 2)))
    rest = resumed.ask(1) + resumed.ask(1)
    assert all(g.tobytes() != genomes[0].tobytes() for g in rest) and resumed.ask() == []


def test_dp_strategy_checks():
    table = np.zeros((6, 6))
    with pytest.raises(ValueError, match="encode"):
        DPStrategy(GenomeSpec.bits(5), 1, distance=table)
    with pytest.raises(ValueError, match="infeasible"):
        DPStrategy(GenomeSpec.bits(6), 1, distance=table, intervals=[20])
    # table over evaluated steps only (first step analytic): plans shifted by one
    s = DPStrategy(GenomeSpec.bits(7), 1, distance=table, intervals=[3], step_offset=1)
    assert s.plans[3].refresh_steps == (1, 3) and s.ask()[0].tolist() == [0, 1, 0, 1, 0, 0, 0]


# --- unit features on the builtin model -------------------------------------------------------------------------

FEATURE_PLAN_STEPS = 6
UNIT = ("transformer_blocks", 1, 5)


@pytest.fixture(scope="module")
def feature_env(builtin_model):
    from schedsearch.calibration.unit_features import unit_feature_distances
    from schedsearch.spaces import baselines

    plan = baselines.dpm_solver_plan(baselines.linspace_timesteps(1000, FEATURE_PLAN_STEPS), 2)
    table = unit_feature_distances(builtin_model, plan, UNIT, conditions=[3, 8], seeds=[5, 6], guidance=2.0)
    return builtin_model, plan, table


def test_feature_table(feature_env, builtin_model):
    from schedsearch.calibration.unit_features import unit_feature_distances

    _, plan, table = feature_env
    T = FEATURE_PLAN_STEPS
    assert table.shape == (T, T)
    assert np.all(np.diag(table) == 0) and np.all(table >= 0) and np.allclose(table, table.T)
    assert np.all(table[~np.eye(T, dtype=bool)] > 0)
    # chunked calibration gives the same table (means over equal-size samples)
    chunked = unit_feature_distances(builtin_model, plan, UNIT, [3, 8], [5, 6], 2.0, batch_size=1)
    np.testing.assert_allclose(chunked, table, rtol=1e-5, atol=1e-7)


def test_features_are_what_the_runtime_reuses(builtin_model):
    """The recorded feature at step 0 equals the residual UnitReuseHook caches at step 0."""
    from schedsearch.calibration.unit_features import unit_features
    from schedsearch.runtime.cache_hooks import UNIT_HOOK, CacheRuntime
    from schedsearch.runtime.models import initial_noise
    from schedsearch.runtime.sampler import sample
    from schedsearch.spaces import baselines
    from schedsearch.spaces.cache_plan import UnitCachePlan

    plan = baselines.dpm_solver_plan(baselines.linspace_timesteps(1000, 2), 2)
    feats = unit_features(builtin_model, plan, UNIT, [1, 4], [7, 9], 2.0)
    assert feats[0].shape[0] == 4  # the CFG pair of two samples
    cache = UnitCachePlan(*UNIT, refresh_steps=(0,), num_steps=2)
    with CacheRuntime(builtin_model.network, builtin_model.info, cache) as runtime:
        sample(
            runtime.wrap(builtin_model.denoiser([1, 4], 2.0)),
            initial_noise([7, 9], (1, 28, 28)),
            plan,
            builtin_model.noise_schedule,
        )
        module = builtin_model.network.get_submodule(f"{UNIT[0]}.{UNIT[1]}")
        hidden_residual, encoder_residual = module._diffusers_hook.get_hook(UNIT_HOOK).shared["residual"]["batch"]
    torch.testing.assert_close(feats[0], hidden_residual)
    assert encoder_residual is None  # DiT blocks carry one stream


def test_unit_checks(builtin_model):
    from schedsearch.calibration.unit_features import unit_feature_distances
    from schedsearch.runtime.cache_hooks import CachePlanMismatchError

    plan = builtin_model.default_plan(4)
    for unit in [("transformer_blocks", 2, 9), ("nope", 0, 1), ("deepcache", 0, 1)]:
        with pytest.raises(CachePlanMismatchError):
            unit_feature_distances(builtin_model, plan, unit, seeds=[0])
    with pytest.raises(ValueError, match="conditions"):
        unit_feature_distances(builtin_model, plan, UNIT, conditions=[1, 2], seeds=[0])


def test_dp_plans_run_through_the_runtime(feature_env):
    from schedsearch.calibration.unit_features import cachequant_plans
    from schedsearch.objectives.fidelity import psnr
    from schedsearch.runtime.cache_hooks import CacheRuntime
    from schedsearch.runtime.models import initial_noise
    from schedsearch.runtime.sampler import sample

    model, plan, table = feature_env
    plans = cachequant_plans(model, plan, UNIT, distance=table, intervals=[2, 3])
    assert [n for n, _ in plans] == [2, 3]
    denoise = model.denoiser([3, 8], 2.0)
    x = initial_noise([5, 6], model.info.sample_shape)
    reference = sample(denoise, x, plan, model.noise_schedule)
    for n, cache in plans:
        assert cache.validate(plan.num_steps) is cache and len(cache.refresh_steps) == math.ceil(6 / n)
        with CacheRuntime(model.network, model.info, cache) as runtime:
            out = sample(runtime.wrap(denoise), x, plan, model.noise_schedule)
        assert torch.isfinite(out).all() and not torch.equal(out, reference)
        assert psnr(out, reference).min() > 10
    # a DPStrategy over the same table asks for the same plans, as cache-interval genomes
    strategy = DPStrategy(GenomeSpec.bits(6), 1, distance=table, intervals=[2, 3])
    assert [g.tolist() for g in strategy.ask()] == [refresh_bits(c.refresh_steps, 6).tolist() for _, c in plans]
    assert strategy.ask() == []


def test_analytic_first_step_is_skipped(feature_env):
    from schedsearch.calibration.unit_features import cachequant_plans, unit_feature_distances
    from schedsearch.spaces.schedule import SolverPlan

    model, plan, _ = feature_env
    afs = SolverPlan(plan.timesteps, plan.steps, plan.final_timestep, "zero_x0")
    table = unit_feature_distances(model, afs, UNIT, [3, 8], [5, 6], 2.0)
    assert np.all(table[0] == 0) and np.all(table[:, 0] == 0) and np.all(table[1, 2:] > 0)
    ((_, cache),) = cachequant_plans(model, afs, UNIT, distance=table, intervals=[2])
    assert cache.refresh_steps[0] == 1 and 0 not in cache.refresh_steps


def test_dp_genomes_decode_in_the_cache_interval_space(feature_env):
    """DPStrategy's genomes are CacheIntervalSpace genomes: decoding gives back the DP's UnitCachePlans."""
    from schedsearch.calibration.unit_features import cachequant_plans, unit_feature_distances
    from schedsearch.runtime.models import model_layout
    from schedsearch.spaces.base import ModelStructure
    from schedsearch.spaces.cache_interval import CacheIntervalSpace
    from schedsearch.spaces.schedule import SolverPlan

    model, plan, table = feature_env
    info = model.info
    structure = ModelStructure(
        info.name,
        info.num_train_timesteps,
        model_layout(info),
        info.num_blocks,
        unit_group=UNIT[0],
        unit_blocks=info.block_groups[0].count,
    )
    afs = SolverPlan(plan.timesteps, plan.steps, plan.final_timestep, "zero_x0")
    afs_table = unit_feature_distances(model, afs, UNIT, [3, 8], [5, 6], 2.0)
    for solver, distance, offset in [(plan, table, 0), (afs, afs_table, 1)]:
        space = CacheIntervalSpace(structure, solver=solver, unit=UNIT[1:], max_group=4)
        expected = [c for _, c in cachequant_plans(model, solver, UNIT, distance=distance, intervals=[2])]
        strategy = DPStrategy(
            space.genome,
            1,
            distance=distance[offset:, offset:],
            intervals=[2],
            encode=space.refresh_genome,
            step_offset=offset,
        )
        assert [space.decode(g).cache for g in strategy.ask()] == expected
