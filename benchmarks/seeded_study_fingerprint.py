"""Fingerprint of seeded studies: every strategy, run through the CLI, on the builtin model, small but past the seeds.

Why: a refactor of the study code must not change what a seeded study computes. This runs one small study per
method (and the held-out re-scoring each one ends with), then hashes every stored record in insertion order: its
schedule key, status and metrics. Two runs of the same code give the same hashes (the builtin model runs
deterministically on CPU); a refactor that keeps behaviour keeps them.

Prints one JSON object and writes it to benchmarks/results/seeded_study_fingerprint.json (or --out). Compare two
such files with --compare OLD.json NEW.json (exit 1 on any difference, naming the study).
Run: OMP_NUM_THREADS=1 python benchmarks/seeded_study_fingerprint.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = [  # (study, space, strategy, objectives, budget, extra arguments)
    ("ecad", "cache", "ecad", "psnr,macs", 72, []),
    ("ecad-shift", "cache", "ecad", "psnr,macs", 40, ["--shift-seeds"]),
    ("nsga2", "cache", "nsga2", "psnr,macs", 40, []),
    ("nsga2-joint", "joint", "nsga2", "psnr,macs", 24, []),
    ("tpe", "solver", "tpe", "psnr,nfe", 16, []),
    ("optuna-nsga2", "dc", "optuna-nsga2", "mse,nfe", 16, []),
    ("predictor", "solver", "predictor", "psnr,nfe", 24, []),
    ("dp", "cachequant", "dp", "psnr,macs", 24, []),
    ("dc-fit", "dc", "dc-fit", "mse,nfe", 8, []),
]
SAMPLES = 8


def fingerprint(store: Path) -> dict[str, dict[str, object]]:
    """Per study: record count and a hash of (key, status, metrics) rows in insertion order."""
    conn = sqlite3.connect(store)
    out: dict[str, dict[str, object]] = {}
    rows = conn.execute("SELECT study, key, status, metrics_json FROM records ORDER BY id").fetchall()
    conn.close()
    for study in sorted({r[0] for r in rows}):
        mine = [r[1:] for r in rows if r[0] == study]
        digest = hashlib.sha256(json.dumps(mine).encode()).hexdigest()[:16]
        out[study] = {"records": len(mine), "sha256": digest}
    return out


def run(out_path: Path) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="ssfingerprint"))
    store = work / "fp.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    timings = {}
    for study, space, strategy, objectives, budget, extra in RUNS:
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "schedsearch.cli", "search", "--model", "builtin:mnist-dit", "--space", space,
               "--strategy", strategy, "--objectives", objectives, "--budget", str(budget), "--samples",
               str(SAMPLES), "--study", study, "--store", str(store), "--cache-dir", str(work / "cache"),
               "--preset", "quick", "--quiet", "--no-share-prefixes", *extra]  # sharing reorders a generation's
        # records (same keys and metrics); the stored fingerprints hash insertion order, from before sharing
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        timings[study] = round(time.perf_counter() - start, 1)
        print(f"{study}: {timings[study]} s", file=sys.stderr, flush=True)
    result = {"samples": SAMPLES, "runs": [r[:5] for r in RUNS], "wall_time_s": timings,
              "studies": fingerprint(store)}
    text = json.dumps(result, indent=1)
    print(text)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text + "\n")
    return result


def compare(old: Path, new: Path) -> int:
    a, b = json.loads(old.read_text())["studies"], json.loads(new.read_text())["studies"]
    differing = sorted(s for s in set(a) | set(b) if a.get(s) != b.get(s))
    print(json.dumps({"identical": not differing, "differing": {s: [a.get(s), b.get(s)] for s in differing},
                      "studies": len(set(a) | set(b))}, indent=1))
    return 1 if differing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "seeded_study_fingerprint.json")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    run(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
