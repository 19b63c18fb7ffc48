"""Prefix sharing: plans that agree on their first steps computed once, bit-identical to running each alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schedsearch.calibration.calibration_set import CalibrationSet, default_spec
from schedsearch.evaluation.local import LocalEvaluator
from schedsearch.runtime.execute import run_batches
from schedsearch.runtime.prefix_tree import PrefixStates, group_key, run_shared_prefixes
from schedsearch.spaces.schedule import Schedule
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


def test_states_kept_across_calls_resume_later_plans_bit_identically(builtin_model, space) -> None:
    """A second call with the first call's states resumes from prefixes the first call's plans ran: the same
    latents as separate runs, fewer steps than the second call run on its own."""
    schedules = plans(space, 14, seed=5, skip=True)
    first, second = schedules[:7], schedules[7:]
    conditions, seeds = [2, 9], [21, 22]
    denoise = builtin_model.denoiser(conditions, None)
    states = PrefixStates()
    list(run_shared_prefixes(builtin_model, first, denoise, seeds, states=states))
    kept = list(run_shared_prefixes(builtin_model, second, denoise, seeds, states=states))
    fresh = list(run_shared_prefixes(builtin_model, second, denoise, seeds))
    assert sum(r.steps_run for r in kept) < sum(r.steps_run for r in fresh)
    for run in kept:
        (_, alone), = run_batches(builtin_model, second[run.index], conditions, seeds, decode=False)
        assert torch.equal(run.latents, alone)
    # other seeds are another context: nothing to resume from
    other = list(run_shared_prefixes(builtin_model, second[:1], builtin_model.denoiser([4], None), [99],
                                     states=states))
    assert other[0].steps_run == STEPS


def test_prefix_states_count_each_storage_once_and_drop_the_least_recently_used() -> None:
    from schedsearch.runtime.noise import VPSchedule
    from schedsearch.runtime.sampler import PlanRunner
    from schedsearch.spaces.baselines import dpm_solver_plan, linspace_timesteps

    runner = PlanRunner(dpm_solver_plan(linspace_timesteps(1000, 4)), VPSchedule.linear(), "epsilon")
    shared = torch.zeros(1000)  # 4,000 bytes, in every state
    states = PrefixStates(max_bytes=4000 + 2 * 800)
    for i in range(3):
        states.put("c", ("1",) * (i + 1), (torch.zeros(200), runner, [{"batch": shared}]))
    # the shared tensor counted once: 4,000 + 3 × 800 > bound, so the oldest state went
    assert len(states) == 2 and states.held_bytes == 4000 + 2 * 800
    assert states.deepest("c", ("1",) * 3, limit=3)[0] == 3
    assert states.deepest("c", ("1",) * 3, limit=1) == (0, None)  # ("1",) was dropped
    states.deepest("c", ("1",) * 2, limit=2)  # touch the 2-row state: the 3-row one is now the oldest
    states.put("c", ("0",), (torch.zeros(200), runner, []))
    assert states.deepest("c", ("1",) * 3, limit=3)[0] == 2
    assert states.deepest("other", ("1",) * 2, limit=2) == (0, None)


def test_evaluator_keeps_states_between_generations(builtin_model, space, tmp_path) -> None:
    spec = default_spec(builtin_model.info, samples=3, teacher_steps=12)
    calibration = CalibrationSet.open(spec, tmp_path).build(builtin_model, batch_size=3, progress=False)
    schedules = plans(space, 10, seed=7, skip=False)
    objectives = ["psnr", "macs"]
    alone = {e.schedule.key: e for e in LocalEvaluator(builtin_model, calibration, objectives).evaluate(schedules)}
    evaluator = LocalEvaluator(builtin_model, calibration, objectives, share_prefixes=True)
    list(evaluator.evaluate(schedules[:5]))
    later = list(evaluator.evaluate(schedules[5:]))
    fresh = list(LocalEvaluator(builtin_model, calibration, objectives, share_prefixes=True).evaluate(schedules[5:]))
    assert all(e.metrics == alone[e.schedule.key].metrics for e in later)
    assert sum(e.forward_passes for e in later) < sum(e.forward_passes for e in fresh)
    # a memory bound that holds no state: the same metrics, every plan run from noise as alone
    starved = LocalEvaluator(builtin_model, calibration, objectives, share_prefixes=True, prefix_memory_bytes=1)
    list(starved.evaluate(schedules[:5]))
    again = list(starved.evaluate(schedules[5:]))
    assert all(e.metrics == alone[e.schedule.key].metrics for e in again)
    assert [e.forward_passes for e in again] == [alone[e.schedule.key].forward_passes for e in again]


@pytest.mark.parametrize("every", [1, 3])
def test_states_kept_every_kth_step_resume_from_the_deepest_kept(builtin_model, space, every) -> None:
    """The same plan run again resumes from the deepest kept state: before the last step when every state is
    kept, else before the last multiple of `every`; the latents stay identical."""
    schedule = plans(space, 1, seed=3, skip=True)[0]
    denoise = builtin_model.denoiser([5], None)
    states = PrefixStates(every=every)
    first, = run_shared_prefixes(builtin_model, [schedule], denoise, [31], states=states)
    again, = run_shared_prefixes(builtin_model, [schedule], denoise, [31], states=states)
    assert first.steps_run == STEPS
    assert again.steps_run == STEPS - (STEPS - 1) // every * every
    assert torch.equal(again.latents, first.latents)
    with pytest.raises(ValueError, match="every"):
        PrefixStates(every=0)


def test_prefix_groups_keep_first_appearance_order_and_leave_unshareable_plans_alone(builtin_model, space) -> None:
    """Shareable plans of one group_key together, in the order they first appear; an uncached schedule (key None)
    is a group of its own each time, duplicates included."""
    from schedsearch.runtime.prefix_tree import prefix_groups

    skip, plain = plans(space, 6, seed=1, skip=True)[:2], plans(space, 6, seed=2, skip=False)[:2]
    uncached = Schedule(builtin_model.info.name, space.solver)
    groups = prefix_groups([skip[0], uncached, plain[0], skip[1], uncached, plain[1]])
    assert [members for _, members in groups] == [[0, 3], [1], [2, 5], [4]]
    assert [key is None for key, _ in groups] == [False, True, False, True]
    assert groups[0][0] == group_key(skip[0]) != groups[2][0]
