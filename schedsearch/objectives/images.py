"""Image helpers shared by the CLI, training and reports."""

from __future__ import annotations

from pathlib import Path

import torch


def to_unit_interval(images: torch.Tensor) -> torch.Tensor:
    """Model pixel space [-1, 1] -> [0, 1], clamped."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def frames(images: torch.Tensor) -> torch.Tensor:
    """Videos (N, C, F, H, W) as their N·F frames (N·F, C, H, W), sample by sample; images are returned as they
    are. Feature-space metrics (FID) score videos frame by frame, as the video caching papers report them."""
    if images.dim() != 5:
        return images
    return images.permute(0, 2, 1, 3, 4).flatten(0, 1)


def save_grid(images: torch.Tensor, path: Path | str, nrow: int = 8) -> Path:
    """Write images in [-1, 1] as one PNG grid, atomically (a killed run leaves no half-written file). Videos
    (N, C, F, H, W) are drawn one per row, their F frames left to right (`nrow` is then F)."""
    from torchvision.utils import save_image

    if images.dim() == 5:
        n, c, frames, h, w = images.shape
        images, nrow = images.permute(0, 2, 1, 3, 4).reshape(n * frames, c, h, w), frames
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    save_image(to_unit_interval(images), tmp, nrow=nrow, padding=2)
    tmp.replace(path)
    return path
