"""RayEvaluator scaling: real evaluations (builtin:mnist-dit) with the local evaluator and Ray with 1 and 2 workers,
the driver's overhead per candidate (a zero-delay fake), and a slow fake model (workers sleep, no CPU) scaled to
8+ workers. Prints JSON and writes benchmarks/results/ray_scaling.json.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/ray_scaling.py [--candidates 8 --samples 16]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from schedsearch.evaluation.ray_evaluator import RayEvaluator, SleepEvaluator, start_local_ray

OUT = Path(__file__).resolve().parent / "results" / "ray_scaling.json"


def _timed(evaluator: Any, schedules: list[Any]) -> tuple[float, list[Any]]:
    start = time.perf_counter()
    results = list(evaluator.evaluate(schedules))
    return time.perf_counter() - start, results


def real_model(candidates: int, samples: int, cache_dir: str) -> dict[str, Any]:
    """Evaluations per second of the real model: local evaluator vs Ray with 1 and 2 CPU workers."""
    from schedsearch.calibration.calibration_set import CalibrationSet, default_spec
    from schedsearch.evaluation.local import LocalEvaluator
    from schedsearch.runtime.models import load_model
    from schedsearch.study import build_space

    model = load_model("builtin:mnist-dit")
    space = build_space("solver", model.info)
    schedules = [space.sample(np.random.default_rng(i)) for i in range(candidates)]
    spec = default_spec(model.info, samples=samples)
    calibration = CalibrationSet.open(spec, cache_dir).build(model, batch_size=samples, progress=False)
    local = LocalEvaluator(model, calibration, ["psnr", "nfe"], batch_size=samples)
    local.evaluate_one(schedules[0])  # warm-up
    wall, reference = _timed(local, schedules)
    rows = {"local": {"wall_s": wall, "evals_per_s": candidates / wall}}
    ref = {e.schedule.key: e.metrics for e in reference}
    for workers in (1, 2):
        start = time.perf_counter()
        with RayEvaluator(model.info.name, spec, cache_dir, ["psnr", "nfe"], batch_size=samples,
                          workers=workers) as evaluator:
            startup = time.perf_counter() - start
            list(evaluator.evaluate(schedules[:workers]))  # warm-up
            wall, results = _timed(evaluator, schedules)
        same = all(ref[e.schedule.key] == e.metrics for e in results)
        rows[f"ray_{workers}"] = {"wall_s": wall, "evals_per_s": candidates / wall, "startup_s": startup,
                                  "speedup_vs_local": rows["local"]["wall_s"] / wall, "same_metrics_as_local": same}
    return {"candidates": candidates, "samples": samples, "solver_space": True, **rows}


def driver_overhead(schedules: list[Any], workers: int = 2) -> dict[str, Any]:
    """Seconds of driver wall and CPU time per candidate when the model takes no time at all."""
    factory = functools.partial(SleepEvaluator, delay_s=0.0)
    with RayEvaluator("fake", None, None, [], workers=workers, evaluator_factory=factory,
                      num_cpus_per_worker=0.5) as evaluator:
        list(evaluator.evaluate(schedules[:workers]))
        cpu = time.process_time()
        wall, _ = _timed(evaluator, schedules)
        cpu = time.process_time() - cpu
    n = len(schedules)
    return {"candidates": n, "workers": workers, "wall_per_candidate_ms": 1e3 * wall / n,
            "driver_cpu_per_candidate_ms": 1e3 * cpu / n}


def slow_fake_scaling(schedules: list[Any], delay_s: float, worker_counts: list[int], per_worker: int) -> list[dict]:
    """A fake model that sleeps `delay_s` per candidate (no CPU): efficiency = ideal time / measured time."""
    rows = []
    for workers in worker_counts:
        factory = functools.partial(SleepEvaluator, delay_s=delay_s)
        n = workers * per_worker
        with RayEvaluator("fake", None, None, [], workers=workers, evaluator_factory=factory,
                          num_cpus_per_worker=0.05) as evaluator:
            list(evaluator.evaluate(schedules[:workers]))  # every actor up and warm
            wall, _ = _timed(evaluator, schedules[:n])
        ideal = n * delay_s / workers
        rows.append({"workers": workers, "candidates": n, "wall_s": wall, "ideal_s": ideal,
                     "evals_per_s": n / wall, "efficiency": ideal / wall})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--delay", type=float, default=0.5, help="seconds per candidate of the slow fake model")
    parser.add_argument("--workers", default="1,2,4,8,12", help="worker counts of the fake-model simulation")
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args()

    from schedsearch.runtime.models import load_model
    from schedsearch.study import build_space

    space = build_space("solver", load_model("builtin:mnist-dit").info)
    schedules = [space.sample(np.random.default_rng(1000 + i)) for i in range(400)]
    start_local_ray(num_cpus=os.cpu_count() or 1, log_to_driver=False)  # stdout stays JSON
    try:
        report: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "ray": ray.__version__,
                        "load_average_at_start": os.getloadavg()},
        }
        if not args.skip_real:
            with tempfile.TemporaryDirectory() as cache:
                report["real_model"] = real_model(args.candidates, args.samples, cache)
        report["driver_overhead"] = driver_overhead(schedules[:200])
        counts = [int(w) for w in args.workers.split(",")]
        report["slow_fake_model"] = {"delay_s": args.delay,
                                     "runs": slow_fake_scaling(schedules, args.delay, counts, per_worker=4)}
        report["machine"]["load_average_at_end"] = os.getloadavg()
    finally:
        ray.shutdown()
    text = json.dumps(report, indent=1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
