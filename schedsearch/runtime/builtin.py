"""The embedded default model `builtin:mnist-dit` and its MNIST classifier: architecture and weight loading.

The DiT is diffusers' own `DiTTransformer2DModel` (adaLN-zero blocks like DiT/PixArt), so every cache method
that hooks transformer blocks applies to it unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DIT_WEIGHTS = "mnist_dit.safetensors"
CLASSIFIER_WEIGHTS = "mnist_classifier.safetensors"
MANIFEST = "manifest.json"

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # diffusers' LabelEmbedding reserves id num_classes for the dropped (unconditional) label
NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02  # DDPM (Ho et al. 2020) linear schedule
DEFAULT_GUIDANCE = 2.0

DIT_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "attention_bias": True,
    "sample_size": 28,
    "patch_size": 4,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": NUM_CLASSES,
    "upcast_attention": False,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}


def build_dit() -> torch.nn.Module:
    """A randomly initialised builtin DiT (the training script and tests start from this)."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**DIT_CONFIG)


class MnistClassifier(nn.Module):
    """Small CNN. Its penultimate features are the builtin FID feature space; its softmax is the class-alignment
    score (the builtin analogue of CLIP score)."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 14
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 7
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, self.feature_dim),
            nn.GELU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.feature_dim, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1], shape (N, 1, 28, 28)."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))


def _load_safetensors(module: nn.Module, path: Path) -> nn.Module:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(
            f"builtin weights {path} are missing: reinstall schedsearch, or train them with "
            "`python -m schedsearch.calibration.train_builtin`."
        )
    module.load_state_dict(load_file(str(path)))
    return module.eval().requires_grad_(False)


def load_builtin_dit(assets_dir: Path = ASSETS_DIR, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The shipped, trained builtin DiT in eval mode (fp32 compute; weights may be stored in fp16)."""
    network = _load_safetensors(build_dit(), assets_dir / DIT_WEIGHTS)
    return network if dtype == torch.float32 else network.to(dtype)


def load_builtin_classifier(assets_dir: Path = ASSETS_DIR) -> MnistClassifier:
    return _load_safetensors(MnistClassifier(), assets_dir / CLASSIFIER_WEIGHTS)


def load_manifest(assets_dir: Path = ASSETS_DIR) -> dict[str, Any]:
    path = assets_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}
