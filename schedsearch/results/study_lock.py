"""One process per study: an advisory lock file beside the store, held while a study runs.

Why: two processes running one study would both warm-start from the same records and ask the same candidates, and
the budget would be spent twice. SQLite serialises the appends, not the searches. The lock is `flock` on a file in
`<store>.locks/`, so the kernel releases it when the holder dies (a killed study never leaves a stale lock); the file
names the holder (pid, host, start time, command) for the error the next process prints.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from schedsearch.errors import UserInputError

__all__ = ["StudyBusyError", "lock_path", "study_lock"]


class StudyBusyError(UserInputError):
    """Another process is running this study."""


def lock_path(store: str | Path, study: str) -> Path:
    store = Path(store)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", study)[:40]
    digest = hashlib.sha256(study.encode()).hexdigest()[:10]
    return store.with_name(store.name + ".locks") / f"{slug}-{digest}.lock"


@contextmanager
def study_lock(store: str | Path, study: str) -> Iterator[Path]:
    """Hold `study`'s lock for the block; StudyBusyError naming the holder if another process has it."""
    path = lock_path(store, study)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyBusyError("--study", f"{study!r} is being run by {_holder(path)}",
                                 "wait for it to finish or stop it: a study runs in one process at a time") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now(UTC).isoformat(
            timespec="seconds"), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return f"process {info.get('pid')} on {info.get('host')} since {info.get('since')} ({info.get('command')})"
