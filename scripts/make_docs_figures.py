"""Figures under docs/ from the shipped builtin model: a 50-step DPM-Solver++ grid (one row per digit), and a
20-step uncached grid beside the same seeds run with a FORA N=2 cache plan.

    python scripts/make_docs_figures.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from schedsearch.objectives.fidelity import psnr
from schedsearch.objectives.images import save_grid, to_unit_interval
from schedsearch.runtime.cache_hooks import CacheRuntime, model_layout
from schedsearch.runtime.models import initial_noise, load_model
from schedsearch.runtime.sampler import sample
from schedsearch.spaces import baselines

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main() -> None:
    model = load_model("builtin:mnist-dit")
    labels = torch.arange(10).repeat_interleave(8)
    x = initial_noise(range(len(labels)), model.info.sample_shape)
    denoise = model.denoiser(labels, 2.0)

    plan50 = baselines.dpm_solver_plan(baselines.linspace_timesteps(1000, 50), 2)
    save_grid(sample(denoise, x, plan50, model.noise_schedule, progress=True), DOCS / "builtin_dpmpp50.png", nrow=8)

    plan20 = baselines.dpm_solver_plan(baselines.linspace_timesteps(1000, 20), 2)
    uncached = sample(denoise, x, plan20, model.noise_schedule, progress=True)
    fora = baselines.fora_cache_plan(model_layout(model.info), 20, 2)
    with CacheRuntime(model.network, model.info, fora) as runtime:
        cached = sample(runtime.wrap(denoise), x, plan20, model.noise_schedule, progress=True)
    left = make_grid(to_unit_interval(uncached), nrow=8, padding=2)
    right = make_grid(to_unit_interval(cached), nrow=8, padding=2)
    gap = torch.ones(left.shape[0], left.shape[1], 8)
    save_image(torch.cat([left, gap, right], dim=2), DOCS / "cache_uncached_vs_fora2.png")
    print(f"FORA N=2 vs uncached, 20 steps: PSNR {psnr(cached, uncached).mean():.2f} dB")


if __name__ == "__main__":
    main()
