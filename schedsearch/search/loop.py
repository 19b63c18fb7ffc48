"""`run_study`: the one loop every strategy runs in (DESIGN: ask → dedupe → evaluate → append → tell).

The store is the study's memory. On start the strategy is warm-started from the study's records, so a killed
study resumes where it stopped; a candidate whose key (schedule + calibration) is already in the store — in this
study or any other — is never evaluated again. Records are appended one by one as evaluations finish, so a kill
loses at most the evaluations in flight. No torch here: the evaluator is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from schedsearch.results.pareto import non_dominated, to_minimisation
from schedsearch.results.store import Record, ResultStore, candidate_key
from schedsearch.search.base import Budget, Strategy
from schedsearch.spaces.base import SearchSpace
from schedsearch.spaces.schedule import Schedule


class EvaluationLike(Protocol):
    schedule: Schedule
    metrics: dict[str, float]
    status: str
    error: str
    wall_time_s: float
    device: str


class Evaluator(Protocol):
    """What the loop needs of an evaluator (LocalEvaluator, RayEvaluator): results may come back in any order."""

    @property
    def calibration_hash(self) -> str: ...

    def evaluate(self, schedules: Iterable[Schedule]) -> Iterator[EvaluationLike]: ...


@dataclass(frozen=True)
class StudyResult:
    study: str
    evaluations: int  # new evaluations run by this call
    reused: int  # candidates answered from the store (this or another study)
    generations: int
    wall_time_s: float
    records: tuple[Record, ...] = field(repr=False, default=())
    failures: dict[str, int] = field(default_factory=dict)  # this run's failed evaluations by cause (error's 1st line)
    forward_passes: int = 0  # denoiser rows this call's evaluations ran (model work; `Budget.forward_passes`)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


def _values(record: Record, objectives: Mapping[str, str]) -> list[float]:
    if record.status != "ok":
        return [np.inf] * len(objectives)
    signs = {"min": 1.0, "max": -1.0}
    return [signs[d] * record.metrics.get(name, np.nan) for name, d in objectives.items()]


@dataclass
class _Progress:
    """Mutable bookkeeping of one run_study call."""

    study: str
    objectives: Mapping[str, str]
    store: ResultStore
    space: SearchSpace
    bar: Any
    on_record: Callable[[Record], None] | None
    records: list[Record]
    evaluations: int = 0
    forward_passes: int = 0
    reused: int = 0
    retry: dict[str, Record] = field(default_factory=dict)  # failed this run, to retry on resume: not asked again now
    failures: dict[str, int] = field(default_factory=dict)

    def answer(self, schedules: Sequence[Schedule], evaluator: Evaluator) -> list[Record]:
        """A record per schedule (in order): from the store when this candidate was already scored under the same
        calibration with every objective (in this study or another), else evaluated now and appended."""
        cal = evaluator.calibration_hash
        keys = [candidate_key(s, cal) for s in schedules]
        answers: dict[str, Record] = {}
        fresh: dict[str, Schedule] = {}
        for key, schedule in zip(keys, schedules, strict=True):
            if key in answers or key in fresh:
                continue
            if key in self.retry:  # failed earlier in this run: told as failed again, retried on resume
                answers[key] = self.retry[key]
                continue
            known = self.store.get(self.study, key)
            if known is None:  # only a success is reused: a failure elsewhere may be that study's own problem
                known = next((r for r in self.store.find(key) if r.status == "ok" and self._complete(r)), None)
                if known is not None:  # scored by another study on the same calibration: copy, don't rerun
                    known = _copy_to(known, self.study, schedule)
                    self.store.append(known)
                    self.records.append(known)
            if known is not None and self._complete(known):
                answers[key] = known
                self.reused += 1
            else:
                fresh[key] = schedule
        for result in evaluator.evaluate(fresh.values()):
            record = Record.for_schedule(
                self.study, result.schedule, result.metrics, calibration_hash=cal,
                status=result.status,  # type: ignore[arg-type]
                error=result.error, device=result.device, wall_time_s=result.wall_time_s,
                summary={**self.space.summary(result.schedule), **_work(result)},
            )
            self.evaluations += 1
            self.forward_passes += int(record.summary.get("forward_passes", 0))
            if record.status != "ok":
                cause = record.error.split("\n", 1)[0][:120] or "failed"
                self.failures[cause] = self.failures.get(cause, 0) + 1
                self.store.add_attempt(self.study, record.key, cal, record.error)
                if not _final_failure(record.error, len(self.store.attempts(self.study, record.key))):
                    self.retry[record.key] = record
                    answers[record.key] = record
                    self._show()
                    continue
            if not self.store.append(record):  # an incomplete earlier row holds the key: keep both answers apart
                record = self.store.get(self.study, record.key) or record
            answers[record.key] = record
            self.records.append(record)
            if self.on_record is not None:
                self.on_record(record)
            self._show()
        missing = [k for k in keys if k not in answers]
        if missing:
            raise RuntimeError(f"evaluator returned no result for {len(missing)} candidate(s), e.g. {missing[0]}")
        return [answers[k] for k in keys]

    def _show(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(_postfix(self.records, self.objectives, sum(self.failures.values())),
                                     refresh=False)

    def _complete(self, record: Record) -> bool:
        return record.status != "ok" or all(name in record.metrics for name in self.objectives)


def run_study(
    *,
    study: str,
    space: SearchSpace,
    strategy: Strategy,
    objectives: Mapping[str, str],
    evaluator: Evaluator,
    store: ResultStore,
    budget: Budget,
    batch_size: int | None = None,
    progress: bool = True,
    on_record: Callable[[Record], None] | None = None,
    low_fidelity: Evaluator | None = None,
    promote_fraction: float = 0.5,
) -> StudyResult:
    """Run (or resume) `study` until `budget` is spent or the strategy has nothing more to ask. The budget is
    checked between asks, so a GA finishes the generation it started. `budget.evaluations` is the study's total:
    the evaluations this study already ran (at its calibrations; not records it copied from other studies) count,
    so a study killed and resumed with the same command stops where an uninterrupted one would.

    objectives: metric name -> "min" | "max", in the order the strategy sees them.
    batch_size: genomes per ask (default: the strategy's natural batch, e.g. one GA generation).
    low_fidelity: an evaluator on fewer calibration samples. Each batch is first scored by it; the best
        `promote_fraction` (by non-dominated rank) are scored again by `evaluator` (successive halving with one
        rung). The strategy is told full-fidelity values where they exist, low-fidelity ones otherwise; fronts and
        exports use full-fidelity records only (their calibration hash says which). Both kinds count as evaluations.
    """
    for name, direction in objectives.items():
        if direction not in ("min", "max"):
            raise ValueError(f"objectives[{name!r}]: direction {direction!r}; use 'min' or 'max'")
    if not 0 < promote_fraction <= 1:
        raise ValueError(f"promote_fraction: {promote_fraction} must be in (0, 1]")
    cal = evaluator.calibration_hash
    start = time.perf_counter()
    history = store.records(study)
    own = [r for r in history if r.calibration_hash == cal]
    if low_fidelity is not None:  # low-fidelity results of candidates never promoted are history too
        promoted = {r.to_schedule().key for r in own}
        own += [r for r in history if r.calibration_hash == low_fidelity.calibration_hash
                and r.to_schedule().key not in promoted]
    _warm_start(space, strategy, own, objectives)
    generations = 0
    prior = sum(1 for r in own if "reused_from" not in r.summary)
    prior_passes = spent_passes(own)
    state = _Progress(study, objectives, store, space, _progress(progress, budget, study, prior), on_record,
                      list(own))
    try:
        while not budget.spent(prior + state.evaluations, time.perf_counter() - start, generations,
                               prior_passes + state.forward_passes):
            genomes = strategy.ask(batch_size)
            if not genomes:
                break
            schedules = [space.decode(g) for g in genomes]
            if low_fidelity is None:
                answers = state.answer(schedules, evaluator)
            else:
                answers = state.answer(schedules, low_fidelity)
                low_values = np.array([_values(r, objectives) for r in answers], dtype=float)
                chosen = _promote(low_values, promote_fraction)
                for i, record in zip(chosen, state.answer([schedules[i] for i in chosen], evaluator), strict=True):
                    answers[i] = record
            values = np.array([_values(r, objectives) for r in answers], dtype=float)
            strategy.tell(genomes, np.where(np.isnan(values), np.inf, values))
            generations += 1
    finally:
        if state.bar is not None:
            state.bar.close()
    return StudyResult(study, state.evaluations, state.reused, generations, time.perf_counter() - start,
                       tuple(state.records), dict(state.failures), state.forward_passes)


MAX_ATTEMPTS = 3  # a failure that may not repeat is tried this often (over resumes) before it is the record
FINAL_ERRORS = ("NonFiniteOutputError",)  # a valid schedule whose output is NaN/inf: the same every time


def _final_failure(error: str, attempts: int) -> bool:
    """Is this failure the candidate's result? At once when it is certain to repeat, else after MAX_ATTEMPTS."""
    return error.startswith(FINAL_ERRORS) or attempts >= MAX_ATTEMPTS


def _promote(values: np.ndarray, fraction: float) -> list[int]:
    """Indices of the best ceil(fraction·n) rows (minimised values) by non-dominated rank, then by index."""
    from schedsearch.results.pareto import nondominated_sort

    finite = np.where(np.isfinite(values), values, np.finfo(float).max)
    order = [int(i) for front in nondominated_sort(finite, ["min"] * values.shape[1]) for i in front]
    count = max(1, int(np.ceil(fraction * len(values))))
    return sorted(order[:count])


def _warm_start(
    space: SearchSpace, strategy: Strategy, records: Sequence[Record], objectives: Mapping[str, str]
) -> None:
    genomes, values = [], []
    for record in records:
        try:
            genomes.append(space.encode(record.to_schedule()))
        except (ValueError, KeyError):
            continue  # a record of another space shape (e.g. options changed): not this strategy's history
        values.append(_values(record, objectives))
    if genomes:
        arr = np.array(values, dtype=float)
        strategy.warm_start(genomes, np.where(np.isnan(arr), np.inf, arr))


def _work(result: Any) -> dict[str, int]:
    """The model work an evaluation spent (`Evaluation.forward_passes`, `samples`): summary columns, so a study's
    cost in denoiser passes and images is read back from the store (evaluators that do not count report none)."""
    passes = int(getattr(result, "forward_passes", 0) or 0)
    return {"forward_passes": passes, "images": int(getattr(result, "samples", 0) or 0)} if passes else {}


def spent_passes(records: Sequence[Record]) -> int:
    """Denoiser forward passes the records' evaluations spent (records copied from other studies cost none)."""
    return sum(int(r.summary.get("forward_passes", 0)) for r in records if "reused_from" not in r.summary)


def _copy_to(record: Record, study: str, schedule: Schedule) -> Record:
    """Another study's result as this study's record: its metrics, with the schedule as this study asked it (same
    content key; its own meta, e.g. a baseline's name)."""
    summary = {k: v for k, v in record.summary.items() if k not in ("forward_passes", "images")}
    summary["reused_from"] = record.study
    return Record(study=study, key=record.key, schedule_json=schedule.to_json(indent=None), metrics=record.metrics,
                  status=record.status, error=record.error, calibration_hash=record.calibration_hash,
                  code_version=record.code_version, device=record.device, wall_time_s=record.wall_time_s,
                  summary=summary)


def _progress(enabled: bool, budget: Budget, study: str, done: int = 0) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=budget.evaluations, initial=done, desc=f"study {study}", unit="eval", dynamic_ncols=True)


def _postfix(records: Sequence[Record], objectives: Mapping[str, str], failed: int = 0) -> str:
    """The progress bar's summary; `failed`: this run's failed evaluations (retried or final)."""
    ok = [r for r in records if r.status == "ok" and all(n in r.metrics for n in objectives)]
    if not ok:
        return f"no successful evaluation yet, failed={failed}"
    pts = np.array([[r.metrics[n] for n in objectives] for r in ok])
    front = int(non_dominated(pts, list(objectives.values())).sum())
    first, direction = next(iter(objectives.items()))
    best = max(pts[:, 0]) if direction == "max" else min(pts[:, 0])
    return f"best {first}={best:.4g} front={front} failed={failed}"


__all__ = ["Budget", "StudyResult", "run_study", "to_minimisation"]
