"""Overhead of the cache hooks when they change nothing: an all-recompute plan vs the unhooked model, runs
interleaved A/B so that drift of the machine's speed hits both alike. Prints one JSON object.

    python benchmarks/hook_overhead.py [--steps 20] [--batch 64] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from schedsearch.runtime.cache_hooks import CacheRuntime, model_layout
from schedsearch.runtime.models import initial_noise, load_model
from schedsearch.runtime.sampler import sample
from schedsearch.spaces import baselines
from schedsearch.spaces.cache_plan import ComponentCachePlan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    model = load_model("builtin:mnist-dit")
    plan = baselines.dpm_solver_plan(baselines.linspace_timesteps(1000, args.steps), 2)
    denoise = model.denoiser(torch.arange(args.batch) % 10, 2.0)
    x = initial_noise(range(args.batch), model.info.sample_shape)
    full = ComponentCachePlan.full(model_layout(model.info), args.steps)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def plain() -> None:
        sample(denoise, x, plan, model.noise_schedule)

    def hooked() -> None:
        with CacheRuntime(model.network, model.info, full) as runtime:
            sample(runtime.wrap(denoise), x, plan, model.noise_schedule)

    plain(), hooked()  # warm-up
    ratios, plain_s, hooked_s = [], [], []
    for _ in range(args.rounds):
        a, b = timed(plain), timed(hooked)
        plain_s.append(a), hooked_s.append(b), ratios.append(b / a)
    print(
        json.dumps(
            {
                "bench": "hook_overhead",
                "steps": args.steps,
                "batch": args.batch,
                "rounds": args.rounds,
                "plain_median_s": statistics.median(plain_s),
                "hooked_median_s": statistics.median(hooked_s),
                "overhead_pct_median_of_ratios": 100 * (statistics.median(ratios) - 1),
            }
        )
    )


if __name__ == "__main__":
    main()
