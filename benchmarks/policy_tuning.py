"""Tuned runtime cache policies vs the runtimes' own defaults and presets, on held-out seeds (issue "Tune the caches
people already run").

One policy study per search seed (TPE on the policy space: the knobs of diffusers' FirstBlockCache, MagCache,
TaylorSeer, PAB, FasterCache and cache-dit's DBCache, where each runs on the model, with the number of steps
beside them; PSNR to the 100-step teacher ↑, MACs per image ↓ counted from what each sample's run computed), and
one ECAD study (static masks, the cache space) on the same calibration set. Then, on held-out seeds:

(a) the tuned policy front vs every runtime default and cache-dit preset (and the uncached pipeline at fewer
    steps): hypervolume ratio, and at each preset's PSNR the MACs speed-up of the cheapest front point that
    reaches it (against the preset's own speed-up);
(b) the union of the ECAD front and the policy front vs cache-dit's presets;
(c) the evaluations each study used;
(d) exports reproduce schedsearch's output: the knee's config in its runtime's format, enabled by the stock library
    (diffusers' apply functions on the transformer; cache-dit's load_configs + enable_cache on the stock SD3
    pipeline for the flow model), max abs difference to our own run.

    python benchmarks/policy_tuning.py [--model builtin:mnist-dit] [--budget 120] [--samples 48] [--seeds 0 1]
        [--store PATH]

Prints one JSON object and writes benchmarks/results/policy_tuning[_flow].json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from schedsearch.calibration.calibration_set import HELDOUT_SEED_OFFSET, CalibrationSet, default_spec
from schedsearch.evaluation.local import LocalEvaluator
from schedsearch.results.pareto import hypervolume, non_dominated
from schedsearch.results.query import study_front
from schedsearch.results.store import ResultStore
from schedsearch.runtime.models import load_model
from schedsearch.search.base import Budget
from schedsearch.search.fixed import score_schedules
from schedsearch.study import build_space, run_search, study_exists

OBJECTIVES = {"psnr": "max", "macs": "min"}
KINDS = {  # what runs on each builtin model (the flow model's SD3 blocks refuse FirstBlockCache and FasterCache)
    "builtin:mnist-dit": ["first_block_cache", "mag_cache", "taylorseer_cache", "pyramid_attention_broadcast",
                          "faster_cache", "dbcache"],
    "builtin:mnist-flow": ["mag_cache", "taylorseer_cache", "pyramid_attention_broadcast", "dbcache"],
}
STEPS_RANGE = (8, 20)


def front_points(records: list[dict]) -> list[dict]:
    pts = np.array([[r["psnr"], r["macs"]] for r in records])
    keep = non_dominated(pts, list(OBJECTIVES.values()))
    return [r for r, k in zip(records, keep, strict=True) if k]


def speedup_at(front: list[dict], psnr: float, full: float) -> float | None:
    """MACs speed-up of the cheapest front point with PSNR ≥ `psnr` (None if none reaches it)."""
    ok = [p["macs"] for p in front if p["psnr"] >= psnr]
    return full / min(ok) if ok else None


def export_check(model, schedule) -> dict[str, Any]:
    """(d): the schedule in its runtime's format, applied by the stock library, against our own run."""
    from schedsearch.results.runtime_export import runtime_files
    from schedsearch.runtime.execute import run_batches

    labels, seeds = [3, 7], [HELDOUT_SEED_OFFSET, HELDOUT_SEED_OFFSET + 1]
    ours = torch.cat([im for _, im in run_batches(model, schedule, labels, seeds, 2.0, decode=False)])
    policy = schedule.policy
    fmt = "cache-dit" if policy.runtime == "cache-dit" else "diffusers"
    files = runtime_files(schedule, fmt, "knee")
    if not isinstance(files, dict):
        return {"format": fmt, "not_expressible": files.reason}
    from schedsearch.runtime.models import initial_noise

    x = initial_noise(seeds, model.info.sample_shape)
    if model.info.name == "builtin:mnist-flow" and fmt == "cache-dit":  # the stock StableDiffusion3Pipeline
        import cache_dit

        from schedsearch.runtime import builtin_flow

        flow = builtin_flow.load_builtin_flow()
        pipe = builtin_flow.flow_pipeline(flow)
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                (Path(tmp) / name).write_text(text)
            cache_dit.enable_cache(pipe, **cache_dit.load_configs(str(Path(tmp) / "knee.cache-dit.yaml")))
        try:
            with torch.no_grad():
                theirs = pipe(**flow.conditioner.embeddings(torch.tensor(labels)), latents=x, height=28, width=28,
                              num_inference_steps=schedule.solver.num_steps, guidance_scale=2.0,
                              output_type="latent").images
        finally:
            cache_dit.disable_cache(pipe)
        how = "cache_dit.load_configs + enable_cache on the stock StableDiffusion3Pipeline"
    else:  # no stock pipeline with a cache context (the DiT; SD3's opens none): the stock library's own enable on
        # the transformer, driven by our sampler's loop
        from schedsearch.runtime.sampler import sample

        net, state = model.network, {"t": None}
        denoise = model.denoiser(labels, 2.0)
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                (Path(tmp) / name).write_text(text)
            if fmt == "cache-dit":
                import cache_dit

                from schedsearch.runtime.cache_dit_runtime import patch_state, restore_patch_state

                before = patch_state(net)
                cache_dit.enable_cache(net, **cache_dit.load_configs(str(Path(tmp) / "knee.cache-dit.yaml")))
                cache_dit.refresh_context(net)
                how = "cache_dit.load_configs + enable_cache on the transformer (its registered DiT adapter)"
            else:
                import diffusers.hooks
                from diffusers.models.cache_utils import CacheMixin

                data = json.loads((Path(tmp) / "knee.diffusers.json").read_text())
                if policy.kind == "faster_cache":
                    return {"format": fmt, "kind": policy.kind, "not_checked": "FasterCache on the DiT needs "
                            "schedsearch's CFG batch-order hook; no stock pipeline to check it in"}
                config = {k: getattr(torch, v) if k == "taylor_factors_dtype" else v
                          for k, v in data["config"].items()}
                if policy.kind == "pyramid_attention_broadcast":
                    config["current_timestep_callback"] = lambda: state["t"]
                built = getattr(diffusers.hooks, data["config_class"])(**config)
                getattr(diffusers.hooks, data["apply"])(net, built)  # the export's own function (enable_cache's)
                how = f"diffusers {data['config_class']} from the JSON, diffusers.hooks.{data['apply']}"

            def loop(x_, t, i):
                state["t"] = float(t)
                if fmt == "cache-dit":
                    return denoise(x_, t, i)
                with CacheMixin.cache_context(net, "cond"):
                    return denoise(x_, t, i)

            try:
                with torch.no_grad():
                    theirs = sample(loop, x, schedule.solver, model.noise_schedule, model.info.prediction_type)
            finally:
                if fmt == "cache-dit":
                    cache_dit.disable_cache(net)
                    restore_patch_state(net, before)
                else:  # diffusers' own disable path (it reads only `_cache_config`)
                    net._cache_config = built
                    CacheMixin.disable_cache(net)
                    del net._cache_config
    return {"format": fmt, "kind": policy.kind, "files": sorted(files), "applied_by": how,
            "max_abs_diff": float((theirs - ours).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:mnist-dit", choices=sorted(KINDS))
    parser.add_argument("--budget", type=int, default=120)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--store", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    suffix = "" if args.model == "builtin:mnist-dit" else "_" + args.model.split("-")[-1]
    store_path = args.store or Path(tempfile.gettempdir()) / f"policy_tuning{suffix}.db"
    cache_dir = store_path.with_suffix(".cache")
    model = load_model(args.model)
    options = {"kinds": KINDS[args.model], "steps_range": list(STEPS_RANGE)}
    common = dict(model=model, store=store_path, objectives=tuple(OBJECTIVES), samples=args.samples,
                  cache_dir=cache_dir, progress=False)
    studies = {}
    for seed in args.seeds:
        name = f"policy-s{seed}-n{args.samples}"
        run_search(study=name, space="policy", strategy="tpe", seed=seed, budget=Budget(evaluations=args.budget),
                   space_options=options, resume=study_exists(store_path, name), **common)
        studies[name] = "policy"
    ecad = f"ecad-n{args.samples}"
    run_search(study=ecad, space="cache", strategy="ecad", seed=0, budget=Budget(evaluations=args.budget),
               space_options={"num_steps": STEPS_RANGE[1]}, resume=study_exists(store_path, ecad), **common)

    # held-out: every comparison (runtime defaults, cache-dit presets, fewer steps) and every front, one study
    space = build_space("policy", model.info, "quick", options, model=model, conditions=list(range(4)), guidance=2.0)
    named = space.comparisons()
    spec = default_spec(model.info, samples=args.samples, split="heldout", guidance=2.0, teacher_steps=100)
    calibration = CalibrationSet.open(spec, cache_dir)
    evaluator = LocalEvaluator(model, calibration, list(OBJECTIVES), batch_size=64)
    calibration.build(model, batch_size=64, progress=False)
    with ResultStore(store_path) as store:
        fronts = {s: [r.to_schedule() for r in study_front(store, s).records] for s in [*studies, ecad]}
        schedules = [s for _, s in named] + [s for f in fronts.values() for s in f]
        score_schedules(f"heldout-n{args.samples}", schedules, OBJECTIVES, evaluator, store)
        scored = {r.to_schedule().key: r.metrics for r in store.records(f"heldout-n{args.samples}")
                  if r.status == "ok"}
        evaluations = {s: sum(1 for r in store.records(s)) for s in [*studies, ecad]}
        # the studies' own evaluation time from the store (a resumed run's call time would be ~0)
        timings = {s: sum(r.wall_time_s for r in store.records(s) if "reused_from" not in r.summary)
                   for s in [*studies, ecad]}
    full = scored[dict(named)[f"no-cache-{STEPS_RANGE[1]}steps"].key]["macs"]
    presets = [{"name": n, "psnr": scored[s.key]["psnr"], "macs": scored[s.key]["macs"],
                "macs_p90": scored[s.key].get("macs.p90"), "mac_speedup": full / scored[s.key]["macs"]}
               for n, s in named if s.key in scored]
    preset_pts = np.array([[p["psnr"], p["macs"]] for p in presets])
    directions = list(OBJECTIVES.values())
    per_seed = {}
    every = [scored[s.key] for f in fronts.values() for s in f if s.key in scored]
    ref = [min(preset_pts[:, 0].min(), min(p["psnr"] for p in every)) - 1.0, full * 1.05]
    hv_presets = hypervolume(preset_pts, directions, ref)
    for name in studies:
        points = front_points([{**scored[s.key], "key": s.key} for s in fronts[name] if s.key in scored])
        pts = np.array([[p["psnr"], p["macs"]] for p in points])
        per_seed[name] = {
            "evaluations": evaluations[name], "evaluation_s": timings[name], "front_size": len(points),
            "hypervolume_over_presets": hypervolume(pts, directions, ref) / hv_presets,
            "speedup_at_each_preset": {p["name"]: {"preset": p["mac_speedup"],
                                                   "tuned": speedup_at(points, p["psnr"], full)} for p in presets},
            "front": [{"psnr": p["psnr"], "psnr_ci95": [p.get("psnr.ci95_low"), p.get("psnr.ci95_high")],
                       "mac_speedup": full / p["macs"], "macs_p90_speedup": full / p["macs.p90"]
                       if "macs.p90" in p else None} for p in sorted(points, key=lambda p: p["macs"])],
        }
    ecad_points = front_points([scored[s.key] for s in fronts[ecad] if s.key in scored])
    cache_dit_presets = [p for p in presets if p["name"].startswith(("cache-dit", "dbcache"))]
    union = {}
    for name in studies:
        both = front_points([scored[s.key] for s in fronts[name] if s.key in scored] + ecad_points)
        pts = np.array([[p["psnr"], p["macs"]] for p in both])
        cd_pts = np.array([[p["psnr"], p["macs"]] for p in cache_dit_presets])
        union[name] = {"hypervolume_over_cache_dit_presets": hypervolume(pts, directions, ref)
                       / hypervolume(cd_pts, directions, ref) if len(cd_pts) else None,
                       "speedup_at_each_cache_dit_preset": {p["name"]: {"preset": p["mac_speedup"],
                                                                        "union": speedup_at(both, p["psnr"], full)}
                                                            for p in cache_dit_presets}}
    ratios = [v["hypervolume_over_presets"] for v in per_seed.values()]
    knee_schedule = None
    with ResultStore(store_path) as store:
        first = study_front(store, next(iter(studies)))
        candidates = [r.to_schedule() for r in first.records]
        knee_schedule = next((s for s in candidates[first.knee:] + candidates if s.policy is not None), None)
    exports = [export_check(model, knee_schedule)] if knee_schedule is not None else []
    # one check per runtime: the best-PSNR cache-dit preset and diffusers default too
    for name, schedule in named:
        if name in ("cache-dit-F1B0-0.08-20steps", "taylorseer_cache-default-20steps"):
            exports.append({"schedule": name, **export_check(model, schedule)})
    result = {
        "bench": "policy_tuning", "model": args.model, "samples": args.samples, "search_seeds": args.seeds,
        "heldout_seeds": "1,000,000 + i, never seen by the searches", "budget": args.budget,
        "kinds": KINDS[args.model], "steps_range": STEPS_RANGE, "uncached_macs_at_20_steps": full,
        "reference_point": ref,
        "a_tuned_vs_presets": {"per_seed": per_seed, "hypervolume_ratio_mean": float(np.mean(ratios)),
                               "hypervolume_ratio_range": [float(min(ratios)), float(max(ratios))],
                               "presets": presets},
        "b_union_with_ecad_vs_cache_dit_presets": {"ecad_front_size": len(ecad_points),
                                                   "ecad_evaluations": evaluations[ecad], "per_seed": union},
        "c_evaluations": evaluations, "evaluation_s": timings,
        "d_exports": exports,
    }
    out = Path(__file__).parent / "results" / f"policy_tuning{suffix}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
