"""Append-only results store: one SQLite row per evaluated candidate, kept forever.

Why SQLite: every append is one fsync'ed transaction (WAL, `synchronous=FULL`), so a study killed at any moment
keeps every result it reported as written, and a resumed study sees exactly those. Rows are never updated or
deleted (triggers refuse it); a new metric is a new study or a new row, never an edit. The driver alone writes;
notebooks may read the same file while a study runs (WAL lets readers and one writer coexist).

A candidate's key hashes the schedule, the model and the calibration set, so one schedule scored against another
calibration set is a different candidate. Within a study a key is stored once: re-appending it is a no-op that
`append` reports, which is how a resumed loop deduplicates.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from schedsearch.errors import UserInputError
from schedsearch.spaces.schedule import Schedule

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["STATUSES", "STORE_FORMAT", "Record", "ResultStore", "StoreError", "candidate_key"]

STORE_FORMAT = "schedsearch.results/v1"
STATUSES = ("ok", "failed")
Status = Literal["ok", "failed"]

_COLUMNS = (
    "study",
    "key",
    "schedule_json",
    "metrics_json",
    "status",
    "error",
    "calibration_hash",
    "code_version",
    "device",
    "wall_time_s",
    "created_at",
    "summary_json",
)

_SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE records (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        study TEXT NOT NULL CHECK (study <> ''),
        key TEXT NOT NULL CHECK (key <> ''),
        schedule_json TEXT NOT NULL,
        metrics_json TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
        error TEXT NOT NULL,
        calibration_hash TEXT NOT NULL,
        code_version TEXT NOT NULL,
        device TEXT NOT NULL,
        wall_time_s REAL NOT NULL,
        created_at TEXT NOT NULL,
        summary_json TEXT NOT NULL,
        UNIQUE (study, key)
    )""",
    "CREATE INDEX records_by_key ON records (key)",
)
# Failed attempts that are not (yet) a record: a failure that may not repeat (out of memory, a worker lost) is
# retried on resume, so it is kept here, not as the candidate's record; the loop counts them to bound retries.
_ATTEMPTS = (
    """CREATE TABLE IF NOT EXISTS attempts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        study TEXT NOT NULL,
        key TEXT NOT NULL,
        calibration_hash TEXT NOT NULL,
        error TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS attempts_by_study_key ON attempts (study, key)",
)
# Append-only, enforced by SQLite itself, so no SQL path (UPDATE, DELETE, or REPLACE INTO, which deletes the old row
# without firing delete triggers) can change or drop a stored record or a study's settings. An insert of an existing
# record key is skipped (it is how `append` reports a duplicate); one of an existing settings name is refused.
# Created with IF NOT EXISTS on every writable open, so stores made by older versions get them too.
_GUARDS = (
    """CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records
        BEGIN SELECT RAISE(ABORT, 'the results store is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records
        BEGIN SELECT RAISE(ABORT, 'the results store is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS records_no_replace BEFORE INSERT ON records
        WHEN EXISTS (SELECT 1 FROM records WHERE (study = NEW.study AND key = NEW.key) OR id = NEW.id)
        BEGIN SELECT RAISE(IGNORE); END""",
    """CREATE TRIGGER IF NOT EXISTS attempts_no_update BEFORE UPDATE ON attempts
        BEGIN SELECT RAISE(ABORT, 'the results store is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS attempts_no_delete BEFORE DELETE ON attempts
        BEGIN SELECT RAISE(ABORT, 'the results store is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS meta_no_update BEFORE UPDATE ON meta
        BEGIN SELECT RAISE(ABORT, 'the results store is append-only: settings are never changed'); END""",
    """CREATE TRIGGER IF NOT EXISTS meta_no_delete BEFORE DELETE ON meta
        BEGIN SELECT RAISE(ABORT, 'the results store is append-only: settings are never deleted'); END""",
    """CREATE TRIGGER IF NOT EXISTS meta_no_replace BEFORE INSERT ON meta
        WHEN EXISTS (SELECT 1 FROM meta WHERE name = NEW.name)
        BEGIN SELECT RAISE(ABORT, 'the results store is append-only: settings are never replaced'); END""",
)

_INSERT = (
    f"INSERT INTO records ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
    "ON CONFLICT (study, key) DO NOTHING"
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM records"


class StoreError(UserInputError):
    """The store file cannot be used; the message names the path and what to do."""


def candidate_key(schedule: Schedule, calibration_hash: str) -> str:
    """What makes two evaluations interchangeable: same schedule, same model, same calibration set."""
    content = {"schedule": schedule.key, "model": schedule.model, "calibration": calibration_hash}
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _json_text(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Record.{what} must be JSON-serialisable: {exc}") from exc


@dataclass(frozen=True)
class Record:
    """One evaluation of one candidate, as stored. Failed evaluations are kept too (status "failed", error text).

    metrics: objective values by name (floats; NaN allowed for a failed or unscored metric).
    summary: decisions of the schedule worth a column in analyses (e.g. nfe, recompute_fraction); any JSON.
    created_at: ISO 8601 UTC. Not hashable (holds dicts); compare with ==.
    """

    study: str
    key: str
    schedule_json: str
    metrics: dict[str, float] = field(default_factory=dict)
    status: Status = "ok"
    error: str = ""
    calibration_hash: str = ""
    code_version: str = ""
    device: str = ""
    wall_time_s: float = 0.0
    created_at: str = field(default_factory=_now)
    summary: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("study", "key", "schedule_json"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"Record.{name} must be a non-empty string, got {value!r}")
        if self.status not in STATUSES:
            raise ValueError(f"Record.status must be one of {STATUSES}, got {self.status!r}")
        if not isinstance(self.metrics, Mapping):
            raise TypeError(f"Record.metrics must be a mapping of name to float, got {type(self.metrics).__name__}")
        metrics: dict[str, float] = {}
        for name, value in self.metrics.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"Record.metrics: metric names must be non-empty strings, got {name!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Record.metrics[{name!r}] must be a number, got {value!r}")
            metrics[name] = float(value)
        wall = float(self.wall_time_s)
        if not math.isfinite(wall) or wall < 0:
            raise ValueError(f"Record.wall_time_s must be a finite number ≥ 0, got {self.wall_time_s!r}")
        summary = dict(self.summary)
        _json_text(summary, "summary")
        # Copies, so a caller mutating its dicts later cannot change a record already handed to the store.
        object.__setattr__(self, "metrics", metrics)
        object.__setattr__(self, "summary", summary)
        object.__setattr__(self, "wall_time_s", wall)

    @classmethod
    def for_schedule(
        cls,
        study: str,
        schedule: Schedule,
        metrics: Mapping[str, float],
        *,
        calibration_hash: str,
        status: Status = "ok",
        error: str = "",
        code_version: str | None = None,
        device: str = "",
        wall_time_s: float = 0.0,
        summary: Mapping[str, Any] | None = None,
    ) -> Record:
        """The usual way to build a record: the key and JSON come from the schedule itself."""
        if code_version is None:
            from schedsearch import __version__ as code_version
        return cls(
            study=study,
            key=candidate_key(schedule, calibration_hash),
            schedule_json=schedule.to_json(indent=None),
            metrics=dict(metrics),
            status=status,
            error=error,
            calibration_hash=calibration_hash,
            code_version=code_version,
            device=device,
            wall_time_s=wall_time_s,
            summary=dict(summary or {}),
        )

    def to_schedule(self) -> Schedule:
        return Schedule.from_json(self.schedule_json)

    def _row(self) -> tuple[Any, ...]:
        return (
            self.study,
            self.key,
            self.schedule_json,
            json.dumps(self.metrics, sort_keys=True, separators=(",", ":")),  # NaN kept as the NaN token
            self.status,
            self.error,
            self.calibration_hash,
            self.code_version,
            self.device,
            self.wall_time_s,
            self.created_at,
            _json_text(self.summary, "summary"),
        )

    @classmethod
    def _from_row(cls, row: tuple[Any, ...]) -> Record:
        values = dict(zip(_COLUMNS, row, strict=True))
        metrics = json.loads(values.pop("metrics_json"))
        # schedsearch writes numbers only; a value edited in by hand reads as missing (NaN), so the record drops
        # out of fronts instead of crashing every reader of the store
        values["metrics"] = {k: v if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
                             for k, v in (metrics.items() if isinstance(metrics, dict) else ())}
        values["summary"] = json.loads(values.pop("summary_json"))
        return cls(**values)


class ResultStore:
    """An append-only SQLite file of `Record`s, grouped by study. Use as a context manager or call `close()`.

    create: make a new store if `path` does not exist (its directory must); False for read-and-append only.
    """

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        self._conn = _open(self.path, create=create)

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        # IMMEDIATE takes the write lock up front, so a concurrent writer waits instead of failing mid-transaction.
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    def append(self, record: Record) -> bool:
        """Store one record in its own durable transaction. False: the study already has this key (nothing written)."""
        with self._transaction() as cur:
            cur.execute(_INSERT, record._row())
            return cur.rowcount == 1

    def append_many(self, records: Iterable[Record]) -> list[bool]:
        """Store records all-or-nothing in one transaction; per record, False means its key was already there."""
        rows = [r._row() for r in records]  # serialise first: a bad record aborts before anything is written
        inserted = []
        with self._transaction() as cur:
            for row in rows:
                cur.execute(_INSERT, row)
                inserted.append(cur.rowcount == 1)
        return inserted

    def set_study_settings(self, study: str, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Record how a study was set up (model, space, objectives, ...) the first time; later calls must agree on
        every key the first call gave, so `--resume` cannot silently mix two different searches in one study."""
        text = _json_text(dict(settings), "settings")
        with self._transaction() as cur:
            row = cur.execute("SELECT value FROM meta WHERE name = ?", (f"study:{study}",)).fetchone()
            if row is None:
                cur.execute("INSERT INTO meta (name, value) VALUES (?, ?)", (f"study:{study}", text))
                return dict(settings)
        stored = json.loads(row[0])
        given = json.loads(text)
        differ = {k: (stored.get(k), v) for k, v in given.items() if k in stored and stored[k] != v}
        if differ:
            name, (old, new) = next(iter(differ.items()))
            raise StoreError(
                f"study {study!r} was run with {name}={old!r}, now {name}={new!r}; "
                "use a new --study name, or the same settings to resume"
            )
        return stored

    def study_settings(self, study: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT value FROM meta WHERE name = ?", (f"study:{study}",)).fetchone()
        return None if row is None else json.loads(row[0])

    def has(self, study: str, key: str) -> bool:
        row = self._conn.execute("SELECT 1 FROM records WHERE study = ? AND key = ?", (study, key)).fetchone()
        return row is not None

    def get(self, study: str, key: str) -> Record | None:
        row = self._conn.execute(f"{_SELECT} WHERE study = ? AND key = ?", (study, key)).fetchone()
        return None if row is None else Record._from_row(row)

    def find(self, key: str) -> list[Record]:
        """Every study's record of this candidate, oldest first: results reusable across studies."""
        rows = self._conn.execute(f"{_SELECT} WHERE key = ? ORDER BY id", (key,)).fetchall()
        return [Record._from_row(r) for r in rows]

    def add_attempt(self, study: str, key: str, calibration_hash: str, error: str) -> None:
        """Keep one failed attempt at a candidate (durably, like a record)."""
        with self._transaction() as cur:
            cur.execute("INSERT INTO attempts (study, key, calibration_hash, error, created_at) VALUES (?, ?, ?, ?, ?)",
                        (study, key, calibration_hash, error, _now()))

    def attempts(self, study: str, key: str | None = None) -> list[tuple[str, str]]:
        """(key, error) of the study's failed attempts (of one key), oldest first."""
        if not self._has_attempts():
            return []
        if key is None:
            rows = self._conn.execute("SELECT key, error FROM attempts WHERE study = ? ORDER BY id", (study,))
        else:
            rows = self._conn.execute("SELECT key, error FROM attempts WHERE study = ? AND key = ? ORDER BY id",
                                      (study, key))
        return [(k, e) for k, e in rows]

    def _has_attempts(self) -> bool:  # a read-only open of an older store has no such table
        return self._conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'attempts'").fetchone() is not None

    def keys(self, study: str) -> set[str]:
        return {k for (k,) in self._conn.execute("SELECT key FROM records WHERE study = ?", (study,))}

    def studies(self) -> list[str]:
        """Study names in the order they were started."""
        rows = self._conn.execute("SELECT study FROM records GROUP BY study ORDER BY MIN(id)").fetchall()
        return [s for (s,) in rows]

    def count(self, study: str | None = None) -> int:
        if study is None:
            return self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        return self._conn.execute("SELECT COUNT(*) FROM records WHERE study = ?", (study,)).fetchone()[0]

    def __len__(self) -> int:
        return self.count()

    def records(self, study: str | None = None) -> list[Record]:
        """All records (of one study, or of all), in append order."""
        if study is None:
            rows = self._conn.execute(f"{_SELECT} ORDER BY id").fetchall()
        else:
            rows = self._conn.execute(f"{_SELECT} WHERE study = ? ORDER BY id", (study,)).fetchall()
        return [Record._from_row(r) for r in rows]

    def to_frame(self, study: str | None = None) -> pd.DataFrame:
        """One row per record: identity and provenance columns, `metric.<name>` per metric (NaN where a record
        lacks it), `summary.<name>` per scalar summary entry. pandas is imported here only, so writers stay light."""
        return records_frame(self.records(study))


_BASE_COLUMNS = (
    "study",
    "key",
    "model",
    "status",
    "wall_time_s",
    "created_at",
    "device",
    "calibration_hash",
    "code_version",
    "error",
)


def records_frame(records: Iterable[Record]) -> pd.DataFrame:
    """`ResultStore.to_frame` for records already in hand (e.g. from several stores)."""
    import pandas as pd

    rows = []
    metric_names: set[str] = set()
    summary_names: set[str] = set()
    for r in records:
        row: dict[str, Any] = {name: getattr(r, name) for name in _BASE_COLUMNS if name != "model"}
        row["model"] = json.loads(r.schedule_json).get("model")
        for name, value in r.metrics.items():
            row[f"metric.{name}"] = value
            metric_names.add(name)
        for name, value in r.summary.items():
            if value is None or isinstance(value, (bool, int, float, str)):
                row[f"summary.{name}"] = value
                summary_names.add(name)
        rows.append(row)
    columns = [*_BASE_COLUMNS, *(f"metric.{m}" for m in sorted(metric_names))]
    columns += [f"summary.{s}" for s in sorted(summary_names)]
    frame = pd.DataFrame(rows, columns=columns)
    for name in metric_names:
        # a metric that is not a number (a hand-edited or foreign store) reads as missing, not as a crash
        frame[f"metric.{name}"] = pd.to_numeric(frame[f"metric.{name}"], errors="coerce").astype(float)
    frame["wall_time_s"] = frame["wall_time_s"].astype(float)
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True, format="ISO8601")
    return frame


def settings_objectives(settings: Mapping[str, Any] | None) -> dict[str, str]:
    """A study's objectives in search order, {name: "min" | "max"}. Stored as [[name, direction], ...] because the
    store writes JSON with sorted keys (a dict would lose the order; older stores may hold one)."""
    value = (settings or {}).get("objectives") or []
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    return {str(n): str(d) for n, d in value}


def _open(path: Path, *, create: bool) -> sqlite3.Connection:
    if path.is_dir():
        raise StoreError(f"{path}: is a directory, not a results store file; give a file such as {path}/results.db")
    if not path.exists():
        if not create:
            raise StoreError(f"{path}: no such results store")
        if path.parent.exists() and not path.parent.is_dir():
            raise StoreError(f"{path}: {path.parent} is a file, not a directory")
        path.parent.mkdir(parents=True, exist_ok=True)  # `--store runs/x.db` on a fresh checkout just works
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open as a results store ({exc})") from exc
    try:
        _prepare(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(conn: sqlite3.Connection, path: Path) -> None:
    try:
        conn.execute("PRAGMA busy_timeout = 30000")
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not a results store (not an SQLite database: {exc})") from exc
    if tables:
        # Someone's database: read its format before writing anything to it.
        try:
            row = conn.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
        except sqlite3.DatabaseError:
            row = None
        if row is None:
            raise StoreError(f"{path}: an SQLite database but not a schedsearch results store")
        if row[0] != STORE_FORMAT:
            raise StoreError(f"{path}: store format {row[0]!r}, this code reads {STORE_FORMAT!r}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise StoreError(f"{path}: cannot use write-ahead logging (journal mode stays {mode!r}); is it a network disk?")
    conn.execute("PRAGMA synchronous = FULL")  # WAL + FULL: a committed append survives power loss, not just a crash
    if not tables:
        # One transaction (not executescript, which commits on its own): a store is created whole or not at all.
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'records'").fetchone():  # lost a race?
                for statement in (*_SCHEMA, *_ATTEMPTS, *_GUARDS):
                    conn.execute(statement)
                conn.execute("INSERT INTO meta (name, value) VALUES ('format', ?)", (STORE_FORMAT,))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    else:
        _add_missing_guards(conn)


def _add_missing_guards(conn: sqlite3.Connection) -> None:
    """Stores written by older versions lack some append-only triggers: add them (a reader of a read-only file
    cannot, and does not need to: it writes nothing)."""
    have = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('trigger', 'table', 'index')")}
    missing = [g for g in (*_ATTEMPTS, *_GUARDS) if g.split("EXISTS ", 1)[1].split()[0] not in have]
    if not missing:
        return
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:  # read-only file or directory
        return
    try:
        for statement in missing:
            conn.execute(statement)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
