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


def _values(record: Record, objectives: Mapping[str, str]) -> list[float]:
    if record.status != "ok":
        return [np.inf] * len(objectives)
    signs = {"min": 1.0, "max": -1.0}
    return [signs[d] * record.metrics.get(name, np.nan) for name, d in objectives.items()]


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
) -> StudyResult:
    """Run (or resume) `study` until `budget` is spent or the strategy has nothing more to ask. The budget is
    checked between asks, so a GA finishes the generation it started.

    objectives: metric name -> "min" | "max", in the order the strategy sees them.
    batch_size: genomes per ask (default: the strategy's natural batch, e.g. one GA generation).
    """
    for name, direction in objectives.items():
        if direction not in ("min", "max"):
            raise ValueError(f"objectives[{name!r}]: direction {direction!r}; use 'min' or 'max'")
    cal = evaluator.calibration_hash
    start = time.perf_counter()
    own = [r for r in store.records(study) if r.calibration_hash == cal]
    _warm_start(space, strategy, own, objectives)
    done_keys = {r.key for r in own}
    evaluations = reused = generations = 0
    bar = _progress(progress, budget, study)
    all_records = list(own)
    try:
        while not budget.spent(evaluations, time.perf_counter() - start, generations):
            genomes = strategy.ask(batch_size)
            if not genomes:
                break
            schedules = [space.decode(g) for g in genomes]
            keys = [candidate_key(s, cal) for s in schedules]
            answers: dict[str, Record] = {}
            fresh: dict[str, Schedule] = {}
            for key, schedule in zip(keys, schedules, strict=True):
                if key in answers or key in fresh:
                    continue
                known = store.get(study, key) or next(iter(store.find(key)), None)
                if known is not None:
                    if known.study != study:  # evaluated by another study on the same calibration: copy, don't rerun
                        known = _copy_to(known, study)
                        store.append(known)
                        all_records.append(known)
                    answers[key] = known
                    reused += 1
                else:
                    fresh[key] = schedule
            for result in evaluator.evaluate(fresh.values()):
                record = Record.for_schedule(
                    study, result.schedule, result.metrics, calibration_hash=cal, status=result.status,  # type: ignore[arg-type]
                    error=result.error, device=result.device, wall_time_s=result.wall_time_s,
                    summary=space.summary(result.schedule),
                )
                store.append(record)
                answers[record.key] = record
                all_records.append(record)
                done_keys.add(record.key)
                evaluations += 1
                if on_record is not None:
                    on_record(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_postfix(all_records, objectives), refresh=False)
            missing = [k for k in keys if k not in answers]
            if missing:
                raise RuntimeError(f"evaluator returned no result for {len(missing)} candidate(s), e.g. {missing[0]}")
            values = np.array([_values(answers[k], objectives) for k in keys], dtype=float)
            strategy.tell(genomes, np.where(np.isnan(values), np.inf, values))
            generations += 1
    finally:
        if bar is not None:
            bar.close()
    return StudyResult(study, evaluations, reused, generations, time.perf_counter() - start, tuple(all_records))


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


def _copy_to(record: Record, study: str) -> Record:
    summary = dict(record.summary)
    summary["reused_from"] = record.study
    return Record(study=study, key=record.key, schedule_json=record.schedule_json, metrics=record.metrics,
                  status=record.status, error=record.error, calibration_hash=record.calibration_hash,
                  code_version=record.code_version, device=record.device, wall_time_s=record.wall_time_s,
                  summary=summary)


def _progress(enabled: bool, budget: Budget, study: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=budget.evaluations, desc=f"study {study}", unit="eval", dynamic_ncols=True)


def _postfix(records: Sequence[Record], objectives: Mapping[str, str]) -> str:
    ok = [r for r in records if r.status == "ok" and all(n in r.metrics for n in objectives)]
    if not ok:
        return "no successful evaluation yet"
    pts = np.array([[r.metrics[n] for n in objectives] for r in ok])
    front = int(non_dominated(pts, list(objectives.values())).sum())
    first, direction = next(iter(objectives.items()))
    best = max(pts[:, 0]) if direction == "max" else min(pts[:, 0])
    failed = sum(r.status != "ok" for r in records)
    return f"best {first}={best:.4g} front={front} failed={failed}"


__all__ = ["Budget", "StudyResult", "run_study", "to_minimisation"]
