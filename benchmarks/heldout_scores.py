"""Score schedules on held-out seeds for a benchmark: one store per work directory, so a schedule several fronts
share (or a re-run) is scored once. Shared by joint_vs_separate.py and search_cost.py."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from schedsearch.calibration.calibration_set import CalibrationSet, default_spec
from schedsearch.evaluation.local import LocalEvaluator
from schedsearch.results.store import ResultStore
from schedsearch.search.fixed import score_schedules


def score_on_heldout(model: Any, schedules: Iterable[Any], samples: int, cache_dir: Path, store_path: Path,
                     objectives: Mapping[str, str]) -> tuple[dict[str, dict[str, float]], LocalEvaluator]:
    """{schedule key: held-out metrics} for every schedule (its `samples` held-out seeds, 1,000,000 + i; the
    calibration set under `cache_dir`), stored in `store_path`, and the evaluator that scored them; an error if any
    failed."""
    spec = default_spec(model.info, samples=samples, split="heldout")
    calibration = CalibrationSet.open(spec, cache_dir).build(model, progress=True)
    evaluator = LocalEvaluator(model, calibration, list(objectives), cost_cache_dir=str(cache_dir))
    unique = {s.key: s for s in schedules}
    study = f"heldout-{samples}"
    with ResultStore(store_path) as store:
        score_schedules(study, list(unique.values()), dict(objectives), evaluator, store, progress=True)
        scored = {r.to_schedule().key: r.metrics for r in store.records(study) if r.status == "ok"}
    missing = [k for k in unique if k not in scored]
    if missing:
        raise RuntimeError(f"{len(missing)} schedules failed on the held-out split; see {store_path}")
    return {k: scored[k] for k in unique}, evaluator
