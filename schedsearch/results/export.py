"""Export a study's Pareto front: one `schedsearch.schedule/v1` file per non-dominated schedule, plus an index.

The exported directory is what a user takes away from a study: `schedsearch.load_schedule(file)` reads any
schedule back, `schedsearch.apply_schedule(pipe, schedule)` runs it, and `index.json` says which trade-off each file
is (its metrics, the knee point). The directory is written whole into a temporary sibling and renamed into place, so
a reader (or a killed export) sees the old front or the new one, never a mix, and a re-export leaves no stale files.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from schedsearch.errors import UserInputError
from schedsearch.results.query import Front, compare_with_baselines, study_front
from schedsearch.results.store import Record, ResultStore
from schedsearch.spaces.schedule import Schedule

__all__ = ["INDEX_FORMAT", "ExportError", "export_front", "front_records"]

INDEX_FORMAT = "schedsearch.front/v1"
INDEX_NAME = "index.json"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


class ExportError(UserInputError):
    """Nothing (valid) to export; the message names the study and what is missing."""


def _front(store: ResultStore, study: str, objectives: Mapping[str, str] | str | None) -> Front:
    try:
        return study_front(store, study, objectives)
    except UserInputError as exc:
        raise ExportError(exc.field, exc.problem, exc.fix) from exc


def front_records(
    store: ResultStore, study: str, objectives: Mapping[str, str] | str | None = None
) -> tuple[list[Record], dict[str, str], int]:
    """The study's front (`results.query.study_front`): its records best-first, the objectives, the knee's index."""
    front = _front(store, study, objectives)
    return list(front.records), front.objectives, front.knee


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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one step (Linux `renameat2(RENAME_EXCHANGE)`, glibc ≥ 2.28). Python's `os` has
    no such call, so it is reached through ctypes; False where the platform or filesystem lacks it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put the complete `tmp` at `out`. At every instant `out` is the old complete export or the new one: a rename
    where there was none, else an atomic exchange (the old one lands in `tmp` and is removed). Without the exchange
    call (not Linux) two renames leave a moment with no `out`, and a kill there leaves the old one in `.old-*`."""
    if not out.exists():
        tmp.rename(out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
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


def _remove_stale(out: Path) -> list[Path]:
    """Temporaries a killed export left beside `out` (`.<name>.tmp-*`, `.<name>.old-*`, named by mkdtemp):
    removed by the next export of the same directory."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-[A-Za-z0-9_]{{8}}$")
    stale = [p for p in out.parent.iterdir() if pattern.match(p.name) and p.is_dir() and not p.is_symlink()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


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
    objectives: Mapping[str, str] | str | None = None,
    fmt: str = "schedsearch",
    only: Sequence[str] | None = None,
) -> Path:
    """Write every Pareto-optimal schedule of `study` as `<out>/<rank>_<key>.json` and `<out>/index.json`.

    objectives: metric name -> "min" | "max"; default: the study's own (`store.study_settings(study)`).
    Each schedule's `meta` gets the study, the record key, its metrics and front position; the schedule's content
    key is unchanged (meta is not hashed). fmt "diffusers" / "cache-dit" also writes each schedule in that
    runtime's own config format (`results.runtime_export`), or the reason it cannot be, in the index. `only`:
    record keys to export (`pick`), default the whole front. Returns the output directory.
    """
    from schedsearch.results.runtime_export import FORMATS, NotExpressible, model_time_kind, runtime_files

    if fmt not in FORMATS:
        raise ExportError("--format", f"unknown {fmt!r}", f"use one of {', '.join(FORMATS)}")
    if fmt == "cache-dit":
        from schedsearch.runtime.cache_dit_runtime import require_cache_dit

        require_cache_dit("--format cache-dit")
    out = Path(out_dir)
    front = _front(store, study, objectives)
    records, objectives, knee = list(front.records), front.objectives, front.knee
    if only is not None:
        knee_key = records[knee].key
        records = [r for r in records if r.key in set(only)]
        knee = next((i for i, r in enumerate(records) if r.key == knee_key), 0)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    kind = model_time_kind(records[0].to_schedule().model) if fmt == "diffusers" and records else None
    width = max(3, len(str(len(records) - 1)))
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the export is meant to be shared
    try:
        entries = []
        for rank, record in enumerate(records):
            schedule = record.to_schedule()
            metrics = {name: record.metrics[name] for name in sorted(record.metrics)}
            checked = front.heldout.get(schedule.key)
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
            schedule = dataclasses.replace(schedule, meta=meta)
            name = f"{rank:0{width}d}_{record.key}.json"
            (tmp / name).write_text(schedule.to_json())
            runtime: dict[str, Any] | None = None
            if fmt != "schedsearch":
                files = runtime_files(schedule, fmt, name.removesuffix(".json"), kind)
                if isinstance(files, NotExpressible):
                    runtime = {"format": fmt, "not_expressible": files.reason}
                else:
                    for file_name, text in files.items():
                        (tmp / file_name).write_text(text)
                    runtime = {"format": fmt, "files": sorted(files)}
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
                    **({"runtime": runtime} if runtime is not None else {}),
                }
            )
        comparison = {}
        for split in ("search", "heldout"):
            found = compare_with_baselines(store, study, split)
            if found is not None:
                comparison[split] = {"baselines_front": list(found.baselines), "dominated": list(found.dominated),
                                     "dominated_intervals_apart": list(found.separated),
                                     "on_front": list(found.on_front), "front_scored": found.front}
        hashes = sorted({r.calibration_hash for r in records})
        index = {
            "format": INDEX_FORMAT,
            "study": study,
            "objectives": objectives,
            "calibration_hash": hashes[0] if len(hashes) == 1 else hashes,
            "knee": records[knee].key,
            "schedules": entries,
            "baselines": comparison,  # the front vs the space's hand-made baselines' front, by split
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
