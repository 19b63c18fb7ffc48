"""Fidelity to the full-compute (teacher) output of the same seed and condition: MSE, PSNR and SSIM per sample."""

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


SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03  # Wang et al. 2004, §III-C


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    w = torch.exp(-(x**2) / (2.0 * sigma**2))
    return w / w.sum()


def ssim(images: torch.Tensor, reference: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Per-sample SSIM (Wang et al. 2004): 11×11 Gaussian window σ=1.5, K1=0.01, K2=0.03, population (co)variances,
    averaged over the positions where the window fits inside the image and over channels, shape (N,).

    Computed in float64 with a separable 'valid' filter: the same numbers as skimage's
    `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`, which crops the
    window's half-width from its reflect-padded map.
    """
    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape")
    if images.ndim != 4 or min(images.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim: needs (N, C, H, W) images of at least {SSIM_WINDOW}×{SSIM_WINDOW}, got {images.shape}")
    n, c = images.shape[:2]
    x = images.detach().to(torch.float64).reshape(n * c, 1, *images.shape[-2:])
    y = reference.detach().to(device=x.device, dtype=torch.float64).reshape(n * c, 1, *images.shape[-2:])
    w = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA).to(x.device)
    wh, ww = w.view(1, 1, -1, 1), w.view(1, 1, 1, -1)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(z, wh), ww)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(n, -1).mean(dim=1).to(torch.float32)
