"""The joint space (solver × cache × compensation) against separate solver and cache searches at the same
evaluation budget, on the builtin model: hypervolume of each front in (PSNR to the 100-step teacher ↑, MACs ↓)
with one common reference point, and the best PSNR each reaches under a few MAC budgets. Each space gets its seed
method by default (solver: S³'s predictor; cache: ECAD's GA; joint: the same GA), each study its own store so no
evaluation is shared, and the joint front is also set against the union of both separate fronts (twice its budget).

Each search's front is then re-scored on `--heldout-samples` seeds no search saw (one shared held-out store, so a
schedule two fronts share is scored once), and every ratio is given again on those scores (`heldout` in the JSON),
each PSNR with its 95% bootstrap interval. The headline figures are the held-out ones.

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
from heldout_scores import score_on_heldout

from schedsearch.results.pareto import hypervolume, non_dominated
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
    parser.add_argument("--heldout-samples", type=int, default=128,
                        help="re-score every front on this many held-out seeds (0: search split only)")
    parser.add_argument("--suffix", default="", help="write results/joint_vs_separate{SUFFIX}.json and the figure "
                                                    "so, e.g. '_480' for a larger budget beside the default run")
    args = parser.parse_args()
    strategies = dict(item.split("=") for item in args.strategies.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    cache_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="ssjoint"))
    model = load_model(args.model)
    runs = {seed: _run_seed(model, strategies, seed, args, cache_dir) for seed in seeds}
    out = {"model": model.info.name, "strategies": strategies, "budget": args.budget, "samples": args.samples,
           "population": args.population, "objectives": OBJECTIVES, "seeds": seeds}
    search = _compare({seed: (points, timing) for seed, (points, timing, _) in runs.items()})
    if args.heldout_samples:
        fronts = {seed: {space: _front(recs) for space, recs in records.items()} for seed, (_, _, records) in
                  runs.items()}
        held = _heldout_points(model, fronts, args.heldout_samples, cache_dir)
        out["heldout"] = {"samples": args.heldout_samples,
                          "seeds_note": "held-out (1,000,000 + i), never seen by any search",
                          **_compare({seed: (held[seed], runs[seed][1]) for seed in seeds}, intervals=True,
                                     budgets=search["mac_budgets"])}
    out.update(search)
    text = json.dumps(out, indent=1)
    print(text)
    (Path(__file__).parent / "results" / f"joint_vs_separate{args.suffix}.json").write_text(text + "\n")
    first_points = held[seeds[0]] if args.heldout_samples else runs[seeds[0]][0]
    figure = Path(__file__).parents[1] / "docs" / f"joint_vs_separate{args.suffix}.png"
    _figure(first_points, strategies, args.budget, figure, model.info.name,
            "held-out fronts" if args.heldout_samples else "search split")


def _compare(runs: dict, intervals: bool = False, budgets: list[float] | None = None) -> dict:
    """Hypervolume ratios and best PSNR under three MAC budgets (default: the 10/25/50% quantiles of every
    evaluation's MACs), per seed and over seeds, one reference point for all seeds (below the worst PSNR, above
    the largest MACs)."""
    allpts = np.vstack([pts[:, :2] for points, _ in runs.values() for pts in points.values()])
    # one reference point for every seed: below the worst PSNR, above the largest MACs
    ref = [allpts[:, 0].min() - 1.0, allpts[:, 1].max() * 1.05]
    directions = list(OBJECTIVES.values())
    budgets = np.quantile(allpts[:, 1], [0.1, 0.25, 0.5]) if budgets is None else np.asarray(budgets)
    per_seed = []
    for seed, (points, timing) in runs.items():
        points = {**points, "solver+cache": np.vstack([points["solver"], points["cache"]])}
        best = {k: {f"{b:.3g}": _best_under(v, b, intervals) for b in budgets} for k, v in points.items()}
        points = {k: v[:, :2] for k, v in points.items()}
        hv = {k: hypervolume(v, directions, ref) for k, v in points.items()}
        per_seed.append({
            "seed": seed, "hypervolume": hv, "evaluations": {k: len(v) for k, v in points.items()},
            "joint_over_best_separate": hv["joint"] / max(hv["solver"], hv["cache"]),
            "joint_over_union_of_separate": hv["joint"] / hv["solver+cache"],
            "cache_over_solver": hv["cache"] / hv["solver"],
            "best_psnr_at_macs": best,
            "wall_time_s": timing,
        })
    spread = {key: _stats([r[key] for r in per_seed])
              for key in ("joint_over_best_separate", "joint_over_union_of_separate", "cache_over_solver")}
    return {"reference_point": ref, "mac_budgets": [float(b) for b in budgets], "over_seeds": spread,
            **{k: v for k, v in per_seed[0].items() if k != "seed"}, "per_seed": per_seed}


def _best_under(points: np.ndarray, budget: float, intervals: bool):
    """The best PSNR at no more than `budget` MACs (with its 95% interval when the points carry one)."""
    inside = points[points[:, 1] <= budget]
    if not len(inside):
        return None
    row = inside[np.argmax(inside[:, 0])]
    return {"psnr": float(row[0]), "ci95": [float(row[2]), float(row[3])]} if intervals else float(row[0])


def _front(records) -> list:
    """The search-split front's schedules of one study's ok records."""
    pts = np.array([[r.metrics[n] for n in OBJECTIVES] for r in records])
    keep = non_dominated(pts, list(OBJECTIVES.values()))
    return [r.to_schedule() for r, k in zip(records, keep, strict=True) if k]


def _heldout_points(model, fronts: dict, samples: int, cache_dir: Path) -> dict:
    """Every front re-scored on `samples` held-out seeds: {seed: {space: [[psnr, macs, ci_low, ci_high], ...]}}."""
    everything = [s for per_space in fronts.values() for front in per_space.values() for s in front]
    scored, _ = score_on_heldout(model, everything, samples, cache_dir, cache_dir / "heldout.db", OBJECTIVES)
    return {seed: {space: np.array([[scored[s.key]["psnr"], scored[s.key]["macs"], scored[s.key]["psnr.ci95_low"],
                                     scored[s.key]["psnr.ci95_high"]] for s in front])
                   for space, front in per_space.items()}
            for seed, per_space in fronts.items()}


def _run_seed(model, strategies: dict[str, str], seed: int, args: argparse.Namespace, cache_dir: Path):
    """The three searches with strategy seed `seed`, each in its own store (seed 0 keeps the old store names)."""
    # Same NFE range for the solver and joint spaces; the cache space uses 10 DPM-Solver++ steps (quick preset).
    runs = {
        "solver": {"nfe_range": (4, 10)},
        "cache": {"num_steps": 10},
        "joint": {"nfe_range": (4, 10)},
    }
    points, timing, records = {}, {}, {}
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
        records[space] = ok
        points[space] = np.array([[r.metrics[n] for n in OBJECTIVES] for r in ok])
        print(json.dumps({"seed": seed, "space": space, "evaluations": len(ok), "wall_time_s": timing[space]}),
              file=sys.stderr)
    return points, timing, records


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "n": len(values)}


def _figure(points: dict[str, np.ndarray], strategies: dict[str, str], budget: int, path: Path,
            model_name: str, split: str) -> None:
    """Each search's evaluations (faint) and Pareto front (step line) in PSNR vs MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from schedsearch.results.pareto import non_dominated

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    colors = {"solver": "tab:blue", "cache": "tab:orange", "joint": "tab:green"}
    for name, color in colors.items():
        pts = points[name][:, :2]
        ax.scatter(pts[:, 1] / 1e9, pts[:, 0], s=8, alpha=0.2, color=color)
        front = pts[non_dominated(pts, list(OBJECTIVES.values()))]
        front = front[np.argsort(front[:, 1])]
        ax.step(front[:, 1] / 1e9, front[:, 0], where="post", color=color, lw=2,
                label=f"{name} ({strategies[name]}, {len(pts)} points)")
    ax.set_xlabel("GMACs per image ↓")
    ax.set_ylabel("PSNR to the 100-step teacher (dB) ↑")
    ax.set_title(f"Joint vs separate at equal budget ({budget}), {model_name}: {split}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=130, bbox_inches="tight")


if __name__ == "__main__":
    main()
