"""The joint space (solver × cache × compensation) against separate solver and cache searches at the same
evaluation budget, on the builtin model: hypervolume of each front in (PSNR to the 100-step teacher ↑, MACs ↓)
with one common reference point, and the best PSNR each reaches under a few MAC budgets. Each space gets its seed
method by default (solver: S³'s predictor; cache: ECAD's GA; joint: the same GA), each study its own store so no
evaluation is shared, and the joint front is also set against the union of both separate fronts (twice its budget).

    python benchmarks/joint_vs_separate.py [--budget 160] [--seeds 0,1,2] [--suffix _480] [--strategies ...]

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
    parser.add_argument("--model", default="builtin:mnist-dit", help="builtin:mnist-dit or builtin:mnist-flow")
    parser.add_argument("--budget", type=int, default=160)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--population", type=int, default=24)
    parser.add_argument("--strategies", default="solver=predictor,cache=ecad,joint=ecad")
    parser.add_argument("--seeds", default="0", help="comma-separated strategy seeds: one independent run of the "
                                                     "three searches per seed, to measure the run-to-run spread")
    parser.add_argument("--work-dir", type=Path, help="keep the stores here (re-running resumes each study)")
    parser.add_argument("--suffix", default="", help="write results/joint_vs_separate{SUFFIX}.json and the figure "
                                                    "so, e.g. '_480' for a larger budget beside the default run")
    args = parser.parse_args()
    strategies = dict(item.split("=") for item in args.strategies.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    cache_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="ssjoint"))
    model = load_model(args.model)
    runs = {seed: _run_seed(model, strategies, seed, args, cache_dir) for seed in seeds}
    allpts = np.vstack([pts for points, _ in runs.values() for pts in points.values()])
    # one reference point for every seed: below the worst PSNR, above the largest MACs
    ref = [allpts[:, 0].min() - 1.0, allpts[:, 1].max() * 1.05]
    directions = list(OBJECTIVES.values())
    budgets = np.quantile(allpts[:, 1], [0.1, 0.25, 0.5])
    per_seed = []
    for seed, (points, timing) in runs.items():
        points = {**points, "solver+cache": np.vstack([points["solver"], points["cache"]])}
        hv = {k: hypervolume(v, directions, ref) for k, v in points.items()}
        per_seed.append({
            "seed": seed, "hypervolume": hv, "evaluations": {k: len(v) for k, v in points.items()},
            "joint_over_best_separate": hv["joint"] / max(hv["solver"], hv["cache"]),
            "joint_over_union_of_separate": hv["joint"] / hv["solver+cache"],
            "cache_over_solver": hv["cache"] / hv["solver"],
            "best_psnr_at_macs": {
                k: {f"{b:.3g}": float(v[v[:, 1] <= b, 0].max()) if np.any(v[:, 1] <= b) else None for b in budgets}
                for k, v in points.items()
            },
            "wall_time_s": timing,
        })
    spread = {key: _stats([r[key] for r in per_seed])
              for key in ("joint_over_best_separate", "joint_over_union_of_separate", "cache_over_solver")}
    out = {
        "model": model.info.name, "strategies": strategies, "budget": args.budget, "samples": args.samples,
        "population": args.population, "objectives": OBJECTIVES, "reference_point": ref, "seeds": seeds,
        "over_seeds": spread, **{k: v for k, v in per_seed[0].items() if k != "seed"}, "per_seed": per_seed,
    }
    text = json.dumps(out, indent=1)
    print(text)
    (Path(__file__).parent / "results" / f"joint_vs_separate{args.suffix}.json").write_text(text + "\n")
    first_points, _ = runs[seeds[0]]
    figure = Path(__file__).parents[1] / "docs" / f"joint_vs_separate{args.suffix}.png"
    _figure(first_points, strategies, args.budget, figure, model.info.name)


def _run_seed(model, strategies: dict[str, str], seed: int, args: argparse.Namespace, cache_dir: Path):
    """The three searches with strategy seed `seed`, each in its own store (seed 0 keeps the old store names)."""
    # Same NFE range for the solver and joint spaces; the cache space uses 10 DPM-Solver++ steps (quick preset).
    runs = {
        "solver": {"nfe_range": (4, 10)},
        "cache": {"num_steps": 10},
        "joint": {"nfe_range": (4, 10)},
    }
    points, timing = {}, {}
    for space, options in runs.items():
        start = time.perf_counter()
        strategy = strategies[space]
        store_path = cache_dir / (f"{space}.db" if seed == 0 else f"{space}-seed{seed}.db")
        with ResultStore(store_path) as store:
            done = len(store.records(space)) if space in store.studies() else 0
        opts = {} if strategy in ("predictor",) else {"population": args.population}
        if done < args.budget:  # the budget is the study's total
            run_search(model=model, space=space, strategy=strategy, objectives=list(OBJECTIVES), study=space,
                       store=store_path, budget=Budget(evaluations=args.budget), samples=args.samples,
                       cache_dir=cache_dir, space_options=options, progress=False, validate=False,
                       strategy_options=opts, seed=seed, resume=done > 0)
        timing[space] = round(time.perf_counter() - start, 1)
        with ResultStore(store_path) as store:
            ok = [r for r in store.records(space) if r.status == "ok"]
        points[space] = np.array([[r.metrics[n] for n in OBJECTIVES] for r in ok])
        print(json.dumps({"seed": seed, "space": space, "evaluations": len(ok), "wall_time_s": timing[space]}),
              file=sys.stderr)
    return points, timing


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "n": len(values)}


def _figure(points: dict[str, np.ndarray], strategies: dict[str, str], budget: int, path: Path,
            model_name: str) -> None:
    """Each search's evaluations (faint) and Pareto front (step line) in PSNR vs MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from schedsearch.results.pareto import non_dominated

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    colors = {"solver": "tab:blue", "cache": "tab:orange", "joint": "tab:green"}
    for name, color in colors.items():
        pts = points[name]
        ax.scatter(pts[:, 1] / 1e9, pts[:, 0], s=8, alpha=0.2, color=color)
        front = pts[non_dominated(pts, list(OBJECTIVES.values()))]
        front = front[np.argsort(front[:, 1])]
        ax.step(front[:, 1] / 1e9, front[:, 0], where="post", color=color, lw=2,
                label=f"{name} ({strategies[name]}, {len(pts)} evaluations)")
    ax.set_xlabel("GMACs per image ↓")
    ax.set_ylabel("PSNR to the 100-step teacher (dB) ↑")
    ax.set_title(f"Joint vs separate searches at equal budget ({budget}), {model_name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=130, bbox_inches="tight")


if __name__ == "__main__":
    main()
