"""Every strategy with `--preset quick` on the builtin model: wall time on this machine, evaluations, and the
hypervolume of its front against the front of its space's hand-made baselines (same calibration, same objectives).

Prints one JSON object and writes benchmarks/results/search_quick.json. Run: python benchmarks/search_quick.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from schedsearch.calibration.calibration_set import CalibrationSet, default_spec
from schedsearch.evaluation.local import LocalEvaluator
from schedsearch.results.pareto import hypervolume, non_dominated
from schedsearch.results.store import ResultStore
from schedsearch.runtime.models import load_model
from schedsearch.search.base import Budget
from schedsearch.search.fixed import FixedStrategy
from schedsearch.search.loop import run_study
from schedsearch.study import PRESETS, build_space, run_search

RUNS = [  # (space, strategy, objectives)
    ("cache", "ecad", ("psnr", "macs")),
    ("cache", "nsga2", ("psnr", "macs")),
    ("cache", "tpe", ("psnr", "macs")),
    ("cache", "optuna-nsga2", ("psnr", "macs")),
    ("cache", "predictor", ("psnr", "macs")),
    ("cachequant", "dp", ("psnr", "macs")),
    ("dc", "dc-fit", ("mse", "nfe")),
    ("solver", "predictor", ("psnr", "nfe")),
    ("joint", "nsga2", ("psnr", "macs")),
]
BUDGET = 32


def points(store: ResultStore, study: str, objectives: dict[str, str]) -> np.ndarray:
    rows = [r for r in store.records(study) if r.status == "ok"]
    return np.array([[r.metrics[n] for n in objectives] for r in rows], dtype=float).reshape(-1, len(objectives))


def main() -> None:
    cache_dir = Path(tempfile.mkdtemp(prefix="ssbench"))
    store_path = cache_dir / "bench.db"
    model = load_model("builtin:mnist-dit")
    preset = PRESETS["quick"]
    spec = default_spec(model.info, samples=preset.samples, teacher_steps=preset.teacher_steps)
    t0 = time.perf_counter()
    CalibrationSet.open(spec, cache_dir).build(model, progress=False)
    out = {"model": model.info.name, "preset": "quick", "samples": preset.samples, "budget": BUDGET,
           "teacher_build_s": round(time.perf_counter() - t0, 1), "runs": []}
    for space_name, strategy, objective_names in RUNS:
        objectives = None
        start = time.perf_counter()
        result = run_search(model=model, space=space_name, strategy=strategy, objectives=list(objective_names),
                            study=f"{space_name}-{strategy}", store=store_path, budget=Budget(evaluations=BUDGET),
                            cache_dir=cache_dir, progress=False)
        wall = time.perf_counter() - start
        with ResultStore(store_path) as store:
            space = build_space(space_name, model.info, "quick")
            calibration = CalibrationSet.open(spec, cache_dir)
            evaluator = LocalEvaluator(model, calibration, list(objective_names), cost_cache_dir=str(cache_dir))
            objectives = {o.name: o.direction for o in evaluator.objectives if o.name in objective_names}
            base_study = f"{space_name}-baselines-{'-'.join(objective_names)}"
            genomes = [space.encode(s) for _, s in space.baselines()]
            run_study(study=base_study, space=space, strategy=FixedStrategy(space.genome, 2, genomes=genomes),
                      objectives=objectives, evaluator=evaluator, store=store, budget=Budget(evaluations=10_000),
                      progress=False)
            ours = points(store, f"{space_name}-{strategy}", objectives)
            base = points(store, base_study, objectives)
        both = np.vstack([ours, base])
        directions = list(objectives.values())
        # Common reference: 10% beyond the worst value of either set, in minimisation form.
        signs = np.array([1.0 if d == "min" else -1.0 for d in directions])
        worst = (both * signs).max(axis=0)
        span = (both * signs).max(axis=0) - (both * signs).min(axis=0)
        ref = worst + 0.1 * np.where(span > 0, span, 1.0)
        ref_original = ref * signs
        hv_ours = hypervolume(ours, directions, ref_original)
        hv_base = hypervolume(base, directions, ref_original)
        hv_union = hypervolume(both, directions, ref_original)
        base_front = base[non_dominated(base, directions)]
        out["runs"].append({
            "space": space_name, "strategy": strategy, "objectives": objectives, "evaluations": result.evaluations,
            "wall_time_s": round(wall, 1), "baselines": len(base),
            "hypervolume": {"ours": hv_ours, "baselines": hv_base, "union": hv_union,
                            "ours_over_baselines": hv_ours / hv_base if hv_base > 0 else None},
            "baselines_dominated_by_ours": int(sum(
                any(np.all(o * signs <= b * signs) and np.any(o * signs < b * signs) for o in ours)
                for b in base_front)),
            "baseline_front_size": len(base_front),
        })
        print(json.dumps(out["runs"][-1]), file=sys.stderr, flush=True)
    text = json.dumps(out, indent=1)
    print(text)
    target = Path(__file__).parent / "results" / "search_quick.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(text + "\n")


if __name__ == "__main__":
    main()
