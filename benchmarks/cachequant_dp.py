"""CacheQuant's DP refresh schedule (Liu et al. CVPR 2025, §3.2) vs uniform every-N refresh on the builtin model.

Calibrates the unit's feature-distance table on 8 samples, runs the DP for each N, and measures the PSNR of the cached
output to the uncached output on held-out seeds, next to the uniform plan with the same number of refreshes.
Prints one JSON object and writes benchmarks/results/cachequant_dp.json.

    python benchmarks/cachequant_dp.py [--steps 20] [--batch 64] [--intervals 2 3 4 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from schedsearch.calibration.unit_features import cachequant_plans, unit_feature_distances
from schedsearch.objectives.fidelity import psnr
from schedsearch.runtime.cache_hooks import CacheRuntime
from schedsearch.runtime.models import initial_noise, load_model
from schedsearch.runtime.sampler import sample
from schedsearch.search.dynamic import plan_cost
from schedsearch.spaces import baselines
from schedsearch.spaces.cache_plan import UnitCachePlan

RESULTS = Path(__file__).resolve().parent / "results" / "cachequant_dp.json"
CALIBRATION_SEEDS = tuple(range(8))
EVAL_SEED0 = 10_000  # held out from the calibration seeds
GUIDANCE = 2.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_time = time.perf_counter()
    model = load_model("builtin:mnist-dit")
    info, n = model.info, args.steps
    plan = baselines.dpm_solver_plan(baselines.linspace_timesteps(info.num_train_timesteps, n), order=2)
    seeds = list(range(EVAL_SEED0, EVAL_SEED0 + args.batch))
    labels = [i % 10 for i in range(args.batch)]
    denoise = model.denoiser(labels, GUIDANCE)
    x = initial_noise(seeds, info.sample_shape)
    reference = model.decode(sample(denoise, x, plan, model.noise_schedule))

    def fidelity(cache: UnitCachePlan) -> float:
        with CacheRuntime(model.network, info, cache) as runtime:
            out = model.decode(sample(runtime.wrap(denoise), x, plan, model.noise_schedule))
        return float(psnr(out, reference).mean())

    units = [("transformer_blocks", 0, info.block_groups[0].count), ("transformer_blocks", 1, 5)]
    rows = []
    for unit in units:
        distance = unit_feature_distances(model, plan, unit, seeds=CALIBRATION_SEEDS, guidance=GUIDANCE)
        for interval, dp in cachequant_plans(model, plan, unit, distance=distance, intervals=args.intervals):
            uniform = baselines.uniform_unit_plan(*unit, num_steps=n, interval=interval)
            assert len(uniform.refresh_steps) == len(dp.refresh_steps)
            row = {
                "unit": f"{unit[0]}[{unit[1]}:{unit[2]}]",
                "interval": interval,
                "refreshes": len(dp.refresh_steps),
                "dp_refresh_steps": list(dp.refresh_steps),
                "uniform_refresh_steps": list(uniform.refresh_steps),
                "dp_cost": plan_cost(distance, dp.refresh_steps),
                "uniform_cost": plan_cost(distance, uniform.refresh_steps),
                "dp_psnr_db": fidelity(dp),
                "uniform_psnr_db": fidelity(uniform),
            }
            row["psnr_gain_db"] = row["dp_psnr_db"] - row["uniform_psnr_db"]
            rows.append(row)
    result = {
        "bench": "cachequant_dp",
        "model": info.name,
        "solver": f"DPM-Solver++(2M), {n} linspace steps",
        "guidance": GUIDANCE,
        "calibration_seeds": list(CALIBRATION_SEEDS),
        "eval_samples": args.batch,
        "eval_seeds": f"{seeds[0]}..{seeds[-1]}",
        "psnr": "mean over samples of PSNR(cached, uncached), images in [-1, 1]",
        "rows": rows,
        "wall_time_s": round(time.perf_counter() - start_time, 1),
    }
    text = json.dumps(result, indent=1)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
