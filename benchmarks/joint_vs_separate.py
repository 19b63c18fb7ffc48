"""The joint space (solver × cache × compensation) against separate solver and cache searches at the same
evaluation budget, on the builtin model: hypervolume of each front in (PSNR to the 100-step teacher ↑, MACs ↓)
with one common reference point, and the best PSNR each reaches under a few MAC budgets.

    python benchmarks/joint_vs_separate.py [--budget 48] [--samples 32] [--strategy nsga2]

Prints one JSON object and writes benchmarks/results/joint_vs_separate.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from schedsearch.results.pareto import hypervolume
from schedsearch.results.store import ResultStore
from schedsearch.runtime.models import load_model
from schedsearch.search.base import Budget
from schedsearch.study import run_search

OBJECTIVES = {"psnr": "max", "macs": "min"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=48)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--strategy", default="nsga2")
    args = parser.parse_args()
    cache_dir = Path(tempfile.mkdtemp(prefix="ssjoint"))
    store_path = cache_dir / "joint.db"
    model = load_model("builtin:mnist-dit")
    # Same NFE range for the solver and joint spaces; the cache space uses 10 DPM-Solver++ steps (quick preset).
    runs = {
        "solver": {"nfe_range": (4, 10)},
        "cache": {"num_steps": 10},
        "joint": {"nfe_range": (4, 10)},
    }
    points, timing = {}, {}
    for space, options in runs.items():
        start = time.perf_counter()
        run_search(model=model, space=space, strategy=args.strategy, objectives=list(OBJECTIVES), study=space,
                   store=store_path, budget=Budget(evaluations=args.budget), samples=args.samples,
                   cache_dir=cache_dir, space_options=options, progress=False, validate=False,
                   strategy_options={"population": 16})
        timing[space] = round(time.perf_counter() - start, 1)
        with ResultStore(store_path) as store:
            ok = [r for r in store.records(space) if r.status == "ok"]
        points[space] = np.array([[r.metrics[n] for n in OBJECTIVES] for r in ok])
        print(json.dumps({"space": space, "evaluations": len(ok), "wall_time_s": timing[space]}), file=sys.stderr)
    allpts = np.vstack(list(points.values()))
    ref = [allpts[:, 0].min() - 1.0, allpts[:, 1].max() * 1.05]  # below the worst PSNR, above the largest MACs
    directions = list(OBJECTIVES.values())
    hv = {k: hypervolume(v, directions, ref) for k, v in points.items()}
    budgets = np.quantile(allpts[:, 1], [0.1, 0.25, 0.5])
    best_at = {
        k: {f"{b:.3g}": float(v[v[:, 1] <= b, 0].max()) if np.any(v[:, 1] <= b) else None for b in budgets}
        for k, v in points.items()
    }
    out = {
        "model": model.info.name, "strategy": args.strategy, "budget": args.budget, "samples": args.samples,
        "objectives": OBJECTIVES, "reference_point": ref, "hypervolume": hv,
        "joint_over_best_separate": hv["joint"] / max(hv["solver"], hv["cache"]),
        "best_psnr_at_macs": best_at, "wall_time_s": timing,
    }
    text = json.dumps(out, indent=1)
    print(text)
    (Path(__file__).parent / "results" / "joint_vs_separate.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
