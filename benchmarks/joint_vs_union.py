"""Joint searches against the union of separate solver and cache searches at equal total budget, on held-out seeds,
against the model work spent (the builtin DiT; PSNR to the 100-step teacher ↑ / MACs ↓).

Searches, each in its own store, three strategy seeds:
- `solver`: S³'s predictor on the `solver` space (NFE 4–10), its stage 0 every hand-made solver of the range;
- `cache`: ECAD's GA on the `cache` space (10 DPM-Solver++ steps), as `joint_vs_separate.py` runs it;
- `cache+screen`: the same with the reuse-error screen (`--screen 8`), the best cache search of `search_cost.py`;
- `bilevel` (ours, the `joint` space): S³'s predictor on solver genes for half the budget, then the screened GA on
  the masks of the two best solvers it found; its first half starts as the `solver` search (same seeds, options and
  strategy seed: the first 41–42 records are the same), then departs from it, because its predictor learns from
  the solver genes of the schedules as evaluated (decoded and encoded again) rather than as proposed;
- `joint-ga`: ECAD's GA on the whole `joint` genome (`joint_vs_separate.py`'s joint search).
The joint searches get twice the evaluations of each separate one: equal total budget against the union (records
past the budget, from a generation that overshoots it, are left out). At checkpoints (a quarter, half, three
quarters and all of the budget) each search-split front is re-scored on `--heldout-samples` held-out seeds (one
shared store), and its hypervolume is divided by that of the joint space's baselines' held-out front (every
hand-made solver, FORA on them, ECAD's heuristic cache seeds), one reference point for all (1 dB below the worst
baseline PSNR, 1.05× the largest baseline MACs). Model work is denoiser forward passes
read from the records (CacheQuant's and the screen's 8-sample feature runs included: one each per cache space).

    python benchmarks/joint_vs_union.py [--seeds 0,1,2] [--budget 160] [--work-dir DIR] [--searches ...]

Prints one JSON object, writes benchmarks/results/joint_vs_union.json and docs/joint_vs_union.png.
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

from schedsearch.methods.cachequant import FEATURE_SAMPLES
from schedsearch.results.pareto import hypervolume, non_dominated
from schedsearch.results.store import ResultStore
from schedsearch.runtime.models import load_model
from schedsearch.search.base import Budget
from schedsearch.study import build_space, run_search, study_exists

OBJECTIVES = {"psnr": "max", "macs": "min"}
DIRECTIONS = list(OBJECTIVES.values())
NFE_RANGE = (4, 10)
CACHE_STEPS = 10
# name: space, strategy, space options, strategy options (population: --population), budget multiple, feature runs
SEARCHES = {
    "solver": ("solver", "predictor", {"nfe_range": NFE_RANGE}, {"initial_size": "all"}, 1, 0),
    "cache": ("cache", "ecad", {"num_steps": CACHE_STEPS}, {"population": None}, 1, 1),
    "cache+screen": ("cache", "ecad", {"num_steps": CACHE_STEPS}, {"population": None, "screen": 8}, 1, 2),
    "bilevel": ("joint", "bilevel", {"nfe_range": NFE_RANGE}, {"population": None}, 2, 4),
    "joint-ga": ("joint", "ecad", {"nfe_range": NFE_RANGE}, {"population": None}, 2, 0),
}
UNIONS = {"solver ∪ cache": ("solver", "cache"), "solver ∪ cache+screen": ("solver", "cache+screen")}
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
STUDY = {"joint-ga": "joint"}  # study names where they differ (joint_vs_separate.py's joint GA store continues)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=int, default=160, help="evaluations of each separate search")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--population", type=int, default=24)
    parser.add_argument("--heldout-samples", type=int, default=64)
    parser.add_argument("--searches", default=",".join(SEARCHES))
    parser.add_argument("--work-dir", type=Path, help="keep stores and calibration here (re-running resumes)")
    parser.add_argument("--no-search", action="store_true", help="only re-score and report what the stores hold")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in args.searches.split(",") if n]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ssunion"))
    model = load_model("builtin:mnist-dit")
    records = {name: {seed: _run(model, name, seed, args, work) for seed in seeds} for name in names}
    curves = {name: {seed: _checkpoints(name, recs, args) for seed, recs in per.items()}
              for name, per in records.items()}
    baselines = [s for _, s in build_space("joint", model.info, "quick", {"nfe_range": NFE_RANGE}).baselines()]
    fronts = [s for per in curves.values() for rows in per.values() for row in rows for s in row["front"]]
    scored, _ = score_on_heldout(model, baselines + fronts, args.heldout_samples, work / "cache",
                                 work / "heldout.db", OBJECTIVES)
    base = np.array([[scored[s.key][n] for n in OBJECTIVES] for s in baselines])
    ref = [float(base[:, 0].min()) - 1.0, float(base[:, 1].max()) * 1.05]
    hv_base = hypervolume(base, DIRECTIONS, ref)

    def relative(schedules) -> float:
        pts = np.array([[scored[s.key][n] for n in OBJECTIVES] for s in {s.key: s for s in schedules}.values()])
        return hypervolume(pts[non_dominated(pts, DIRECTIONS)], DIRECTIONS, ref) / hv_base

    out = {"model": model.info.name, "budget_each_separate": args.budget, "samples": args.samples,
           "population": args.population, "heldout_samples": args.heldout_samples, "objectives": OBJECTIVES,
           "reference_point": ref, "baselines": len(baselines), "searches": {n: _describe(n) for n in names},
           "seeds": seeds, "runs": {}, "unions": {}, "final": {}}
    for name in names:
        out["runs"][name] = {seed: [{"evaluations": r["evaluations"], "forward_passes": r["passes"],
                                     "heldout_over_baselines": relative(r["front"])} for r in rows]
                             for seed, rows in curves[name].items()}
    for union, (a, b) in UNIONS.items():
        if a in curves and b in curves:
            out["unions"][union] = {seed: [
                {"evaluations": ra["evaluations"] + rb["evaluations"], "forward_passes": ra["passes"] + rb["passes"],
                 "heldout_over_baselines": relative(ra["front"] + rb["front"])}
                for ra, rb in zip(curves[a][seed], curves[b][seed], strict=True)] for seed in seeds}
    lines = {**out["runs"], **out["unions"]}
    finals = {name: [rows[seed][-1]["heldout_over_baselines"] for seed in seeds] for name, rows in lines.items()}
    out["final"] = {name: _stats(v) for name, v in finals.items()}
    for joint in ("bilevel", "joint-ga"):
        for union in out["unions"]:
            if joint in finals:
                ratios = [j / u for j, u in zip(finals[joint], finals[union], strict=True)]
                out["final"][f"{joint} / {union}"] = _stats(ratios)
    if "bilevel" in records and "solver" in records:  # phase 1 of bilevel is the solver search itself
        out["bilevel_records_shared_with_solver_search"] = {
            seed: _common_prefix(records["bilevel"][seed], records["solver"][seed]) for seed in seeds}
    text = json.dumps(out, indent=1)
    print(text)
    (Path(__file__).parent / "results" / "joint_vs_union.json").write_text(text + "\n")
    _figure(lines, out, Path(__file__).parents[1] / "docs" / "joint_vs_union.png")


def _describe(name: str) -> dict:
    space, strategy, space_options, options, multiple, features = SEARCHES[name]
    return {"space": space, "strategy": strategy, "space_options": space_options, "strategy_options": options,
            "budget_multiple": multiple, "feature_runs": features}


def _run(model, name: str, seed: int, args: argparse.Namespace, work: Path) -> list:
    """One search (resumed where its store is), and its records in order."""
    space, strategy, space_options, options, multiple, _ = SEARCHES[name]
    options = {k: (args.population if v is None else v) for k, v in options.items()}
    if options.get("initial_size") == "all":
        options["initial_size"] = len(build_space(space, model.info, "quick", space_options).baselines())
    store = work / f"{name}-seed{seed}.db"
    study = STUDY.get(name, name)
    start = time.perf_counter()
    if not args.no_search:
        run_search(model=model, space=space, strategy=strategy, objectives=list(OBJECTIVES), study=study,
                   store=store, budget=Budget(evaluations=args.budget * multiple), samples=args.samples,
                   cache_dir=work / "cache", space_options=space_options, strategy_options=options, seed=seed,
                   progress=False, validate=False, resume=study_exists(store, study))
    with ResultStore(store) as opened:
        records = opened.records(study)
    print(json.dumps({"search": name, "seed": seed, "evaluations": len(records),
                      "wall_time_s": round(time.perf_counter() - start, 1)}), file=sys.stderr)
    return records


def _checkpoints(name: str, records: list, args: argparse.Namespace) -> list[dict]:
    """The search-split front and the passes spent at each fraction of the search's budget."""
    multiple, features = SEARCHES[name][4], SEARCHES[name][5]
    steps = NFE_RANGE[1]
    passes = features * FEATURE_SAMPLES * steps * 2  # feature runs: samples × steps × CFG pair
    points, schedules, out = [], [], []
    ends = [round(f * args.budget * multiple) for f in FRACTIONS]
    ends[-1] = min(ends[-1], len(records))  # equal evaluations: a GA's last generation may overshoot the budget
    for i, record in enumerate(records, start=1):
        passes += int(record.summary.get("forward_passes", 0))
        if record.status == "ok":
            points.append([record.metrics[n] for n in OBJECTIVES])
            schedules.append(record.to_schedule())
        if i in ends:
            keep = non_dominated(np.array(points), DIRECTIONS)
            out.append({"evaluations": i, "passes": passes,
                        "front": [s for s, k in zip(schedules, keep, strict=True) if k]})
    return out


def _common_prefix(a: list, b: list) -> int:
    """How many first records two studies share, schedule for schedule (the last solver batch of bilevel's phase 1
    is cut to its budget, so it may differ)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False))
                 if x.to_schedule().key != y.to_schedule().key),
                min(len(a), len(b)))


def _stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "per_seed": values}


def _figure(lines: dict, out: dict, path: Path) -> None:
    """Held-out hypervolume over the baselines' front against denoiser passes: one line per search and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"solver": "tab:blue", "cache": "tab:orange", "cache+screen": "tab:brown", "bilevel": "tab:green",
              "joint-ga": "tab:olive", "solver ∪ cache": "tab:grey", "solver ∪ cache+screen": "black"}
    fig, ax = plt.subplots(figsize=(6.6, 4.6))
    for name, per_seed in lines.items():
        for i, rows in enumerate(per_seed.values()):
            ax.plot([r["forward_passes"] / 1e6 for r in rows], [r["heldout_over_baselines"] for r in rows],
                    marker="o", ms=3, color=colors.get(name), ls="--" if "∪" in name else "-",
                    label=name if i == 0 else None)
    ax.set_xlabel("denoiser forward passes (millions)")
    ax.set_ylabel("held-out hypervolume / baselines' front")
    ax.set_title(f"Joint vs union at equal total budget, {out['model']} ({len(out['seeds'])} seeds each)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=130, bbox_inches="tight")


if __name__ == "__main__":
    main()
