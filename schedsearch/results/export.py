"""Export a study's Pareto front: one `schedsearch.schedule/v1` file per non-dominated schedule, plus an index.

The exported directory is what a user takes away from a study: `schedsearch.load_schedule(file)` reads any
schedule back, `schedsearch.apply_schedule(pipe, schedule)` runs it, and `index.json` says which trade-off each file
is (its metrics, the knee point). The directory is written whole into a temporary sibling and renamed into place, so
a reader (or a killed export) sees the old front or the new one, never a mix, and a re-export leaves no stale files.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from schedsearch.results.pareto import knee_point, non_dominated
from schedsearch.results.store import Record, ResultStore, settings_objectives
from schedsearch.spaces.schedule import Schedule

__all__ = ["INDEX_FORMAT", "ExportError", "export_front", "front_records"]

INDEX_FORMAT = "schedsearch.front/v1"
INDEX_NAME = "index.json"


class ExportError(ValueError):
    """Nothing (valid) to export; the message names the study and what is missing."""


def _objectives_of(store: ResultStore, study: str, objectives: Mapping[str, str] | None) -> dict[str, str]:
    if objectives is None:
        objectives = settings_objectives(store.study_settings(study))
        if not objectives:
            raise ExportError(
                f"study {study!r} has no objectives in its settings; pass objectives={{name: 'min' | 'max'}}"
            )
    objectives = dict(objectives)
    if not objectives:
        raise ExportError("objectives: give at least one {name: 'min' | 'max'}")
    for name, direction in objectives.items():
        if direction not in ("min", "max"):
            raise ExportError(f"objectives[{name!r}]: direction {direction!r}; use 'min' or 'max'")
    return objectives


def front_records(
    store: ResultStore, study: str, objectives: Mapping[str, str] | None = None
) -> tuple[list[Record], dict[str, str], int]:
    """The study's Pareto-optimal ok records (best in the first objective first), the objectives used, and the
    knee's position in that list. Records lacking an objective (or with NaN) cannot be ranked and are left out; so
    are records scored against another calibration set than the study's, whose metrics are not comparable."""
    if study not in store.studies():
        known = ", ".join(repr(s) for s in store.studies()) or "none"
        raise ExportError(f"study {study!r} is not in {store.path} (studies: {known})")
    objectives = _objectives_of(store, study, objectives)
    calibration = (store.study_settings(study) or {}).get("calibration")
    usable = [
        r
        for r in store.records(study)
        if r.status == "ok"
        and (calibration is None or r.calibration_hash == calibration)
        and all(math.isfinite(r.metrics.get(name, math.nan)) for name in objectives)
    ]
    if not usable:
        raise ExportError(f"study {study!r} has no ok record with finite metrics {list(objectives)}: nothing to export")
    directions = list(objectives.values())
    points = np.array([[r.metrics[n] for n in objectives] for r in usable], dtype=float)
    front = np.flatnonzero(non_dominated(points, directions))
    # Order along the front: best first objective first, ties by the next objectives, then by key (deterministic).
    signs = np.array([1.0 if d == "min" else -1.0 for d in directions])
    order = sorted(front, key=lambda i: (*(points[i] * signs), usable[i].key))
    records = [usable[i] for i in order]
    knee = knee_point(points[order], directions)
    return records, objectives, knee


def _diffusers_hint(schedule: Schedule) -> dict[str, Any]:
    """What a stock diffusers scheduler needs to approximate the solver plan: `pipe(timesteps=..., ...)` with a
    scheduler accepting custom timesteps. Only `apply_schedule` runs the plan exactly (orders, correctors, DC)."""
    ts = list(schedule.solver.timesteps)
    integral = all(float(t).is_integer() for t in ts)
    return {
        "num_inference_steps": len(ts),
        "timesteps": [int(t) for t in ts] if integral else ts,
        "final_timestep": schedule.solver.final_timestep,
        "note": "sampler time; for flow-matching models apply_schedule maps it through the shift",
    }


def _replace_dir(tmp: Path, out: Path) -> None:
    """Swap `tmp` into `out`: a rename each, so `out` is never half written."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(out: Path) -> None:
    """Refuse to replace a directory we did not write: a wrong --out must not delete someone's files."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        index = out / INDEX_NAME
        try:
            ours = json.loads(index.read_text()).get("format") == INDEX_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ExportError(f"{out}: not empty and not an exported front (no {INDEX_NAME}); choose another directory")


def export_front(
    store: ResultStore,
    study: str,
    out_dir: str | Path,
    objectives: Mapping[str, str] | None = None,
) -> Path:
    """Write every Pareto-optimal schedule of `study` as `<out>/<rank>_<key>.json` and `<out>/index.json`.

    objectives: metric name -> "min" | "max"; default: the study's own (`store.study_settings(study)`).
    Each schedule's `meta` gets the study, the record key, its metrics and front position; the schedule's content
    key is unchanged (meta is not hashed). Returns the output directory.
    """
    out = Path(out_dir)
    records, objectives, knee = front_records(store, study, objectives)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(len(records) - 1)))
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the export is meant to be shared
    heldout = {r.to_schedule().key: r.metrics for r in store.records(f"{study}@heldout") if r.status == "ok"}
    try:
        entries = []
        for rank, record in enumerate(records):
            schedule = record.to_schedule()
            metrics = {name: record.metrics[name] for name in sorted(record.metrics)}
            checked = heldout.get(schedule.key)
            meta = dict(schedule.meta) | {
                "study": study,
                "key": record.key,
                "metrics": metrics,
                "front_rank": rank,
                "knee": rank == knee,
                "calibration_hash": record.calibration_hash,
            }
            if checked is not None:  # re-scored on the held-out split (run_search's validate step)
                meta["heldout_metrics"] = {name: checked[name] for name in sorted(checked)}
            schedule = Schedule(model=schedule.model, solver=schedule.solver, cache=schedule.cache, meta=meta)
            name = f"{rank:0{width}d}_{record.key}.json"
            (tmp / name).write_text(schedule.to_json())
            entries.append(
                {
                    "file": name,
                    "key": record.key,
                    "schedule_key": schedule.key,
                    "model": schedule.model,
                    "knee": rank == knee,
                    "metrics": metrics,
                    "heldout_metrics": meta.get("heldout_metrics"),
                    "summary": record.summary,
                    "diffusers": _diffusers_hint(schedule),
                }
            )
        hashes = sorted({r.calibration_hash for r in records})
        index = {
            "format": INDEX_FORMAT,
            "study": study,
            "objectives": objectives,
            "calibration_hash": hashes[0] if len(hashes) == 1 else hashes,
            "knee": records[knee].key,
            "schedules": entries,
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
