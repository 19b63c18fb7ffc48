"""The results store: round trips, dedupe, append-only, path errors, frames, and surviving SIGKILL mid-append."""

from __future__ import annotations

import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from schedsearch.results.store import Record, ResultStore, StoreError, candidate_key
from schedsearch.spaces.baselines import ddim_plan, linspace_timesteps
from schedsearch.spaces.schedule import Schedule

REPO = Path(__file__).resolve().parents[1]


def _record(i: int, study: str = "s", **overrides) -> Record:
    fields = dict(
        study=study,
        key=f"k{i:06d}",
        schedule_json=f'{{"model": "m", "i": {i}}}',
        metrics={"mse": i * 0.5, "psnr": 1.0 / (i + 1)},
        calibration_hash="cal",
        code_version="0.1.0",
        device="cpu",
        wall_time_s=0.25 * i,
        summary={"nfe": 10 - i % 3, "recompute_fraction": 0.5, "orders": [1, 2]},
    )
    fields.update(overrides)
    return Record(**fields)


def test_round_trip_and_queries(tmp_path):
    a0, b1, a2 = _record(0, "a"), _record(1, "b"), _record(2, "a")
    with ResultStore(tmp_path / "r.db") as store:
        assert store.records() == [] and store.studies() == [] and len(store) == 0
        assert store.append(a0) is True
        assert store.append_many([b1, a2]) == [True, True]
        assert store.studies() == ["a", "b"]
        assert store.keys("a") == {"k000000", "k000002"}
        assert store.has("a", "k000000") and not store.has("b", "k000000")
        assert store.records("a") == [a0, a2]
        assert store.get("b", "k000001") == b1 and store.get("b", "nope") is None
        assert store.count("a") == 2 and len(store) == 3
    with ResultStore(tmp_path / "r.db", create=False) as again:  # persisted
        assert again.records() == [a0, b1, a2]


def test_duplicate_key_in_a_study_is_ignored_and_reported(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        first = _record(1)
        assert store.append(first)
        assert store.append(_record(1, metrics={"mse": 99.0})) is False
        assert store.records() == [first]  # the original survives
        assert store.append_many([_record(2), _record(1), _record(2)]) == [True, False, False]
        assert store.append(_record(1, study="other"))  # another study may hold the same candidate
        assert [r.study for r in store.find("k000001")] == ["s", "other"]
        assert len(store) == 3


def test_records_from_schedules(tmp_path):
    schedule = Schedule(model="builtin:mnist-dit", solver=ddim_plan(linspace_timesteps(1000, 5)))
    rec = Record.for_schedule("s", schedule, {"mse": 0.1}, calibration_hash="abc", summary={"nfe": 5})
    assert rec.key == candidate_key(schedule, "abc") != candidate_key(schedule, "abd")
    assert rec.code_version and rec.status == "ok"
    with ResultStore(tmp_path / "r.db") as store:
        store.append(rec)
        (back,) = store.records()
    assert back == rec and back.to_schedule() == schedule and back.to_schedule().key == schedule.key


def test_failed_records_and_nan_metrics(tmp_path):
    failed = _record(3, status="failed", error="CUDA out of memory", metrics={"mse": float("nan")})
    with ResultStore(tmp_path / "r.db") as store:
        store.append(failed)
        (back,) = store.records()
    assert back.status == "failed" and back.error == "CUDA out of memory" and math.isnan(back.metrics["mse"])


def test_record_validation():
    with pytest.raises(ValueError, match="status"):
        _record(0, status="done")
    with pytest.raises(TypeError, match="metrics"):
        _record(0, metrics={"mse": "low"})
    with pytest.raises(TypeError, match="summary"):
        _record(0, summary={"x": object()})
    with pytest.raises(ValueError, match="key"):
        _record(0, key="")
    metrics = {"mse": 1}
    rec = _record(0, metrics=metrics)
    metrics["mse"] = 2
    assert rec.metrics == {"mse": 1.0}  # copied on construction


def test_append_only_and_durability_settings(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        store.append(_record(0))
        assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    raw = sqlite3.connect(tmp_path / "r.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw.execute("UPDATE records SET status = 'failed'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw.execute("DELETE FROM records")
    raw.close()


def test_path_errors_name_the_path(tmp_path):
    missing_dir = tmp_path / "nowhere" / "r.db"
    ResultStore(missing_dir).close()  # a fresh `--store runs/x.db` creates its directory
    assert missing_dir.is_file()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match=re.escape(str(blocker))):
        ResultStore(blocker / "r.db")
    with pytest.raises(StoreError, match="is a directory"):
        ResultStore(tmp_path)
    with pytest.raises(StoreError, match="no such results store"):
        ResultStore(tmp_path / "absent.db", create=False)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a database " * 50)
    with pytest.raises(StoreError, match=f"{re.escape(str(text))}.*not a results store"):
        ResultStore(text)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE things (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=f"{re.escape(str(other))}.*not a schedsearch results store"):
        ResultStore(other)
    conn = sqlite3.connect(other)
    assert [n for (n,) in conn.execute("SELECT name FROM sqlite_master")] == ["things"]  # left untouched
    conn.close()


def test_a_reader_sees_appends_while_the_writer_is_open(tmp_path):
    with ResultStore(tmp_path / "r.db") as writer, ResultStore(tmp_path / "r.db") as reader:
        writer.append(_record(0))
        assert reader.keys("s") == {"k000000"}
        writer.append(_record(1))
        assert reader.count() == 2


def test_to_frame(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        empty = store.to_frame()
        assert len(empty) == 0 and {"key", "status", "wall_time_s"} <= set(empty.columns)
        store.append(_record(0, summary={"nfe": 10, "recompute_fraction": 0.4, "mask": [1, 0]}))
        store.append(_record(1, metrics={"mse": 0.2, "lpips": 0.3}, summary={}))
        store.append(_record(2, study="t"))
        df = store.to_frame("s")
        all_rows = store.to_frame()
    assert len(all_rows) == 3
    assert list(df["key"]) == ["k000000", "k000001"]
    assert {"metric.mse", "metric.psnr", "metric.lpips", "summary.nfe", "summary.recompute_fraction"} <= set(df)
    assert "summary.mask" not in df  # lists are not columns
    assert np.isnan(df["metric.lpips"].iloc[0]) and df["metric.lpips"].iloc[1] == 0.3
    assert df["summary.nfe"].iloc[0] == 10 and np.isnan(df["summary.nfe"].iloc[1])
    assert df["wall_time_s"].tolist() == [0.0, 0.25] and df["status"].tolist() == ["ok", "ok"]
    assert df["model"].tolist() == ["m", "m"]
    assert str(df["created_at"].dt.tz) == "UTC"


# ---- crash safety: a writer killed with SIGKILL at random moments -------------------------------------------

# Records come in groups of 3: even groups are one append_many (must be all-or-nothing), odd groups three appends.
# After every commit the writer reports the committed indices on a line of the progress file.
_WRITER = textwrap.dedent(
    """
    import os, sys
    from schedsearch.results.store import Record, ResultStore

    def record(i):
        return Record(
            study="crash", key=f"k{i:06d}", schedule_json='{"model": "m", "i": %d}' % i,
            metrics={"mse": i / 7, "psnr": 30.0 + i}, calibration_hash="cal", code_version="t", device="cpu",
            wall_time_s=i / 3, created_at=f"2024-01-01T00:00:00.{i:06d}+00:00", summary={"i": i, "blob": "x" * 500},
        )

    store_path, progress_path, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
    progress = os.open(progress_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with ResultStore(store_path) as store:
        i = store.count("crash")
        while i < stop:
            if (i // 3) % 2 == 0:
                assert i % 3 == 0, f"a batch was split: resuming at {i}"
                batch = list(range(i, i + 3))
                assert store.append_many([record(j) for j in batch]) == [True] * 3
            else:
                batch = [i]
                assert store.append(record(i))
            os.write(progress, (" ".join(map(str, batch)) + "\\n").encode())
            i = batch[-1] + 1
    """
)


def _expected(i: int) -> Record:
    return Record(
        study="crash",
        key=f"k{i:06d}",
        schedule_json=f'{{"model": "m", "i": {i}}}',
        metrics={"mse": i / 7, "psnr": 30.0 + i},
        calibration_hash="cal",
        code_version="t",
        device="cpu",
        wall_time_s=i / 3,
        created_at=f"2024-01-01T00:00:00.{i:06d}+00:00",
        summary={"i": i, "blob": "x" * 500},
    )


def _reported(progress: Path) -> set[int]:
    if not progress.exists():
        return set()
    lines = progress.read_text().split("\n")[:-1]  # a line cut by the kill has no newline: not reported
    return {int(tok) for line in lines for tok in line.split()}


def _check_store(path: Path, reported: set[int]) -> int:
    with ResultStore(path) as store:
        assert store._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        records = store.records("crash")
    n = len(records)
    assert records == [_expected(i) for i in range(n)]  # contiguous, in order, intact
    assert reported <= set(range(n)), f"reported but lost: {sorted(reported - set(range(n)))}"
    assert n % 3 == 0 or (n // 3) % 2 == 1, f"batch group {n // 3} is partly stored ({n} rows)"
    return n


def test_writer_killed_at_random_moments_loses_nothing_it_reported(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    store_path, progress = tmp_path / "crash.db", tmp_path / "progress.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    rng = np.random.default_rng(0)
    counts = []
    for round_ in range(5):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(store_path), str(progress), "1000000"], env=env, cwd=tmp_path
        )
        before = len(_reported(progress))
        deadline = time.monotonic() + 20
        if round_ > 0:  # round 0 may die anywhere, even while the store is being created
            while len(_reported(progress)) == before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, "the writer stopped before it was killed"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        counts.append(_check_store(store_path, _reported(progress)))
    assert counts == sorted(counts) and counts[-1] > 0

    # Appending resumes where the killed writer stopped (it finishes the group of 3 it is in).
    stop = counts[-1] + 10
    done = subprocess.run([sys.executable, str(script), str(store_path), str(progress), str(stop)], env=env)
    assert done.returncode == 0
    assert stop <= _check_store(store_path, _reported(progress)) < stop + 3


def test_no_sql_path_replaces_or_deletes_a_record_or_a_setting(tmp_path):
    """The append-only promise is SQLite's own: REPLACE INTO (which deletes without firing delete triggers), UPDATE
    and DELETE leave records and settings as they were, also in a store made without the newer triggers."""
    import sqlite3

    path = tmp_path / "r.db"
    with ResultStore(path) as store:
        store.append(_record(0))
        store.set_study_settings("s", {"samples": 4})
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER records_no_replace")  # as a store of an older version has it
    conn.execute("DROP TRIGGER meta_no_update")
    conn.commit()
    conn.close()
    ResultStore(path).close()  # a writable open adds what is missing
    conn = sqlite3.connect(path)
    cols = [c[1] for c in conn.execute("PRAGMA table_info(records)")]
    row = list(conn.execute("SELECT * FROM records").fetchone())
    forged = row.copy()
    forged[cols.index("metrics_json")] = '{"macs": 1, "psnr": 99}'
    conn.execute(f"REPLACE INTO records VALUES ({', '.join('?' * len(cols))})", forged)
    forged[cols.index("key")] = "forged"  # same id, another key: a REPLACE on the primary key
    conn.execute(f"INSERT OR REPLACE INTO records VALUES ({', '.join('?' * len(cols))})", forged)
    conn.commit()
    assert [list(r) for r in conn.execute("SELECT * FROM records")] == [row]
    for sql in ("UPDATE records SET status = 'failed'", "DELETE FROM records",
                "UPDATE meta SET value = '{}' WHERE name = 'study:s'", "DELETE FROM meta WHERE name = 'study:s'",
                "REPLACE INTO meta (name, value) VALUES ('study:s', '{}')"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(sql)
    conn.close()
    with ResultStore(path) as store:
        assert store.study_settings("s") == {"samples": 4} and store.count() == 1


def test_one_process_per_study(tmp_path):
    """A second process on a running study is refused with the holder named; the lock dies with its holder."""
    import subprocess
    import sys

    from schedsearch.results.study_lock import StudyBusyError, study_lock

    store = tmp_path / "r.db"
    code = ("import sys, time; from schedsearch.results.study_lock import study_lock\n"
            "with study_lock(sys.argv[1], 'busy'):\n    print('locked', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = rf"^--study: 'busy' is being run by process {holder.pid} on "
        with pytest.raises(StudyBusyError, match=busy), study_lock(store, "busy"):
            pass
        with study_lock(store, "other"):  # other studies of the same store are free
            pass
    finally:
        holder.kill()
        holder.wait()
    with study_lock(store, "busy"):  # the kernel released the dead holder's lock
        pass


def test_atomic_writes_get_the_mode_a_plain_write_gets(tmp_path):
    """Calibration sets and reports are shared files: not mkstemp's private 0600."""
    import os

    from schedsearch.results.atomic import atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert os.stat(written).st_mode & 0o777 == os.stat(plain).st_mode & 0o777
