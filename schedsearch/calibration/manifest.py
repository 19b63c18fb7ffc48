"""Manifests: small JSON files that say where an artifact came from (data hash, config, figures)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def merge_into_manifest(path: Path, key: str, value: Any) -> dict[str, Any]:
    """Set `key` in the JSON manifest at `path`, keeping its other keys; written via temp file + os.replace."""
    path = Path(path)
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest
