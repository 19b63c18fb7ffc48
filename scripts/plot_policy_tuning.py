"""The README's policy-tuning figure: held-out PSNR against MACs speed-up for the tuned policy fronts (one per search
seed), the ECAD front, and every runtime default and cache-dit preset, from `benchmarks/policy_tuning.py`'s result
and its store.

    python scripts/plot_policy_tuning.py benchmarks/results/policy_tuning.json --store /tmp/pt_dit.db \
        --out docs/policy_tuning.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from schedsearch.results.pareto import non_dominated
from schedsearch.results.query import study_front
from schedsearch.results.store import ResultStore


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(speed-up, psnr) points of the held-out front, by speed-up."""
    if not points:
        return []
    keep = non_dominated(np.array([[p, 1 / s] for s, p in points]), ["max", "min"])
    return sorted((s, p) for (s, p), k in zip(points, keep, strict=True) if k)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result", type=Path)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    full, samples = result["uncached_macs_at_20_steps"], result["samples"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    with ResultStore(args.store, create=False) as store:
        held = {r.to_schedule().key: r.metrics for r in store.records(f"heldout-n{samples}") if r.status == "ok"}
        studies = [*result["a_tuned_vs_presets"]["per_seed"], f"ecad-n{samples}"]
        for i, study in enumerate(studies):
            keys = [r.to_schedule().key for r in study_front(store, study).records]
            points = _front([(full / held[k]["macs"], held[k]["psnr"]) for k in keys if k in held])
            xs, ys = zip(*points, strict=True)
            label = "ECAD (static masks)" if study.startswith("ecad") else f"tuned policies, search seed {i}"
            ax.step(xs, ys, where="pre", marker="o", ms=3, lw=1.2, label=label,
                    color="tab:gray" if study.startswith("ecad") else f"C{i}")
    groups = {"diffusers default": ("first_block_cache", "mag_cache", "taylorseer_cache", "pyramid", "faster"),
              "cache-dit preset": ("cache-dit", "dbcache"), "no cache, fewer steps": ("no-cache",)}
    markers = {"diffusers default": "s", "cache-dit preset": "^", "no cache, fewer steps": "x"}
    for group, prefixes in groups.items():
        chosen = [p for p in result["a_tuned_vs_presets"]["presets"] if p["name"].startswith(prefixes)]
        ax.scatter([p["mac_speedup"] for p in chosen], [p["psnr"] for p in chosen], marker=markers[group],
                   s=36, label=group, zorder=3, color="black" if group != "cache-dit preset" else "tab:red")
    ax.set_xlabel("MACs speed-up vs the uncached 20 steps (mean over samples)")
    ax.set_ylabel(f"PSNR to the 100-step teacher, dB\n(held-out, {samples} samples)")
    ax.set_title(f"{result['model']}: runtime cache policies tuned vs their defaults and presets", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
