"""Prefix sharing: plans that agree on their first steps computed once, bit-identical to running each alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schedsearch.calibration.calibration_set import CalibrationSet, default_spec
from schedsearch.evaluation.local import LocalEvaluator
from schedsearch.runtime.execute import run_batches
from schedsearch.runtime.prefix_tree import group_key, run_shared_prefixes
from schedsearch.study import build_space

STEPS = 6


@pytest.fixture(scope="module")
def space(builtin_model):
    return build_space("cache", builtin_model.info, "quick", {"num_steps": STEPS})


def plans(space, n: int, seed: int = 0, skip: bool | None = None) -> list:
    """Random plans that share prefixes: each copies a random number of leading rows from an earlier one."""
    rng = np.random.default_rng(seed)
    genomes = [rng.integers(0, 2, space.genome.size).astype(float)]
    if skip is not None:
        genomes[0][-1] = float(skip)
    row = len(space.slots)
    while len(genomes) < n:
        g = rng.integers(0, 2, space.genome.size).astype(float)
        k = int(rng.integers(0, STEPS)) * row
        g[:k] = genomes[int(rng.integers(len(genomes)))][:k]
        if skip is not None:
            g[-1] = float(skip)
        genomes.append(g)
    out = {s.key: s for s in (space.decode(g) for g in genomes) if not space.is_all_recompute(space.encode(s))}
    return list(out.values())


def test_shared_prefixes_give_the_latents_of_separate_runs(builtin_model, space) -> None:
    schedules = plans(space, 12, skip=True)
    assert len({group_key(s) for s in schedules}) == 1
    conditions, seeds = [3, 8, 1], [11, 12, 13]
    denoise = builtin_model.denoiser(conditions, None)
    runs = list(run_shared_prefixes(builtin_model, schedules, denoise, seeds))
    assert sorted(r.index for r in runs) == list(range(len(schedules)))
    for run in runs:
        assert run.error is None
        (_, alone), = run_batches(builtin_model, schedules[run.index], conditions, seeds, decode=False)
        assert torch.equal(run.latents, alone)
    # the first plan runs every step; the others fewer, and passes count what ran (3 samples × CFG pair)
    assert runs[0].steps_run == STEPS and runs[0].forward_passes == STEPS * 6
    assert sum(r.steps_run for r in runs) < STEPS * len(runs)
    assert all(r.forward_passes == r.steps_run * 6 for r in runs)
    # the network is left as it was
    assert not hasattr(builtin_model.network.transformer_blocks[0].attn1, "_diffusers_hook")


def test_a_memory_bound_keeps_fewer_states_and_the_same_results(builtin_model, space) -> None:
    schedules = plans(space, 8, seed=3, skip=False)
    denoise = builtin_model.denoiser([5], None)
    free = {r.index: r for r in run_shared_prefixes(builtin_model, schedules, denoise, [7])}
    none = {r.index: r for r in run_shared_prefixes(builtin_model, schedules, denoise, [7], max_bytes=0)}
    assert all(r.steps_run == STEPS for r in none.values())
    assert sum(r.steps_run for r in free.values()) < STEPS * len(free)
    assert all(torch.equal(free[i].latents, none[i].latents) for i in free)


def test_plans_of_other_groups_are_refused(builtin_model, space) -> None:
    mixed = plans(space, 4, skip=True)[:2] + plans(space, 4, seed=1, skip=False)[:2]
    with pytest.raises(ValueError, match="group_key"):
        list(run_shared_prefixes(builtin_model, mixed, builtin_model.denoiser([1], None), [1]))


def test_evaluator_with_shared_prefixes_scores_as_one_at_a_time(builtin_model, space, tmp_path) -> None:
    spec = default_spec(builtin_model.info, samples=5, teacher_steps=12)
    calibration = CalibrationSet.open(spec, tmp_path).build(builtin_model, batch_size=5, progress=False)
    schedules = [*plans(space, 6, seed=2), space.decode(np.zeros(space.genome.size))]
    objectives = ["psnr", "mse", "macs"]
    alone = {e.schedule.key: e for e in LocalEvaluator(builtin_model, calibration, objectives,
                                                        batch_size=2).evaluate(schedules)}
    shared = list(LocalEvaluator(builtin_model, calibration, objectives, batch_size=2,
                                 share_prefixes=True).evaluate(schedules))
    assert sorted(e.schedule.key for e in shared) == sorted(alone)
    for e in shared:
        assert e.status == "ok" and e.metrics == alone[e.schedule.key].metrics
    assert sum(e.forward_passes for e in shared) < sum(e.forward_passes for e in alone.values())
