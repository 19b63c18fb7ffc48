"""Every bad input is refused before any write or expensive work: exit 2, one `error: <field>: ...` line naming the
field, no file written, the store's bytes unchanged, never a traceback (table-driven, through the real CLI)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from schedsearch.cli import EXIT_BAD_INPUT, main
from schedsearch.results.store import Record, ResultStore
from schedsearch.spaces import baselines
from schedsearch.spaces.schedule import Schedule, save_schedule

MODEL = "builtin:mnist-dit"
OBJECTIVES = [["psnr", "max"], ["macs", "min"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A directory with a finished study (records by hand), a good schedule and bad files."""
    root = tmp_path_factory.mktemp("bad")
    plan = baselines.dpm_solver_plan(baselines.linspace_timesteps(1000, 6), 2)
    good = Schedule(model=MODEL, solver=plan)
    save_schedule(good, root / "good.json")
    with ResultStore(root / "r.db") as store:
        store.set_study_settings("starting", {"objectives": OBJECTIVES, "calibration": "cal"})  # no record yet
        store.set_study_settings("done", {"objectives": OBJECTIVES, "calibration": "cal"})
        for i, psnr in enumerate((20.0, 25.0, 30.0)):
            ts = tuple(t - i for t in plan.timesteps)
            schedule = Schedule(model=MODEL, solver=baselines.dpm_solver_plan(ts, 2))
            store.append(Record.for_schedule("done", schedule, {"psnr": psnr, "macs": 1e9 - i}, calibration_hash="cal"))
    data = good.to_dict()

    def variant(name: str, change) -> None:
        d = json.loads(json.dumps(data))
        change(d)
        (root / name).write_text(json.dumps(d))

    variant("ts_str.json", lambda d: d["solver"].__setitem__("timesteps", [str(t) for t in d["solver"]["timesteps"]]))
    variant("dc_neg.json", lambda d: d["solver"]["steps"][3].__setitem__("dc_ratio", -1))
    variant("dc_huge.json", lambda d: d["solver"]["steps"][3].__setitem__("dc_ratio", 1e9))
    variant("order_float.json", lambda d: d["solver"]["steps"][1].__setitem__("order", 2.0))
    variant("other_model.json", lambda d: d.__setitem__("model", "diffusers:someone/else"))
    variant("unit_frac.json", lambda d: d.__setitem__("cache", {"kind": "unit", "group": "transformer_blocks",
                                                                "start": 0, "end": 6, "refresh_steps": [0, 2.5, 4],
                                                                "num_steps": 6}))
    variant("unit_str.json", lambda d: d.__setitem__("cache", {"kind": "unit", "group": "transformer_blocks",
                                                               "start": "1", "end": 6, "refresh_steps": [0, 2],
                                                               "num_steps": 6}))
    variant("row_int.json", lambda d: d.__setitem__("cache", {"kind": "components",
                                                              "layout": "transformer_blocks[6](attn1,ff)",
                                                              "recompute": [111111111111] * 6}))
    variant("layout.json", lambda d: d.__setitem__("cache", {"kind": "components", "layout": "blocks[2](attn1)",
                                                             "recompute": ["11"] * 6}))
    variant("dc_order_float.json", lambda d: d["solver"].__setitem__("dc_order", 2.0))
    variant("final_str.json", lambda d: d["solver"].__setitem__("final_timestep", "0"))
    variant("layout_int.json", lambda d: d.__setitem__("cache", {"kind": "components", "layout": 5,
                                                                 "recompute": ["11"] * 6}))
    (root / "broken.json").write_text('{"format": "schedsearch.schedule/v1", "solver": [')
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "binary.json").write_bytes(b"\x00\xff\xfe" * 10)
    (root / "adir.json").mkdir()
    (root / "notes.txt").write_text("not a store")
    (root / "foreign").mkdir()
    (root / "foreign" / "keep.txt").write_text("keep me")
    (root / "empty_prompts.txt").write_text("# nothing\n")
    return root


SEARCH = ["search", "--space", "cache", "--strategy", "ecad", "--objectives", "psnr,macs", "--budget", "2",
          "--study", "new", "--store", "{root}/r.db"]
SOLVER_SEARCH = ["search", "--space", "solver", "--strategy", "nsga2", "--objectives", "psnr,nfe", "--budget", "2",
                 "--study", "new", "--store", "{root}/r.db"]
EVALUATE = ["evaluate", "--schedule", "{root}/good.json", "--objectives", "psnr,macs", "--samples", "4"]
SAMPLE = ["sample", "--out", "{root}/grid.png"]
FRONT = ["front", "--store", "{root}/r.db", "--study", "done"]
EXPORT = ["export", "--store", "{root}/r.db", "--study", "done", "--out", "{root}/front"]

CASES = [  # (argv, the field the error must name)
    ([*SAMPLE, "--schedule", "{root}/missing.json"], "missing.json"),
    ([*SAMPLE, "--schedule", "{root}/adir.json"], "adir.json: is a directory"),
    ([*SAMPLE, "--schedule", "{root}/binary.json"], "binary.json: is not UTF-8"),
    ([*SAMPLE, "--schedule", "{root}/deep.json"], "deep.json: is nested too deeply"),
    ([*SAMPLE, "--schedule", "{root}/broken.json"], "broken.json: not valid JSON"),
    ([*SAMPLE, "--schedule", "{root}/ts_str.json"], "solver.timesteps[0]"),
    ([*SAMPLE, "--schedule", "{root}/dc_neg.json"], "solver.steps[3].dc_ratio"),
    ([*SAMPLE, "--schedule", "{root}/dc_huge.json"], "solver.steps[3].dc_ratio"),
    ([*SAMPLE, "--schedule", "{root}/order_float.json"], "solver.steps[1].order"),
    ([*SAMPLE, "--schedule", "{root}/unit_frac.json"], "cache.refresh_steps[1]"),
    ([*SAMPLE, "--schedule", "{root}/unit_str.json"], "cache.start"),
    ([*SAMPLE, "--schedule", "{root}/row_int.json"], "cache.recompute[0]"),
    ([*SAMPLE, "--schedule", "{root}/layout.json"], "cache.layout"),
    ([*SAMPLE, "--schedule", "{root}/other_model.json"], "field 'model'"),
    ([*SAMPLE, "--schedule", "{root}/dc_order_float.json"], "solver.dc_order"),
    ([*SAMPLE, "--schedule", "{root}/final_str.json"], "solver.final_timestep"),
    ([*SAMPLE, "--schedule", "{root}/layout_int.json"], "cache.layout"),
    ([*SAMPLE, "--classes", "1,12"], "--classes"),
    ([*SAMPLE, "--classes", "one"], "--classes"),
    ([*SAMPLE, "--n-per-class", "0"], "--n-per-class"),
    ([*SAMPLE, "--batch-size", "0"], "--batch-size"),
    ([*SAMPLE, "--steps", "0"], "--steps"),
    ([*SAMPLE, "--guidance", "nan"], "--guidance"),
    ([*SAMPLE, "--seed", "-1"], "--seed"),
    (["sample", "--out", "{root}/grid.jpg"], "--out"),
    ([*SAMPLE, "--model", "builtin:nope"], "--model"),
    ([*EVALUATE[:4], "psnr,sharpness", *EVALUATE[5:]], "--objectives"),
    ([*EVALUATE[:4], ",", *EVALUATE[5:]], "--objectives"),
    ([*EVALUATE[:-1], "0"], "--samples"),
    ([*EVALUATE, "--batch-size", "0"], "--batch-size"),
    ([*EVALUATE, "--guidance", "-2"], "--guidance"),
    ([*EVALUATE[:2], "{root}/layout.json", *EVALUATE[3:]], "cache.layout"),  # before any teacher image is built
    ([*EVALUATE, "--prompts", "{root}/missing.txt"], "--prompts"),
    ([*SEARCH[:8], "0", *SEARCH[9:]], "--budget"),
    ([*SEARCH, "--time-limit", "-5"], "--time-limit"),
    ([*SEARCH, "--generations", "0"], "--generations"),
    ([*SEARCH, "--samples", "0"], "--samples"),
    ([*SEARCH, "--batch-size", "0"], "--batch-size"),
    ([*SEARCH, "--prefix-memory", "0"], "--prefix-memory"),
    ([*SEARCH, "--guidance-2", "nan"], "--guidance-2"),
    ([*SEARCH, "--guidance-2", "2"], "--guidance-2: builtin:mnist-dit runs one network"),
    ([*SEARCH, "--prefix-memory", "inf"], "--prefix-memory"),
    ([*SEARCH, "--workers", "0"], "--workers"),
    ([*SEARCH, "--seed", "-1"], "--seed"),
    ([*SEARCH, "--guidance", "-1"], "--guidance"),
    ([*SEARCH, "--low-fidelity-samples", "0"], "--low-fidelity-samples"),
    ([*SEARCH, "--samples", "8", "--low-fidelity-samples", "8"], "--low-fidelity-samples"),
    ([*SEARCH[:6], "psnr,psnr", *SEARCH[7:]], "--objectives"),
    ([*SEARCH[:6], "psnr,speed", *SEARCH[7:]], "--objectives"),
    ([*SOLVER_SEARCH[:4], "dp", *SOLVER_SEARCH[5:]], "--strategy"),
    ([*SOLVER_SEARCH, "--no-block-skip"], "--no-block-skip"),
    ([*SEARCH[:4], "tpe", *SEARCH[5:], "--shift-seeds"], "--shift-seeds"),
    ([*SEARCH[:4], "tpe", *SEARCH[5:], "--screen", "8"], "--screen"),
    ([*SEARCH, "--screen", "1"], "--screen"),
    ([*SEARCH, "--prompts", "{root}/empty_prompts.txt"], "--prompts"),
    ([*SEARCH[:10], "done", *SEARCH[11:]], "--study"),  # exists: --resume needed
    ([*SEARCH, "--resume"], "--resume"),  # nothing to resume
    ([*SEARCH[:12], "{root}/adir.json"], "adir.json: is a directory"),
    ([*FRONT[:4], "nope"], "--study"),
    ([*FRONT[:4], "starting"], "--study: 'starting' has no records yet"),
    ([FRONT[0], "--store", "{root}/missing.db", *FRONT[3:]], "--store"),
    ([FRONT[0], "--store", "{root}/notes.txt", *FRONT[3:]], "notes.txt: not a results store"),
    ([*FRONT, "--objectives", "lpips"], "--objectives"),
    ([*FRONT, "--all", "--on", "heldout"], "--on"),
    ([*FRONT, "--on", "heldout"], "--on"),
    ([*EXPORT[:-1], "{root}/notes.txt"], "notes.txt: exists and is not a directory"),
    ([*EXPORT[:-1], "{root}/foreign"], "foreign: not empty and not an exported front"),
    ([*EXPORT[:4], "nope", *EXPORT[5:]], "--study"),
    ([*EXPORT, "--objectives", "psnr,fid"], "--objectives"),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its content hash (SQLite's transient -wal/-shm files aside)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if not p.name.endswith(("-wal", "-shm"))}


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40 and len({tuple(argv) for argv, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("argv", "field"), CASES, ids=[f"{a[0]}-{f}"[:60] for a, f in CASES])
def test_bad_input_is_refused_before_any_write(world, capsys, argv, field):
    before = _snapshot(world)
    code = main([a.format(root=world) for a in argv])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and field in lines[-1], err
    assert "Traceback" not in err
    assert _snapshot(world) == before  # no file written, the store's bytes unchanged


def test_a_non_numeric_metric_in_the_store_reads_as_missing(tmp_path, capsys):
    """A hand-edited store with a metric that is not a number: `front` shows the rest, it does not crash."""
    import sqlite3

    plan = baselines.dpm_solver_plan(baselines.linspace_timesteps(1000, 6), 2)
    with ResultStore(tmp_path / "r.db") as store:
        store.set_study_settings("s", {"objectives": OBJECTIVES, "calibration": "cal"})
        for i in range(2):
            schedule = Schedule(model=MODEL, solver=baselines.dpm_solver_plan(tuple(t - i for t in plan.timesteps), 2))
            store.append(Record.for_schedule("s", schedule, {"psnr": 20.0 + i, "macs": 1e9}, calibration_hash="cal"))
    with sqlite3.connect(tmp_path / "r.db") as conn:  # an edit outside schedsearch (the id is new, so allowed)
        row = list(conn.execute("SELECT * FROM records WHERE id = 2").fetchone())
        row[0], row[2] = None, "edited"
        row[4] = '{"macs": 1e9, "psnr": "high"}'
        conn.execute(f"INSERT INTO records VALUES ({', '.join('?' * len(row))})", row)
    assert main(["front", "--store", str(tmp_path / "r.db"), "--study", "s", "--format", "json"]) == 0
    assert [r["psnr"] for r in json.loads(capsys.readouterr().out)] == [21.0]
    assert main(["front", "--store", str(tmp_path / "r.db"), "--study", "s", "--all", "--format", "csv"]) == 0
