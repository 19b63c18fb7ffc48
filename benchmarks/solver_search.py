"""S³ on the builtin model: at NFE 4, 5, 6, search the solver space for FID and compare the best found schedule
with the best of DDIM / DPM-Solver++ 2M, 3M / UniPC bh1, bh2 at the same NFE — selected on the search split, then
both re-scored on the held-out split (disjoint seeds, more samples) so selection noise does not flatter either.

    python benchmarks/solver_search.py [--strategy predictor] [--budget 30] [--samples 500] [--heldout 1000]
        [--objective fid] [--fid-reference teacher]

Prints one JSON object and writes benchmarks/results/solver_search_{fid_teacher,fid_real,psnr,mse}.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from schedsearch.calibration.calibration_set import CalibrationSet, default_spec
from schedsearch.evaluation.local import LocalEvaluator
from schedsearch.results.store import ResultStore
from schedsearch.runtime.models import load_model
from schedsearch.search.base import Budget
from schedsearch.study import build_space, run_search


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:mnist-dit", help="builtin:mnist-dit or builtin:mnist-flow")
    parser.add_argument("--strategy", default="predictor")
    parser.add_argument("--budget", default="30",
                        help="evaluations per NFE in all (one number, or one per --nfe); a rerun with --work-dir "
                             "resumes each study up to it")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--nfe", default="4,5,6")
    parser.add_argument("--objective", default="fid", choices=("fid", "psnr", "mse"))
    parser.add_argument("--fid-reference", default="teacher", choices=("real", "teacher"),
                        help="teacher: FID to the 100-step teacher's images (the model's own distribution)")
    parser.add_argument("--work-dir", type=Path, help="keep the store and calibration sets here (reruns resume)")
    parser.add_argument("--suffix", default="", help="write solver_search_<tag><suffix>.json")
    args = parser.parse_args()
    nfes = [int(v) for v in args.nfe.split(",")]
    budgets = [int(v) for v in args.budget.split(",")]
    budgets = budgets * len(nfes) if len(budgets) == 1 else budgets
    if len(budgets) != len(nfes):
        parser.error(f"--budget: give one number or one per NFE ({len(nfes)})")
    cache_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="sssolver"))
    store_path = cache_dir / "solver.db"
    model = load_model(args.model)
    spec = default_spec(model.info, samples=args.heldout, split="heldout", fid_reference=args.fid_reference)
    heldout = CalibrationSet.open(spec, cache_dir)
    heldout.root.mkdir(parents=True, exist_ok=True)
    check = LocalEvaluator(model, heldout, [args.objective], batch_size=100)
    if args.objective != "fid" or args.fid_reference == "teacher":
        heldout.build(model, batch_size=100, progress=False)
    metric = args.objective
    better = max if metric == "psnr" else min
    out = {"model": model.info.name, "strategy": args.strategy,
           "budget_per_nfe": dict(zip(nfes, budgets, strict=True)),
           "search_samples": args.samples, "heldout_samples": args.heldout,
           "metric": args.objective, "rows": [],
           "fid_reference": args.fid_reference,
           "note": "fid: builtin classifier (64-d) features against the 100-step DPM-Solver++ teacher's images of "
                   "the same split (fid_reference teacher) or 1,000 held-out real digits (real); psnr/mse: to the "
                   "teacher image of the same seed"}
    for nfe, budget in zip(nfes, budgets, strict=True):
        start = time.perf_counter()
        study = f"solver-nfe{nfe}"
        options = {"nfe_range": (nfe, nfe)}
        with ResultStore(store_path) as store:
            done = len(store.records(study)) if study in store.studies() else 0
        if done < budget:
            run_search(model=model, space="solver", strategy=args.strategy, objectives=[metric, "nfe"],
                       study=study, store=store_path, budget=Budget(evaluations=budget),  # the study's total
                       samples=args.samples, cache_dir=cache_dir, batch_size=100, space_options=options,
                       progress=False, validate=False, fid_reference=args.fid_reference, resume=done > 0)
        space = build_space("solver", model.info, "quick", options)
        names = {s.key: name for name, s in space.baselines()}
        with ResultStore(store_path) as store:
            records = [r for r in store.records(study) if r.status == "ok"]
        base = [r for r in records if r.to_schedule().key in names]
        found = [r for r in records if r.to_schedule().key not in names]
        best_base = better(base, key=lambda r: r.metrics[metric])
        best_found = better(found, key=lambda r: r.metrics[metric]) if found else best_base
        held = {}
        for label, record in (("baseline", best_base), ("found", best_found)):
            held[label] = check.evaluate_one(record.to_schedule()).metrics[metric]
        row = {
            "nfe": nfe, "evaluations": len(records), "search_wall_time_s": round(time.perf_counter() - start, 1),
            "best_baseline": names[best_base.to_schedule().key],
            "metric": metric,
            "search": {"baseline": best_base.metrics[metric], "found": best_found.metrics[metric]},
            "heldout": held,
            "heldout_improvement": (held["found"] - held["baseline"] if metric == "psnr"
                                    else 1 - held["found"] / held["baseline"]),
            "found_schedule": json.loads(best_found.schedule_json)["solver"],
        }
        out["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "found_schedule"}), file=sys.stderr, flush=True)
    text = json.dumps(out, indent=1)
    print(text)
    (Path(__file__).parent / "results" / f"solver_search_{_tag(args)}{args.suffix}.json").write_text(text + "\n")


def _tag(args: argparse.Namespace) -> str:
    return f"fid_{args.fid_reference}" if args.objective == "fid" else args.objective


if __name__ == "__main__":
    main()
