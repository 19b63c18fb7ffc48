"""RayEvaluator on a local 2-CPU Ray (started once for the module): same records as the local evaluator, dead
workers replaced and their candidates retried, repeated failures returned as failed, batches run in parallel; with
shared prefixes, the same records in fewer passes, and a run of plans whose worker dies retried plan by plan. The
tests that start their own 1-CPU workers come before the module's fake pool takes both CPUs."""

import functools
import os
import signal
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from schedsearch.evaluation.ray_evaluator import RayEvaluator, SleepEvaluator, start_local_ray  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray(num_cpus=2)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")  # bound to loopback
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def solver_space(builtin_model):
    from schedsearch.study import build_space

    return build_space("solver", builtin_model.info, options={"nfe_range": (4, 5)})


def _schedules(space, first, n):
    return [space.sample(np.random.default_rng(first + i)) for i in range(n)]


@pytest.fixture(scope="module")
def fake_pool(local_ray, solver_space):
    """One pool of 2 fake workers (0.5 s per candidate, no CPU) for the fault and parallelism tests: schedule 1
    kills its worker once, schedule 2 every time, schedule 3 fails like a NaN output."""
    crash = _schedules(solver_space, 0, 4)
    factory = functools.partial(SleepEvaluator, delay_s=0.5, fail=[crash[3].key])
    with RayEvaluator("fake", None, None, [], workers=2, evaluator_factory=factory, max_retries=1,
                      crash_on={crash[1].key: 1, crash[2].key: 99}) as evaluator:
        yield evaluator


def test_same_records_as_local_evaluator(local_ray, builtin_model, solver_space, tmp_path):
    from schedsearch.calibration.calibration_set import CalibrationSet, default_spec
    from schedsearch.evaluation.local import LocalEvaluator
    from schedsearch.methods import make_strategy
    from schedsearch.results.store import ResultStore
    from schedsearch.search.base import Budget
    from schedsearch.search.loop import run_study

    spec = default_spec(builtin_model.info, samples=4, teacher_steps=20)
    calibration = CalibrationSet.open(spec, tmp_path).build(builtin_model, batch_size=4, progress=False)
    objectives = {"psnr": "max", "nfe": "min"}
    local = LocalEvaluator(builtin_model, calibration, list(objectives), batch_size=4)
    records = {}
    with RayEvaluator(builtin_model.info.name, spec, tmp_path, list(objectives), batch_size=4, workers=2) as remote:
        assert remote.calibration_hash == local.calibration_hash
        assert [(o.name, o.direction) for o in remote.objectives] == list(objectives.items())
        for name, evaluator in (("local", local), ("ray", remote)):
            with ResultStore(tmp_path / f"{name}.sqlite") as store:
                strategy = make_strategy("tpe", solver_space, 2, seed=0)
                run_study(study="same", space=solver_space, strategy=strategy, objectives=objectives,
                          evaluator=evaluator, store=store, budget=Budget(evaluations=4), batch_size=4,
                          progress=False)
                records[name] = sorted((r.key, r.status, r.metrics, r.schedule_json) for r in store.records("same"))
    assert len(records["local"]) == 4
    assert all(status == "ok" for _, status, _, _ in records["local"])
    assert records["ray"] == records["local"]  # same seeds, same noise, same numbers


def _cache_plans(builtin_model, n, seed):
    """Cache plans of a 6-step space where each copies leading rows of an earlier one (they share prefixes), all
    with block skipping on (one prefix-sharing group)."""
    from schedsearch.study import build_space

    space = build_space("cache", builtin_model.info, "quick", {"num_steps": 6})
    rng = np.random.default_rng(seed)
    row = len(space.slots)
    genomes = [rng.integers(0, 2, space.genome.size).astype(float)]
    while len(genomes) < n:
        g = rng.integers(0, 2, space.genome.size).astype(float)
        k = int(rng.integers(1, 6)) * row
        g[:k] = genomes[int(rng.integers(len(genomes)))][:k]
        genomes.append(g)
    for g in genomes:
        g[-1] = 1.0  # the block-skip gene
    return list({s.key: s for s in map(space.decode, genomes)}.values())


def test_shared_prefixes_on_workers_give_the_local_records_with_less_work(local_ray, builtin_model, tmp_path):
    """Two generations of cache plans on 2 workers sharing prefixes: every metric equal to the local evaluator's
    one-at-a-time result, in fewer denoiser passes."""
    from schedsearch.calibration.calibration_set import CalibrationSet, default_spec
    from schedsearch.evaluation.local import LocalEvaluator

    spec = default_spec(builtin_model.info, samples=3, teacher_steps=12)
    calibration = CalibrationSet.open(spec, tmp_path).build(builtin_model, batch_size=3, progress=False)
    schedules = _cache_plans(builtin_model, 16, seed=4)
    alone = {e.schedule.key: e for e in LocalEvaluator(builtin_model, calibration, ["psnr", "macs"]).evaluate(
        schedules)}
    with RayEvaluator(builtin_model.info.name, spec, tmp_path, ["psnr", "macs"], batch_size=3, workers=2,
                      share_prefixes=True) as remote:
        shared = list(remote.evaluate(schedules[:8])) + list(remote.evaluate(schedules[8:]))
    assert sorted(e.schedule.key for e in shared) == sorted(alone)
    assert all(e.status == "ok" and e.metrics == alone[e.schedule.key].metrics for e in shared)
    assert sum(e.forward_passes for e in shared) < sum(e.forward_passes for e in alone.values())


def test_a_candidate_that_kills_its_worker_spares_its_run(local_ray, builtin_model):
    """With shared prefixes a worker gets a run of plans; when one of them kills the worker every time, the run's
    other plans are retried alone and come back ok, and only the killer fails."""
    schedules = _cache_plans(builtin_model, 6, seed=9)
    killer = schedules[2].key
    factory = functools.partial(SleepEvaluator, delay_s=0.05)
    with RayEvaluator("fake", None, None, [], workers=2, evaluator_factory=factory, max_retries=1,
                      crash_on={killer: 99}, share_prefixes=True, num_cpus_per_worker=0.01) as evaluator:
        tasks = evaluator._tasks(list(enumerate(schedules)))
        results = {e.schedule.key: e for e in evaluator.evaluate(schedules)}
    assert len(tasks) == 2 and sorted(t for task in tasks for t in task) == list(range(len(schedules)))
    assert any(2 in task and len(task) > 1 for task in tasks)  # the killer shares its run with others
    rows = [[schedules[t].cache.recompute for t in task] for task in tasks]
    assert rows[0] == sorted(rows[0]) and rows[1] == sorted(rows[1]) and rows[0][-1] <= rows[1][0]  # prefix order
    assert set(results) == {s.key for s in schedules}
    assert results[killer].status == "failed" and "worker died" in results[killer].error
    assert all(e.status == "ok" for key, e in results.items() if key != killer)

def test_dead_workers_are_replaced_and_repeated_failures_returned(fake_pool, solver_space):
    schedules = _schedules(solver_space, 0, 6)
    once, always, nan = schedules[1].key, schedules[2].key, schedules[3].key
    replaced = fake_pool.replaced
    results = {e.schedule.key: e for e in fake_pool.evaluate(schedules)}
    assert set(results) == {s.key for s in schedules}  # nothing dropped
    assert results[once].status == "ok"  # the worker died once: replaced, candidate retried
    assert results[always].status == "failed"
    assert "worker died" in results[always].error and "after 2 attempt(s)" in results[always].error
    assert results[nan].status == "failed" and "NaN" in results[nan].error
    assert sum(e.status == "ok" for e in results.values()) == 4
    assert fake_pool.replaced - replaced == 3  # one death for `once`, two for `always`


def test_worker_killed_from_outside_mid_candidate(fake_pool, solver_space):
    schedules = _schedules(solver_space, 10, 4)
    replaced = fake_pool.replaced
    victim = fake_pool.worker_pids()[0]
    threading.Timer(0.2, os.kill, (victim, signal.SIGKILL)).start()
    results = list(fake_pool.evaluate(schedules))
    assert sorted(e.schedule.key for e in results) == sorted(s.key for s in schedules)
    assert all(e.status == "ok" for e in results)
    assert fake_pool.replaced - replaced == 1


def test_a_batch_runs_in_parallel_and_streams(fake_pool, solver_space):
    schedules = _schedules(solver_space, 20, 6)
    list(fake_pool.evaluate(schedules[:2]))  # both workers up
    start = time.perf_counter()
    arrivals = [time.perf_counter() - start for _ in fake_pool.evaluate(schedules)]
    assert arrivals[-1] < 6 * 0.5 * 0.8  # two workers: ~1.5 s, serial would be 3 s
    assert arrivals[0] < arrivals[-1] - 0.5  # results stream back as they finish

