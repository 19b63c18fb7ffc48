"""Issue 4's table: every objective for DDIM / DPM-Solver++ / UniPC at NFE 5, 10, 20 and the 100-step teacher on the
builtin model, with sample counts; the spread of FID over 3 seed sets at the chosen sample count; and the time to
score 1,000 images per objective on this machine.

    python benchmarks/objectives_table.py [--samples 500] [--seed-sets 3]

Prints one JSON object and writes benchmarks/results/objectives_table.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from schedsearch.calibration.calibration_set import HELDOUT_SEED_OFFSET, CalibrationSet, default_spec
from schedsearch.evaluation.local import LocalEvaluator
from schedsearch.objectives.base import ImageObjective, ScoreBatch
from schedsearch.runtime.models import load_model
from schedsearch.spaces import baselines
from schedsearch.spaces.schedule import Schedule

OBJECTIVES = ["fid", "class_alignment", "psnr", "mse", "nfe", "macs", "latency_s"]


def solvers(n: int, num_train: int) -> dict[str, object]:
    ts = baselines.linspace_timesteps(num_train, n)
    return {
        "ddim": baselines.ddim_plan(baselines.leading_timesteps(num_train, n)),
        "dpmsolver++2m": baselines.dpm_solver_plan(ts, order=2),
        "unipc-bh2": baselines.unipc_plan(ts, order=2, rule="bh2"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seed-sets", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    cache_dir = Path(tempfile.mkdtemp(prefix="ssobj"))
    model = load_model("builtin:mnist-dit")
    info = model.info
    out: dict = {"model": info.name, "samples": args.samples, "fid_features": "builtin classifier (64-d)",
                 "fid_reference": "1,000 held-out real MNIST digits", "rows": []}
    spec = default_spec(info, samples=args.samples)
    cal = CalibrationSet.open(spec, cache_dir)
    start = time.perf_counter()
    cal.build(model, batch_size=args.batch, progress=True)
    out["teacher_build_s"] = round(time.perf_counter() - start, 1)
    ev = LocalEvaluator(model, cal, OBJECTIVES, batch_size=args.batch, cost_cache_dir=str(cache_dir))
    rows = [("teacher dpmsolver++ 100", 100, spec.teacher)]
    for n in (5, 10, 20):
        rows += [(name, n, Schedule(info.name, plan)) for name, plan in solvers(n, info.num_train_timesteps).items()]
    for name, n, schedule in rows:
        result = ev.evaluate_one(schedule)
        row = {"solver": name, "nfe": n, "status": result.status, "wall_time_s": round(result.wall_time_s, 1),
               "samples": result.samples, **{k: round(v, 6) for k, v in result.metrics.items()}}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)

    # FID spread over disjoint seed sets: how much noise a search must tolerate at this sample count.
    spread = {}
    for n in (5, 10):
        plan = baselines.dpm_solver_plan(baselines.linspace_timesteps(info.num_train_timesteps, n), order=2)
        values = []
        for k in range(args.seed_sets):
            seeds = tuple(HELDOUT_SEED_OFFSET * 2 + k * args.samples + i for i in range(args.samples))
            s = dataclasses.replace(spec, seeds=seeds)
            c = CalibrationSet.open(s, cache_dir)
            c.root.mkdir(parents=True, exist_ok=True)
            e = LocalEvaluator(model, c, ["fid"], batch_size=args.batch)
            values.append(e.evaluate_one(Schedule(info.name, plan)).metrics["fid"])
        spread[f"dpmsolver++2m nfe {n}"] = {"values": values, "mean": float(np.mean(values)),
                                            "std": float(np.std(values, ddof=1))}
    out["fid_seed_spread"] = spread

    # Scoring throughput: 1,000 images through each image objective.
    images = cal.teacher(0, min(len(spec), 1000))
    reps = int(np.ceil(1000 / len(images)))
    images = images.repeat(reps, 1, 1, 1)[:1000]
    conditions = [spec.conditions[i % len(spec)] for i in range(1000)]
    throughput = {}
    for objective in ev.objectives:
        if not isinstance(objective, ImageObjective):
            continue
        acc = objective.accumulator()
        t0 = time.perf_counter()
        for lo in range(0, 1000, args.batch):
            acc.update(ScoreBatch(images[lo : lo + args.batch], conditions[lo : lo + args.batch],
                                  list(range(lo, lo + args.batch)), images[lo : lo + args.batch]))
        acc.result()
        throughput[objective.name] = round(time.perf_counter() - t0, 3)
    out["seconds_to_score_1000_images"] = throughput
    out["torch_threads"] = torch.get_num_threads()
    text = json.dumps(out, indent=1)
    print(text)
    target = Path(__file__).parent / "results" / "objectives_table.json"
    target.write_text(text + "\n")


if __name__ == "__main__":
    main()
