"""Fidelity to the full-compute (teacher) output of the same seed and condition: MSE and PSNR per sample."""

from __future__ import annotations

import torch

DATA_RANGE = 2.0  # images live in [-1, 1]


def mse(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, shape (N,)."""
    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape")
    return (images.float() - reference.float()).pow(2).flatten(1).mean(dim=1)


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Per-sample peak signal-to-noise ratio in dB (inf for identical images)."""
    return 10.0 * torch.log10(data_range**2 / mse(images, reference))
