"""Does a CFG-aware cache plan pay on the builtin DiT? The conditional and the unconditional passes run as separate
calls, each refreshing every block's attention and MLP at its own number of evenly spaced steps (FORA-like: reused
in between), against the symmetric plans (one refresh count for both) at equal compute: (n_c, n_u) against (m, m)
with n_c + n_u = 2m.

The guided output is u + s·(c − u) = (1 − s)·u + s·c: an error in the unconditional pass is amplified by |1 − s|
(3 at the builtin's s = 4) and one in the conditional pass by s (4), so reusing the unconditional pass more often
(the intuition behind CFG-aware caches) should cost less fidelity per step saved, if both passes drift alike.

Fidelity is PSNR of the decoded images to the uncached run of the same solver (20 DPM-Solver++ steps) on
`--samples` seeds no search uses (3,000,000 + i, digits i mod 10); compute is the fraction of block components
recomputed, averaged over both passes. Reported: every (cond, uncond) refresh-count pair; per equal-compute pair,
the PSNR difference to the symmetric plan, split by which pass is reused more; and the hypervolume of the front of
all pairs over that of the symmetric ones alone (reference: 1 dB below the worst PSNR, compute 1.05).

    python benchmarks/cfg_aware.py [--samples 128]

Prints one JSON object and writes benchmarks/results/cfg_aware.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from schedsearch.objectives.fidelity import psnr
from schedsearch.results.pareto import hypervolume, non_dominated
from schedsearch.runtime import builtin
from schedsearch.runtime.cache_hooks import CacheRuntime
from schedsearch.runtime.models import initial_noise, load_model, model_layout
from schedsearch.runtime.prefix_tree import template_plan
from schedsearch.runtime.sampler import sample
from schedsearch.spaces.cache_plan import ComponentCachePlan, slot_names

REFRESHES = tuple(range(2, 13))  # refreshed steps per pass, of 20
STEPS = 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args()
    model = load_model("builtin:mnist-dit")
    plan = model.default_plan(STEPS)
    layout = model_layout(model.info)
    seeds = [3_000_000 + i for i in range(args.samples)]
    labels = torch.tensor([i % 10 for i in range(args.samples)])
    null = torch.full_like(labels, builtin.NULL_CLASS)
    noise = initial_noise(seeds, model.info.sample_shape)
    scale = model.info.guidance_default
    plans = {n: refresh_plan(layout, n) for n in (1, *REFRESHES, STEPS)}
    runtime = CacheRuntime(model.network, model.info, template_plan(plans[2]))

    def run(k_cond: int, k_uncond: int) -> torch.Tensor:
        def denoise(x: torch.Tensor, t: float, step_index: int) -> torch.Tensor:
            timestep = torch.full((len(x),), float(t))
            outs = {}
            for branch, k, classes in (("cond", k_cond, labels), ("uncond", k_uncond, null)):
                runtime.context.branch = branch
                runtime.retarget(plans[k])
                outs[branch] = model.network(x, timestep=timestep, class_labels=classes).sample
            return outs["uncond"] + scale * (outs["cond"] - outs["uncond"])

        runtime.reset()
        runtime.context.step_index = -1
        with torch.no_grad():
            x = sample(runtime.wrap(denoise), noise, plan, model.noise_schedule, model.info.prediction_type)
        return model.decode(x)

    try:
        reference = run(STEPS, STEPS)
        rows = []
        for n_cond, n_uncond in itertools.product(REFRESHES, REFRESHES):
            images = run(n_cond, n_uncond)
            compute = (plans[n_cond].recompute_fraction() + plans[n_uncond].recompute_fraction()) / 2
            rows.append({"cond_refreshes": n_cond, "uncond_refreshes": n_uncond, "compute": compute,
                         "psnr": float(psnr(images, reference).mean())})
    finally:
        runtime.remove()
    pts = np.array([[r["psnr"], r["compute"]] for r in rows])
    symmetric = np.array([r["cond_refreshes"] == r["uncond_refreshes"] for r in rows])
    ref = [float(pts[:, 0].min()) - 1.0, 1.05]
    directions = ["max", "min"]
    hv_all = hypervolume(pts[non_dominated(pts, directions)], directions, ref)
    hv_sym = hypervolume(pts[symmetric][non_dominated(pts[symmetric], directions)], directions, ref)
    front = [rows[i] for i in np.flatnonzero(non_dominated(pts, directions))]

    by_pair = {(r["cond_refreshes"], r["uncond_refreshes"]): r["psnr"] for r in rows}
    gains: dict[str, list[float]] = {"uncond_reused_more": [], "cond_reused_more": []}
    for (n_cond, n_uncond), value in by_pair.items():
        m, odd = divmod(n_cond + n_uncond, 2)
        if n_cond != n_uncond and not odd and (m, m) in by_pair:
            side = "uncond_reused_more" if n_uncond < n_cond else "cond_reused_more"
            gains[side].append(value - by_pair[(m, m)])

    out = {"model": model.info.name, "steps": STEPS, "samples": args.samples, "guidance": scale,
           "reference": "the uncached run of the same solver, same seeds", "pairs": rows,
           "front_of_all_pairs": sorted(front, key=lambda r: r["compute"]),
           "hypervolume_all_over_symmetric": hv_all / hv_sym,
           "psnr_minus_symmetric_at_equal_compute": {
               side: {"pairs": len(v), "mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v)),
                      "better_than_symmetric": int(np.sum(np.array(v) > 0))} for side, v in gains.items()}}
    text = json.dumps(out, indent=1)
    print(text)
    (Path(__file__).parent / "results" / "cfg_aware.json").write_text(text + "\n")


def refresh_plan(layout: str, refreshes: int) -> ComponentCachePlan:
    """Every component recomputed at `refreshes` evenly spaced steps (step 0 first), reused in between."""
    steps = {i * STEPS // refreshes for i in range(refreshes)}
    width = len(slot_names(layout))
    return ComponentCachePlan(layout, tuple(("1" if i in steps else "0") * width for i in range(STEPS)))


if __name__ == "__main__":
    main()
