"""DC-Solver calibration on the builtin model: does fitting the compensation ratios (Zhao et al. ECCV 2024, §3.3)
bring UniPC closer to a fine DDIM teacher on held-out seeds, and how well does the cascade polynomial regression
(§3.4) predict ratios for a grid point it was not fitted on (leave-one-out)?

Prints one JSON object per line and writes the whole result to benchmarks/results/dc_fit.json.

    python benchmarks/dc_fit.py [--calib 10] [--heldout 16] [--teacher-steps 200] [--iterations 20]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from schedsearch.calibration.dc_fit import (
    CascadeRegression,
    FittedRatios,
    TeacherSpec,
    cascade_leave_one_out,
    fit_dc_ratios,
    student_plan,
    teacher_trajectory,
)
from schedsearch.runtime.models import initial_noise, load_model
from schedsearch.runtime.sampler import sample
from schedsearch.spaces.baselines import with_dc_ratios
from schedsearch.spaces.schedule import DC_RATIO_RANGE

OUT = Path(__file__).resolve().parent / "results" / "dc_fit.json"


def clean(value: Any) -> Any:
    """NaN (warm-up steps' loss) -> null: strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def emit(row: dict) -> None:
    print(json.dumps(clean(row), allow_nan=False), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:mnist-dit", help="builtin:mnist-dit or builtin:mnist-flow")
    parser.add_argument("--calib", type=int, default=10, help="calibration samples (classes i % 10)")
    parser.add_argument("--heldout", type=int, default=16, help="held-out samples for the evaluation")
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--teacher-solver", default="ddim", choices=["ddim", "dpmsolver++"])
    parser.add_argument("--iterations", type=int, default=20, help="AdamW iterations for the evaluated fits")
    parser.add_argument("--grid-iterations", type=int, default=10, help="AdamW iterations for grid-only fits")
    parser.add_argument("--eval-nfe", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--eval-guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--grid-nfe", type=int, nargs="+", default=[5, 6, 8, 10])
    parser.add_argument("--grid-guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    model = load_model(args.model)
    num_train = model.info.num_train_timesteps
    spec = TeacherSpec(args.teacher_solver, args.teacher_steps)
    calib_classes, calib_seeds = [i % 10 for i in range(args.calib)], [1000 + i for i in range(args.calib)]
    held_classes, held_seeds = [i % 10 for i in range(args.heldout)], [9000 + i for i in range(args.heldout)]
    nfes = sorted({*args.grid_nfe, *args.eval_nfe})
    guidances = sorted({*args.grid_guidance, *args.eval_guidance})
    evaluated = {(n, g) for n in args.eval_nfe for g in args.eval_guidance}
    grid = sorted({(n, g) for n in args.grid_nfe for g in args.grid_guidance} | evaluated)
    record = sorted({t for n in nfes for t in student_plan(num_train, n).timesteps}, reverse=True)

    fits: dict[tuple[int, float], FittedRatios] = {}
    fit_seconds: dict[tuple[int, float], float] = {}
    teacher_seconds = {}
    for g in guidances:
        if not any(p[1] == g for p in grid):
            continue
        t0 = time.perf_counter()
        teacher = teacher_trajectory(
            model, guidance=g, classes=calib_classes, seeds=calib_seeds, record=record, spec=spec
        )
        teacher_seconds[g] = time.perf_counter() - t0
        for n in nfes:
            if (n, g) not in grid:
                continue
            iterations = args.iterations if (n, g) in evaluated else args.grid_iterations
            t0 = time.perf_counter()
            fitted = fit_dc_ratios(
                model,
                nfe=n,
                guidance=g,
                classes=calib_classes,
                seeds=calib_seeds,
                iterations=iterations,
                teacher=teacher,
                progress=False,
            )
            fit_seconds[(n, g)] = time.perf_counter() - t0
            fits[(n, g)] = fitted
            emit(
                {
                    "kind": "fit",
                    "nfe": n,
                    "guidance": g,
                    "iterations": iterations,
                    "ratios": [round(r, 4) for r in fitted.ratios],
                    "calib_mse_unipc": fitted.mse_before,
                    "calib_mse_dc": fitted.mse_after,
                    "seconds": round(fit_seconds[(n, g)], 1),
                }
            )
            print(f"[dc_fit] {time.perf_counter() - started:.0f}s fitted nfe={n} cfg={g:g}", file=sys.stderr)

    fit_list = [fits[p] for p in grid]
    loo = cascade_leave_one_out(fit_list)
    loo_pred = dict(zip(loo.held_out, loo.predicted, strict=True))
    cpr = CascadeRegression.fit(fit_list)
    loo_row = {
        "kind": "cascade_loo",
        "grid": [list(p) for p in loo.held_out],
        "mse_per_held_out": list(loo.mse),
        "mse_ones_per_held_out": list(loo.mse_ones),
        "mean_mse": loo.mean_mse,
        "mean_mse_ones": loo.mean_mse_ones,
    }
    emit(loo_row)

    evaluations = []
    for g in args.eval_guidance:
        x = initial_noise(held_seeds, model.info.sample_shape)
        teacher = teacher_trajectory(
            model, guidance=g, classes=held_classes, seeds=held_seeds, record=[record[0]], spec=spec
        )
        denoise = model.denoiser(held_classes, g)
        for n in args.eval_nfe:
            plan = student_plan(num_train, n)

            def mse_of(ratios: tuple[float, ...], plan=plan, denoise=denoise, x=x, teacher=teacher) -> float:
                # a cascade prediction outside the range a plan accepts (extrapolation) is clipped into it
                lo, hi = DC_RATIO_RANGE
                ratios = tuple(min(max(r, lo), hi) for r in ratios)
                out = sample(denoise, x, with_dc_ratios(plan, ratios), model.noise_schedule,
                             model.info.prediction_type)
                return float((out.double() - teacher.final.double()).square().mean())

            row = {
                "kind": "heldout",
                "nfe": n,
                "guidance": g,
                "samples": args.heldout,
                "mse_unipc": mse_of((1.0,) * n),
                "mse_dc_fitted": mse_of(fits[(n, g)].ratios),
                "mse_dc_cascade_loo": mse_of(loo_pred[(n, g)]),
                "cascade_loo_ratios_clipped": sum(not DC_RATIO_RANGE[0] <= r <= DC_RATIO_RANGE[1]
                                                  for r in loo_pred[(n, g)]),
                "mse_dc_cascade_all": mse_of(cpr.predict(n, g)),
            }
            row["improvement_fitted"] = 1.0 - row["mse_dc_fitted"] / row["mse_unipc"]
            evaluations.append(row)
            emit(row)

    result = {
        "benchmark": "dc_fit",
        "model": model.info.name,
        "teacher": {"solver": spec.solver, "steps": spec.steps},
        "calibration": {"samples": args.calib, "seeds": [calib_seeds[0], calib_seeds[-1]]},
        "heldout": {"samples": args.heldout, "seeds": [held_seeds[0], held_seeds[-1]]},
        "iterations": {"evaluated_fits": args.iterations, "grid_fits": args.grid_iterations, "lr": 0.1},
        "fits": [
            {**fits[p].to_dict(), "iterations": args.iterations if p in evaluated else args.grid_iterations}
            for p in grid
        ],
        "cascade_loo": loo_row,
        "cascade_coefficients_kjl": cpr.array.tolist(),
        "heldout_eval": evaluations,
        "seconds": {
            "teachers": {str(g): round(s, 1) for g, s in teacher_seconds.items()},
            "fits": {f"{n}@{g:g}": round(s, 1) for (n, g), s in fit_seconds.items()},
            "total": round(time.perf_counter() - started, 1),
        },
        "threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(clean(result), indent=2, allow_nan=False))
    emit({"kind": "summary", "total_seconds": result["seconds"]["total"], "out": str(args.out)})


if __name__ == "__main__":
    main()
