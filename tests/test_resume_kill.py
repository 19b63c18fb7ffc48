"""A driver killed with SIGKILL mid-study loses no finished evaluation, and the resumed study picks up from the store.

The driver is a real process running `run_study` with the in-process evaluator (a sleeping fake model, so the test
is fast); the parent kills it once some records are stored, then resumes the same study to the end.
"""

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from schedsearch.results.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import json, sys
from schedsearch.evaluation.ray_evaluator import SleepEvaluator
from schedsearch.results.store import ResultStore
from schedsearch.search.base import Budget
from schedsearch.search.loop import run_study
from schedsearch.methods import make_strategy
from schedsearch.spaces.base import ModelStructure
from schedsearch.spaces.registry import make_space

structure, store_path, n = ModelStructure(**json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3])
space = make_space("solver", structure, nfe_range=(4, 6))
strategy = make_strategy("tpe", space, 2, seed=0)
evaluator = SleepEvaluator(delay_s=0.15)
with ResultStore(store_path) as store:
    result = run_study(study="kill", space=space, strategy=strategy, objectives={"score": "max", "nfe": "min"},
                       evaluator=evaluator, store=store, budget=Budget(evaluations=n), progress=False)
print(json.dumps({"evaluations": result.evaluations, "records": len(result.records)}))
"""


def _count(path: Path) -> int:
    if not path.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    except sqlite3.Error:
        return 0


def _driver(structure: str, store: Path, n: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, structure, str(store), str(n)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkilled_driver_resumes_without_losing_evaluations(tmp_path, builtin_model):
    from schedsearch.runtime.models import model_structure

    fields = dataclasses.asdict(model_structure(builtin_model.info))
    fields.pop("extra")
    structure = json.dumps(fields)
    store_path = tmp_path / "results.sqlite"

    proc = _driver(structure, store_path, 40)
    deadline = time.monotonic() + 60
    while _count(store_path) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"driver ended before the kill: {proc.communicate()[1][-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    with ResultStore(store_path) as store:
        before = {r.key: r for r in store.records("kill")}
    assert 6 <= len(before) < 40

    resumed = _driver(structure, store_path, 40)  # the same command: the budget is the study's total
    out, err = resumed.communicate(timeout=90)
    assert resumed.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])

    with ResultStore(store_path) as store:
        after = store.records("kill")
    by_key = {r.key: r for r in after}
    assert len(by_key) == len(after)  # no candidate stored twice
    for key, record in before.items():  # every evaluation finished before the kill is still there, unchanged
        assert by_key[key] == record
    # only new candidates were evaluated, and the study stops where an uninterrupted one would: at 40 in all (the
    # budget is checked between asks, so the last batch of 8 may finish)
    assert summary["evaluations"] == len(after) - len(before)
    assert 40 <= len(after) < 40 + 8
    assert summary["records"] == len(after)  # the resumed study sees (and warm-starts from) the old records
