"""Failures never poison a study: a failed evaluation is not reused by another study, a failure that may not repeat
is retried on resume (at most MAX_ATTEMPTS times, every attempt kept), and one certain to repeat is recorded once."""

from __future__ import annotations

from types import SimpleNamespace

from schedsearch.evaluation.ray_evaluator import SleepEvaluator
from schedsearch.methods import make_strategy
from schedsearch.results.store import ResultStore
from schedsearch.search.base import Budget
from schedsearch.search.fixed import FixedStrategy
from schedsearch.search.loop import MAX_ATTEMPTS, run_study
from schedsearch.spaces.base import ModelStructure
from schedsearch.spaces.registry import make_space

STRUCTURE = ModelStructure(name="builtin:mnist-dit", num_train_timesteps=1000,
                           layout="transformer_blocks[2](attn1,ff)", num_blocks=2, unit_group="transformer_blocks",
                           unit_blocks=2)
OBJECTIVES = {"score": "max", "nfe": "min"}


class Flaky(SleepEvaluator):
    """Fails every candidate with a transient error (as a bad batch size or a lost GPU would) while `broken`."""

    broken = True

    def evaluate_one(self, schedule):
        if not self.broken:
            return super().evaluate_one(schedule)
        return SimpleNamespace(schedule=schedule, metrics={}, status="failed", wall_time_s=0.0, device="fake",
                               samples=0, error="RuntimeError: CUDA out of memory\n  (traceback)")


def _fixed(space, n=6):
    genomes = [space.encode(s) for _, s in space.baselines()][:n]
    return FixedStrategy(space.genome, 2, genomes=genomes), genomes


def test_a_failed_run_poisons_neither_another_study_nor_its_own_resume(tmp_path):
    space = make_space("solver", STRUCTURE, nfe_range=(4, 5))
    flaky = Flaky()
    with ResultStore(tmp_path / "r.db") as store:
        strategy, genomes = _fixed(space)
        first = run_study(study="broken", space=space, strategy=strategy, objectives=OBJECTIVES, evaluator=flaky,
                          store=store, budget=Budget(evaluations=100), progress=False)
        assert first.evaluations == len(genomes) and first.failures == {"RuntimeError: CUDA out of memory": 6}
        assert store.count("broken") == 0 and len(store.attempts("broken")) == 6  # attempts kept, no records
        # another study of the same candidates evaluates them: nothing failed is copied over
        strategy, _ = _fixed(space)
        other = run_study(study="fresh", space=space, strategy=strategy, objectives=OBJECTIVES,
                          evaluator=SleepEvaluator(), store=store, budget=Budget(evaluations=100), progress=False)
        assert other.reused == 0 and other.evaluations == 6 and other.failed == 0
        # the broken study, resumed once the cause is gone, retries (here: answered by the other study's success)
        flaky.broken = False
        strategy, _ = _fixed(space)
        resumed = run_study(study="broken", space=space, strategy=strategy, objectives=OBJECTIVES, evaluator=flaky,
                            store=store, budget=Budget(evaluations=100), progress=False)
        assert resumed.reused == 6 and all(r.status == "ok" for r in store.records("broken"))


def test_retries_are_bounded_and_a_certain_failure_is_recorded_once(tmp_path):
    space = make_space("solver", STRUCTURE, nfe_range=(4, 5))
    with ResultStore(tmp_path / "r.db") as store:
        for attempt in range(1, MAX_ATTEMPTS + 2):
            strategy, genomes = _fixed(space, 2)
            result = run_study(study="s", space=space, strategy=strategy, objectives=OBJECTIVES, evaluator=Flaky(),
                               store=store, budget=Budget(evaluations=100), progress=False)
            tries = min(attempt, MAX_ATTEMPTS)
            assert len(store.attempts("s")) == 2 * tries
            assert result.evaluations == (2 if attempt <= MAX_ATTEMPTS else 0)
            assert store.count("s") == (2 if attempt >= MAX_ATTEMPTS else 0)  # the last attempt is the record
        assert all(r.status == "failed" and "out of memory" in r.error for r in store.records("s"))

        certain = SleepEvaluator(fail=[space.decode(g).key for g in genomes])  # NaN output: certain to repeat
        strategy, _ = _fixed(space, 2)
        run_study(study="nan", space=space, strategy=strategy, objectives=OBJECTIVES, evaluator=certain,
                  store=store, budget=Budget(evaluations=100), progress=False)
        assert store.count("nan") == 2 and len(store.attempts("nan")) == 2
        strategy, _ = _fixed(space, 2)
        again = run_study(study="nan", space=space, strategy=strategy, objectives=OBJECTIVES, evaluator=certain,
                          store=store, budget=Budget(evaluations=100), progress=False)
        assert again.evaluations == 0 and len(store.attempts("nan")) == 2  # not retried


def test_a_failure_within_one_run_is_not_retried_in_that_run(tmp_path):
    """A GA that asks a failed candidate again in the same run gets the failure back, not a second evaluation."""
    space = make_space("solver", STRUCTURE, nfe_range=(4, 4))
    with ResultStore(tmp_path / "r.db") as store:
        strategy = make_strategy("nsga2", space, 2, options={"population": 4})
        result = run_study(study="s", space=space, strategy=strategy, objectives=OBJECTIVES, evaluator=Flaky(),
                           store=store, budget=Budget(generations=3), progress=False)
        keys = [k for k, _ in store.attempts("s")]
        assert len(keys) == len(set(keys)) == result.evaluations
