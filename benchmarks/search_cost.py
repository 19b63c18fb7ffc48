"""Search cost: hypervolume on held-out samples against the model work spent, ECAD (the reference: its GA, every plan
run from noise) against ECAD with the reuse-error screen and bounded seeds (`--screen 8`), then with fewer samples
per evaluation (16, 12, 8 instead of 32) and prefix sharing (`share_prefixes`: each generation's plans as a prefix
tree, resuming from the states earlier generations left; bit-identical records), its states bounded by the default
2 GiB or by 8 GiB (`--prefix-memory`; the same records, fewer passes), on the builtin DiT's cache space (20
DPM-Solver++ steps, PSNR to the 100-step teacher ↑ / MACs ↓).

Each (configuration, strategy seed) is one study in its own store (resumable: re-running continues each study to
its budget). Model work is denoiser forward passes (one per sample row of every denoiser call; a CFG pair is two),
read from each record, plus each configuration's model-side preparation (CacheQuant's unit-distance run that seeds
both, the reuse-error run of the screen), which the loop does not count. The teacher images, the same for both, are
left out. At checkpoints along each study the search-split front of the records so far is re-scored on
`--heldout-samples` held-out seeds (one shared store: a schedule on several fronts is scored once), and its
hypervolume is divided by that of the baselines' held-out front (ECAD's and CacheQuant's hand-made schedules), one
reference point for all: below the worst baseline's PSNR by 1 dB, at 1.05× the uncached MACs. The passes needed to
reach 1.10× and 1.12× are the first checkpoint (one after every generation of 24) at or above them.

    python benchmarks/search_cost.py [--seeds 0,1,2] [--work-dir DIR] [--configs ecad,ecad+screen]

Prints one JSON object and writes benchmarks/results/search_cost.json and docs/search_cost.png.
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
from schedsearch.spaces.schedule import Schedule
from schedsearch.study import build_space, run_search, study_exists

OBJECTIVES = {"psnr": "max", "macs": "min"}
DIRECTIONS = list(OBJECTIVES.values())
LEVELS = (1.10, 1.12)
# name: strategy options, evaluations budget, preparation runs of FEATURE_SAMPLES samples (CacheQuant's unit
# distances for the DP seeds; the screen's reuse errors), prefix sharing and its state memory in GiB (the default
# 2 unless given), samples per evaluation (None: --samples)
SCREENED = {"population": 24, "shift_seeds": True, "screen": 8}
CONFIGS = {
    "ecad": {"options": {"population": 24, "shift_seeds": True}, "budget": 972, "prepare": 1, "share": False},
    "ecad+screen": {"options": SCREENED, "budget": 384, "prepare": 2, "share": False},
    "ecad+screen+share@16": {"options": SCREENED, "budget": 384, "prepare": 2, "share": True, "samples": 16},
    "ecad+screen+share@16+8GiB": {"options": SCREENED, "budget": 384, "prepare": 2, "share": True, "samples": 16,
                                  "memory": 8.0},
    "ecad+screen+share@12": {"options": SCREENED, "budget": 384, "prepare": 2, "share": True, "samples": 12},
    "ecad+screen+share@12+8GiB": {"options": SCREENED, "budget": 384, "prepare": 2, "share": True, "samples": 12,
                                  "memory": 8.0},
    "ecad+screen+share@8": {"options": SCREENED, "budget": 384, "prepare": 2, "share": True, "samples": 8},
}
CHECKPOINTS = tuple(range(24, 973, 24))  # after every generation of 24


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--heldout-samples", type=int, default=64)
    parser.add_argument("--budget", action="append", default=[], metavar="CONFIG=N",
                        help="override a configuration's evaluation budget (e.g. ecad=480)")
    parser.add_argument("--seeds-of", action="append", default=[], metavar="CONFIG=S,S",
                        help="other strategy seeds for one configuration (e.g. ecad=0 while its others run)")
    parser.add_argument("--work-dir", type=Path, help="keep stores and calibration here (re-running resumes)")
    parser.add_argument("--no-search", action="store_true", help="only re-score and report what the stores hold")
    args = parser.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    seeds_of = {name: [int(s) for s in args.seeds.split(",")] for name in configs} | {
        k: [int(s) for s in v.split(",")] for k, v in (item.split("=") for item in args.seeds_of)}
    budgets = {name: CONFIGS[name]["budget"] for name in configs} | {
        k: int(v) for k, v in (item.split("=") for item in args.budget)}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sscost"))
    model = load_model("builtin:mnist-dit")
    space_options = {"num_steps": args.steps}
    curves: dict[str, dict[int, list[tuple[int, int, list]]]] = {}
    timing: dict[str, dict[int, float]] = {}
    saved: dict[str, dict[int, float]] = {}  # fraction of the passes prefix sharing saved, by configuration and seed
    for name in configs:
        config = CONFIGS[name]
        samples = config.get("samples") or args.samples
        prepare = config["prepare"] * FEATURE_SAMPLES * args.steps * 2  # feature runs: samples × steps × CFG pair
        for seed in seeds_of[name]:
            store_path = work / f"{name}-seed{seed}.db"
            start = time.perf_counter()
            if not args.no_search:
                run_search(model=model, space="cache", strategy="ecad", objectives=list(OBJECTIVES),
                           study="ecad", store=store_path, budget=Budget(evaluations=budgets[name]),
                           samples=samples, cache_dir=work / "cache", space_options=space_options,
                           strategy_options=config["options"], seed=seed, progress=False, validate=False,
                           resume=study_exists(store_path, "ecad"), share_prefixes=config["share"],
                           prefix_memory=config.get("memory", 2.0))
            timing.setdefault(name, {})[seed] = round(time.perf_counter() - start, 1)
            with ResultStore(store_path) as store:
                records = store.records("ecad")
            curves.setdefault(name, {})[seed] = _checkpoint_fronts(records, prepare, samples, args.steps)
            if config["share"]:  # what the same records cost run from noise: every plan, every step
                spent = sum(int(r.summary.get("forward_passes", 0)) for r in records)
                saved.setdefault(name, {})[seed] = 1 - spent / (len(records) * samples * args.steps * 2)
            print(json.dumps({"config": name, "seed": seed, "evaluations": len(records),
                              "wall_time_s": timing[name][seed]}), file=sys.stderr)
    heldout, full = _heldout_scores(model, curves, args.heldout_samples, work, space_options)
    baselines = heldout.pop("__baselines__")
    base_pts = np.array([[b["psnr"], b["macs"]] for b in baselines])
    ref = [float(base_pts[:, 0].min()) - 1.0, full * 1.05]
    hv_base = hypervolume(base_pts, DIRECTIONS, ref)
    out = {"model": model.info.name, "steps": args.steps, "samples": args.samples,
           "heldout_samples": args.heldout_samples, "objectives": OBJECTIVES, "reference_point": ref,
           "baselines_scored": len(baselines), "baselines_hypervolume": hv_base,
           "configs": {name: {**CONFIGS[name], "budget": budgets[name]} for name in configs},
           "seeds": seeds_of, "runs": {}, "levels": {}}
    for name in configs:
        runs = {}
        for seed, checkpoints in curves[name].items():
            rows = []
            for evaluations, passes, front in checkpoints:
                pts = np.array([[heldout[s.key]["psnr"], heldout[s.key]["macs"]] for s in front])
                rows.append({"evaluations": evaluations, "forward_passes": passes,
                             "heldout_over_baselines": hypervolume(pts, DIRECTIONS, ref) / hv_base,
                             "front_size": len(front)})
            runs[seed] = {"checkpoints": rows, "wall_time_s_this_run": timing[name][seed],
                          "passes_saved_by_sharing": saved.get(name, {}).get(seed),
                          **{f"passes_to_{level:.2f}": _first_reaching(rows, level) for level in LEVELS}}
        out["runs"][name] = runs
    for level in LEVELS:
        key = f"passes_to_{level:.2f}"
        per = {name: [out["runs"][name][s][key] for s in seeds_of[name]] for name in configs}
        entry: dict = {name: {"per_seed": v, **_stats(v)} for name, v in per.items()}
        if "ecad" in per and all(v is not None for v in per["ecad"]):
            reference = float(np.mean(per["ecad"]))
            for name, values in per.items():
                if name != "ecad" and all(v is not None for v in values):
                    entry[name]["ratio_to_ecad"] = float(np.mean(values)) / reference
        out["levels"][f"{level:.2f}"] = entry
    text = json.dumps(out, indent=1)
    print(text)
    (Path(__file__).parent / "results" / "search_cost.json").write_text(text + "\n")
    _figure(out, Path(__file__).parents[1] / "docs" / "search_cost.png")


def _checkpoint_fronts(records, prepare: int, samples: int, steps: int) -> list[tuple[int, int, list]]:
    """(evaluations, forward passes, search-split front schedules) at each checkpoint the study reached, and at its
    end. Records without a pass count (stores written before passes were counted) ran samples × steps × 2."""
    ok_points, ok_schedules, out = [], [], []
    passes = prepare
    ends = sorted({c for c in CHECKPOINTS if c < len(records)} | {len(records)})
    for i, record in enumerate(records, start=1):
        passes += int(record.summary.get("forward_passes", samples * steps * 2))
        if record.status == "ok":
            ok_points.append([record.metrics[n] for n in OBJECTIVES])
            ok_schedules.append(record.to_schedule())
        if i in ends and ok_points:
            keep = non_dominated(np.array(ok_points), DIRECTIONS)
            out.append((i, passes, [s for s, k in zip(ok_schedules, keep, strict=True) if k]))
    return out


def _heldout_scores(model, curves, samples: int, work: Path, space_options: dict) -> tuple[dict, float]:
    """Held-out metrics of every checkpoint front's schedules and of the baselines (under "__baselines__"), and
    the uncached MACs."""
    named = [(n, s) for space in ("cache", "cachequant")
             for n, s in build_space(space, model.info, "quick", space_options).baselines()]
    fronts = [s for per_seed in curves.values() for checkpoints in per_seed.values()
              for _, _, front in checkpoints for s in front]
    scored, evaluator = score_on_heldout(model, [s for _, s in named] + fronts, samples, work / "cache",
                                         work / "heldout.db", OBJECTIVES)
    plan = build_space("cache", model.info, "quick", space_options).solver
    full = next(o for o in evaluator.objectives if o.name == "macs").value(Schedule(model.info.name, plan))
    scored["__baselines__"] = [{"name": n, **scored[s.key]} for n, s in named]
    return scored, full


def _first_reaching(rows: list[dict], level: float) -> int | None:
    return next((r["forward_passes"] for r in rows if r["heldout_over_baselines"] >= level), None)


def _stats(values: list) -> dict:
    known = [v for v in values if v is not None]
    if len(known) < len(values):
        return {"reached": f"{len(known)} of {len(values)} seeds"}
    return {"mean": float(np.mean(known)), "min": float(np.min(known)), "max": float(np.max(known))}


def _figure(out: dict, path: Path) -> None:
    """Held-out hypervolume over the baselines' front against denoiser passes, one line per study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = {"ecad": "tab:orange", "ecad+screen": "tab:green", "ecad+screen+share@16": "tab:purple",
              "ecad+screen+share@16+8GiB": "tab:red", "ecad+screen+share@12": "tab:pink",
              "ecad+screen+share@12+8GiB": "tab:brown",
              "ecad+screen+share@8": "tab:blue"}
    for name, runs in out["runs"].items():
        for i, run in enumerate(runs.values()):
            rows = run["checkpoints"]
            ax.plot([r["forward_passes"] / 1e6 for r in rows], [r["heldout_over_baselines"] for r in rows],
                    marker="o", ms=3, color=colors.get(name), alpha=0.9,
                    label=f"{name}" if i == 0 else None)
    for level in LEVELS:
        ax.axhline(level, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("denoiser forward passes (millions, log scale)")
    ax.set_ylabel("held-out hypervolume / baselines' front")
    ax.set_title(f"Search cost on {out['model']} (cache space, {out['steps']} steps), one line per seed",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=130, bbox_inches="tight")


if __name__ == "__main__":
    main()
