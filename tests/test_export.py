"""Front export: the files are exactly the brute-force Pareto set, load back, mark the knee, replace cleanly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import schedsearch
from schedsearch.results.export import INDEX_NAME, ExportError, export_front
from schedsearch.results.pareto import knee_point
from schedsearch.results.store import Record, ResultStore
from schedsearch.spaces.baselines import ddim_plan, linspace_timesteps
from schedsearch.spaces.schedule import Schedule

OBJECTIVES = {"psnr": "max", "nfe": "min", "latency_s": "min"}
CAL = "cal0"


def _schedule(i: int) -> Schedule:
    steps = 2 + i % 7
    ts = tuple(t - (i // 7) for t in linspace_timesteps(1000, steps))  # distinct timesteps → distinct keys
    return Schedule(model="builtin:mnist-dit", solver=ddim_plan(ts), meta={"origin": f"s{i}"})


def _fill(store: ResultStore, study: str, n: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    store.set_study_settings(study, {"objectives": OBJECTIVES, "calibration": CAL})
    records = []
    for i in range(n):
        metrics = {
            "psnr": float(rng.uniform(10, 40)),
            "nfe": float(rng.integers(2, 9)),
            "latency_s": float(rng.uniform(0.1, 2.0)),
            "extra": 1.0,
        }
        records.append(Record.for_schedule(study, _schedule(i), metrics, calibration_hash=CAL, summary={"i": i}))
    bad = [
        Record.for_schedule(
            study,
            _schedule(n),
            {"psnr": 99.0, "nfe": 1.0, "latency_s": 0.0},
            calibration_hash=CAL,
            status="failed",
            error="boom",
        ),
        Record.for_schedule(
            study, _schedule(n + 1), {"psnr": math.nan, "nfe": 1.0, "latency_s": 0.0}, calibration_hash=CAL
        ),
        Record.for_schedule(study, _schedule(n + 2), {"psnr": 99.0, "nfe": 1.0}, calibration_hash=CAL),  # no latency
        Record.for_schedule(
            study, _schedule(n + 3), {"psnr": 99.0, "nfe": 1.0, "latency_s": 0.0}, calibration_hash="other-calibration"
        ),
    ]
    store.append_many(records + bad)
    return records


def _brute_front(records: list[Record]) -> set[str]:
    def better_or_equal(a: Record, b: Record) -> bool:
        return all(
            (a.metrics[k] >= b.metrics[k]) if d == "max" else (a.metrics[k] <= b.metrics[k])
            for k, d in OBJECTIVES.items()
        )

    return {
        r.key
        for r in records
        if not any(better_or_equal(o, r) and o.metrics != r.metrics and o is not r for o in records)
    }


def test_front_matches_brute_force_and_files_load_back(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        records = _fill(store, "s", 60)
        _fill(store, "other", 5, seed=1)  # another study must not leak in
        out = export_front(store, "s", tmp_path / "front")
    index = json.loads((out / INDEX_NAME).read_text())
    expected = _brute_front(records)
    assert {e["key"] for e in index["schedules"]} == expected and len(expected) > 3
    assert index["study"] == "s" and index["objectives"] == OBJECTIVES and index["calibration_hash"] == CAL
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX_NAME, *(e["file"] for e in index["schedules"])])
    by_key = {r.key: r for r in records}
    first, direction = next(iter(index["objectives"].items()))  # the store keeps settings with sorted keys
    values = [e["metrics"][first] for e in index["schedules"]]
    assert values == sorted(values, reverse=direction == "max")  # ordered along the first objective, best first
    for rank, entry in enumerate(index["schedules"]):
        assert entry["file"].startswith(f"{rank:03d}_{entry['key']}")
        schedule = schedsearch.load_schedule(out / entry["file"])
        record = by_key[entry["key"]]
        assert schedule.key == record.to_schedule().key == entry["schedule_key"]
        assert schedule.meta["origin"] == record.to_schedule().meta["origin"]  # existing meta kept
        assert schedule.meta["study"] == "s" and schedule.meta["key"] == entry["key"]
        assert schedule.meta["metrics"] == entry["metrics"] == record.metrics
        assert entry["summary"] == record.summary
        assert entry["diffusers"]["timesteps"] == [int(t) for t in schedule.solver.timesteps]
    # knee: the same point pareto.knee_point picks on the front
    points = np.array([[e["metrics"][k] for k in OBJECTIVES] for e in index["schedules"]])
    knee = index["schedules"][knee_point(points, list(OBJECTIVES.values()))]
    assert index["knee"] == knee["key"] and knee["knee"]
    assert sum(e["knee"] for e in index["schedules"]) == 1
    assert schedsearch.load_schedule(out / knee["file"]).meta["knee"] is True


def test_explicit_objectives_and_reexport_replace_cleanly(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        records = _fill(store, "s", 40)
        out = export_front(store, "s", tmp_path / "front")
        first = set(p.name for p in out.iterdir())
        (out / "stale.json").write_text("{}")  # a leftover of an older export
        out2 = export_front(store, "s", tmp_path / "front", objectives={"psnr": "max", "nfe": "min"})
    assert out2 == out
    index = json.loads((out / INDEX_NAME).read_text())
    names = set(p.name for p in out.iterdir())
    assert "stale.json" not in names and names == {INDEX_NAME, *(e["file"] for e in index["schedules"])}
    assert names != first
    assert index["objectives"] == {"psnr": "max", "nfe": "min"}
    two = [r for r in records]
    keys = {e["key"] for e in index["schedules"]}
    for r in two:  # every exported schedule is non-dominated in (psnr, nfe)
        if r.key in keys:
            assert not any(
                o.metrics["psnr"] >= r.metrics["psnr"]
                and o.metrics["nfe"] <= r.metrics["nfe"]
                and (o.metrics["psnr"], o.metrics["nfe"]) != (r.metrics["psnr"], r.metrics["nfe"])
                for o in two
            )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".front")]  # no temp dirs left


def test_errors_are_clear(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        with pytest.raises(ExportError, match="'nope' is not in"):
            export_front(store, "nope", tmp_path / "out")
        schedule = _schedule(0)
        store.append(Record.for_schedule("failed-only", schedule, {"psnr": 1.0}, calibration_hash=CAL, status="failed"))
        with pytest.raises(ExportError, match="no objectives"):
            export_front(store, "failed-only", tmp_path / "out")
        with pytest.raises(ExportError, match="nothing to export"):
            export_front(store, "failed-only", tmp_path / "out", objectives={"psnr": "max"})
        with pytest.raises(ExportError, match="direction"):
            export_front(store, "failed-only", tmp_path / "out", objectives={"psnr": "up"})
        _fill(store, "s", 5)
        foreign = tmp_path / "mine"
        foreign.mkdir()
        (foreign / "notes.txt").write_text("keep me")
        with pytest.raises(ExportError, match="not an exported front"):
            export_front(store, "s", foreign)
        assert (foreign / "notes.txt").read_text() == "keep me"
    assert not Path(tmp_path / "out").exists()


KILLED_EXPORT = """
import os, pathlib, shutil, sys
import schedsearch.results.export as export
from schedsearch.results.store import ResultStore

point = sys.argv[3]
if point == "writing":  # killed with half the schedule files written
    original, calls = pathlib.Path.write_text, [0]
    def write_text(self, *a, **k):
        calls[0] += 1
        if calls[0] == 3:
            os._exit(9)
        return original(self, *a, **k)
    pathlib.Path.write_text = write_text
elif point == "before-swap":
    export._replace_dir = lambda tmp, out: os._exit(9)
elif point == "after-swap":  # the new front is in place, the old one not yet removed
    shutil.rmtree = lambda *a, **k: os._exit(9)
with ResultStore(sys.argv[1]) as store:
    export.export_front(store, "new", sys.argv[2])
"""


def _complete(out: Path) -> set[str]:
    index = json.loads((out / INDEX_NAME).read_text())
    files = {e["file"] for e in index["schedules"]}
    assert {p.name for p in out.iterdir()} == files | {INDEX_NAME}
    return files


@pytest.mark.parametrize("point", ["writing", "before-swap", "after-swap"])
def test_a_killed_export_leaves_the_old_or_the_new_front_whole(tmp_path, point):
    """At every instant --out is a complete export; the next export removes what a killed one left behind."""
    import subprocess
    import sys

    db, out = tmp_path / "r.db", tmp_path / "front"
    with ResultStore(db) as store:
        _fill(store, "old", 30)
        _fill(store, "new", 30, seed=5)
        old = _complete(export_front(store, "old", out))
        new = _complete(export_front(store, "new", tmp_path / "reference"))
    assert old != new
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(db), str(out), point], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    assert _complete(out) == (new if point == "after-swap" else old)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".front.")]
    assert leftovers  # what the kill left behind
    with ResultStore(db) as store:
        assert _complete(export_front(store, "new", out)) == new
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".front.")]
