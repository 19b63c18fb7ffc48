"""Cache baselines on the builtin model: MACs ratio, measured speedup, fidelity, hook overhead, and how well the
per-component latency table predicts measured latency. Prints one JSON object per line (machine-readable).

    python benchmarks/cache_baselines.py [--steps 20] [--batch 64] [--repeats 3] [--random 10] [--calibrate-mag]
                                         [--only NAME_PART ...]

diffusers' caches (FirstBlockCache, PAB, TaylorSeer, FasterCache, MagCache) are costed by what really ran
(`observe_units`: rows of every block and component per call), ours by their plans; both with the same tables.
`--calibrate-mag` (re)writes the builtin model's MagCache ratios (schedsearch/assets/mnist_dit_mag_ratios.json)
with diffusers' calibration mode on this exact setting before the MagCache rows.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from schedsearch.objectives.cost import (
    analytic_macs_table,
    calibrate_base,
    measure_latency,
    measured_latency_table,
    observe_units,
    schedule_cost,
)
from schedsearch.objectives.fidelity import mse, psnr
from schedsearch.runtime.cache_hooks import CacheRuntime, model_layout
from schedsearch.runtime.diffusers_caches import (
    MAG_RATIOS_PATH,
    DiffusersCache,
    builtin_mag_ratios,
    calibrate_mag_ratios,
)
from schedsearch.runtime.models import initial_noise, load_model
from schedsearch.runtime.sampler import sample
from schedsearch.spaces import baselines
from schedsearch.spaces.cache_plan import ComponentCachePlan, slot_names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--random", type=int, default=10, help="random component plans for the latency check")
    parser.add_argument("--calibrate-mag", action="store_true", help="recalibrate the builtin MagCache ratios")
    parser.add_argument("--only", action="append", help="run only the rows whose name contains one of these")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = load_model("builtin:mnist-dit")
    info, net = model.info, model.network
    plan = baselines.dpm_solver_plan(baselines.linspace_timesteps(info.num_train_timesteps, args.steps), 2)
    labels = torch.arange(args.batch) % 10
    denoise = model.denoiser(labels, 2.0)
    x = initial_noise(range(args.batch), info.sample_shape)
    layout, n = model_layout(info), plan.num_steps

    def run(cache=None) -> torch.Tensor:
        if cache is None:
            return sample(denoise, x, plan, model.noise_schedule)
        with CacheRuntime(net, info, cache) as runtime:
            return sample(runtime.wrap(denoise), x, plan, model.noise_schedule)

    def report(name: str, out: torch.Tensor, timing, cache=None, observed=None) -> None:
        if observed is not None:  # what a rule-based cache really ran, row by row
            cost = observed.cost(macs, full_batch=2 * args.batch, multiplier=2)
            predicted = observed.cost(lat_table, full_batch=2 * args.batch)
        else:
            cost = schedule_cost(macs, plan, info, cache, multiplier=2)
            predicted = schedule_cost(lat_table, plan, info, cache)
        speedup = base_time.median_s / timing.median_s
        row = {
            "bench": "cache_baseline",
            "name": name,
            "mac_speedup": full_macs / cost,
            "measured_speedup": speedup,
            "realised_fraction": (speedup - 1) / (full_macs / cost - 1) if cost < full_macs else None,
            "overhead_pct": 100 * (timing.median_s / base_time.median_s - 1) if cost == full_macs else None,
            "psnr_db": float(psnr(out, reference).mean()),
            "mse": float(mse(out, reference).mean()),
            **timing.as_dict(),
            "predicted_s": predicted,
            "uncached_median_s": base_time.median_s,  # the baseline this row's speedup is relative to
        }
        print(json.dumps(row))

    macs = analytic_macs_table(net, info)
    full_macs = schedule_cost(macs, plan, info, multiplier=2)
    reference = run()
    base_time = measure_latency(run, warmup=1, repeats=args.repeats)
    xx = torch.cat([x, x])
    tt = torch.full((2 * args.batch,), 500.0)
    cond = torch.cat([labels, torch.full_like(labels, 10)])
    lat_table = measured_latency_table(net, info, lambda: net(xx, timestep=tt, class_labels=cond), repeats=5)
    module_timed_full = schedule_cost(lat_table, plan, info)
    lat_table = calibrate_base(lat_table, base_time.median_s, plan.nfe)
    print(
        json.dumps(
            {
                "bench": "uncached",
                "steps": n,
                "batch": args.batch,
                "macs_per_sample": full_macs,
                **base_time.as_dict(),
                "module_timed_s": module_timed_full,
            }
        )
    )

    candidates = {
        "all-recompute (hook overhead)": ComponentCachePlan.full(layout, n),
        "FORA N=2": baselines.fora_cache_plan(layout, n, 2),
        "FORA N=3": baselines.fora_cache_plan(layout, n, 3),
        "unit blocks 1-4, every 2": baselines.uniform_unit_plan("transformer_blocks", 1, 5, n, 2),
        "unit blocks 1-4, every 3": baselines.uniform_unit_plan("transformer_blocks", 1, 5, n, 3),
        "unit blocks 0-5, every 2": baselines.uniform_unit_plan("transformer_blocks", 0, 6, n, 2),
    }

    def selected(name: str) -> bool:
        return not args.only or any(part in name for part in args.only)

    for name, cache in candidates.items():
        if not selected(name):
            continue
        out = run(cache)
        timing = measure_latency(lambda cache=cache: run(cache), warmup=1, repeats=args.repeats)
        report(name, out, timing, cache)

    external = {
        "diffusers FirstBlockCache 0.05": ("first_block_cache", {"threshold": 0.05}),
        "diffusers FirstBlockCache 0.1": ("first_block_cache", {"threshold": 0.1}),
        "diffusers FirstBlockCache 0.2": ("first_block_cache", {"threshold": 0.2}),
        "diffusers PAB skip 2 (t 100-800)": (
            "pyramid_attention_broadcast",
            {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (100, 800)},
        ),
        "diffusers PAB skip 3 (t 100-800)": (
            "pyramid_attention_broadcast",
            {"spatial_attention_block_skip_range": 3, "spatial_attention_timestep_skip_range": (100, 800)},
        ),
        "diffusers TaylorSeer interval 2, order 1": (
            "taylorseer_cache",
            {"cache_interval": 2, "max_order": 1, "disable_cache_before_step": 3},
        ),
        "diffusers TaylorSeer interval 3, order 1": (
            "taylorseer_cache",
            {"cache_interval": 3, "max_order": 1, "disable_cache_before_step": 3},
        ),
        "diffusers TaylorSeer interval 3, order 2": (
            "taylorseer_cache",
            {"cache_interval": 3, "max_order": 2, "disable_cache_before_step": 3},
        ),
        "diffusers FasterCache (defaults, BCHW)": ("faster_cache", {}),
        "diffusers FasterCache uncond every 2 (t<900)": (
            "faster_cache",
            {
                "spatial_attention_timestep_skip_range": (-1, 900),
                "unconditional_batch_skip_range": 2,
                "unconditional_batch_timestep_skip_range": (-1, 900),
            },
        ),
    }
    if args.calibrate_mag or not MAG_RATIOS_PATH.is_file():
        ratios = calibrate_mag_ratios(net, denoise, lambda d: sample(d, x, plan, model.noise_schedule), plan.nfe)
        setting = {"model": info.name, "solver": "dpm_solver++(2M)", "steps": n, "batch": args.batch, "guidance": 2.0}
        Path(MAG_RATIOS_PATH).write_text(json.dumps({"setting": setting, "mag_ratios": ratios}, indent=1) + "\n")
    for threshold in (0.06, 0.12, 0.24):
        external[f"diffusers MagCache {threshold}"] = (
            "mag_cache",
            {"threshold": threshold, "mag_ratios": builtin_mag_ratios(), "num_inference_steps": plan.nfe},
        )
    for name, (kind, params) in external.items():
        if not selected(name):
            continue
        with DiffusersCache(net, kind, **params) as ext:
            wrapped = ext.wrap(denoise)

            def run_ext(wrapped=wrapped) -> torch.Tensor:
                return sample(wrapped, x, plan, model.noise_schedule)

            out = run_ext()
            observed = observe_units(net, info, run_ext)
            timing = measure_latency(run_ext, warmup=0, repeats=args.repeats)
        report(name, out, timing, observed=observed)

    rng = random.Random(0)
    errors = []
    n_slots = len(slot_names(layout))
    for k in range(args.random):
        keep = rng.uniform(0.3, 0.9)
        rows = ["1" * n_slots] + [
            "".join("1" if rng.random() < keep else "0" for _ in range(n_slots)) for _ in range(n - 1)
        ]
        cache = ComponentCachePlan(layout, tuple(rows))
        timing = measure_latency(lambda cache=cache: run(cache), warmup=0, repeats=args.repeats)
        predicted = schedule_cost(lat_table, plan, info, cache)
        errors.append(abs(predicted - timing.median_s) / timing.median_s)
        print(
            json.dumps(
                {
                    "bench": "latency_prediction",
                    "plan": k,
                    "recompute_fraction": cache.recompute_fraction(),
                    "measured_s": timing.median_s,
                    "predicted_s": predicted,
                }
            )
        )
    if not errors:
        return
    errors.sort()
    print(
        json.dumps(
            {
                "bench": "latency_prediction_summary",
                "plans": len(errors),
                "median_abs_rel_error": errors[len(errors) // 2],
                "max_abs_rel_error": errors[-1],
            }
        )
    )


if __name__ == "__main__":
    main()
