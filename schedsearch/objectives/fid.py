"""Fréchet distance between feature distributions (FID when the features are Inception's).

Statistics are accumulated batch by batch (`FeatureStatsAccumulator`), so scoring a schedule never holds all of its
images, and reference statistics are computed once and saved (`FeatureStats.save`), as EDM's `fid.py ref` does.
The builtin feature space is the penultimate layer of the builtin MNIST classifier (`builtin_features`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.linalg

if TYPE_CHECKING:
    import torch

    from schedsearch.runtime.builtin import MnistClassifier

STATS_FORMAT = "schedsearch.feature_stats/v1"


def _as_float64_2d(features: Any) -> np.ndarray:
    """(N, D) float64 from a numpy array or torch tensor (any device)."""
    if hasattr(features, "detach"):
        features = features.detach().cpu().double().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features: expected shape (N, D), got {array.shape}")
    return array


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Mean and covariance (ddof=1) of `count` feature vectors: all a Fréchet distance needs of a sample set."""

    mean: np.ndarray  # (D,) float64
    cov: np.ndarray  # (D, D) float64
    count: int

    def __post_init__(self) -> None:
        mean = np.array(self.mean, dtype=np.float64).reshape(-1)
        cov = np.array(self.cov, dtype=np.float64)
        if cov.shape != (mean.size, mean.size):
            raise ValueError(f"FeatureStats: cov shape {cov.shape} does not match mean dim {mean.size}")
        if int(self.count) < 2:
            raise ValueError(f"FeatureStats: a covariance needs at least 2 samples, got count={self.count}")
        mean.flags.writeable = False
        cov.flags.writeable = False
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "cov", cov)
        object.__setattr__(self, "count", int(self.count))

    @property
    def dim(self) -> int:
        return self.mean.size

    @classmethod
    def from_features(cls, features: Any) -> FeatureStats:
        acc = FeatureStatsAccumulator()
        acc.update(features)
        return acc.result()

    def save(self, path: Path | str) -> Path:
        """Write a `.npz` atomically (temp file + os.replace), so a killed run never leaves half a reference."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare temp name
            np.savez(f, format=np.str_(STATS_FORMAT), mean=self.mean, cov=self.cov, count=np.int64(self.count))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> FeatureStats:
        with np.load(Path(path), allow_pickle=False) as data:
            fmt = str(data["format"]) if "format" in data.files else None
            if fmt != STATS_FORMAT:
                raise ValueError(f"{path}: not a feature-stats file (format {fmt!r}, expected {STATS_FORMAT!r})")
            return cls(mean=data["mean"], cov=data["cov"], count=int(data["count"]))


class FeatureStatsAccumulator:
    """Streaming mean / covariance: O(D²) memory whatever the number of samples.

    Sums are kept about a shift (the first batch's mean), the "shifted data" form of the two-pass formula, so that
    cov = (Σ yyᵀ - n ȳȳᵀ) / (n - 1) does not lose digits to cancellation when features have a large common offset.
    """

    def __init__(self) -> None:
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None
        self.count = 0

    def update(self, features: Any) -> None:
        x = _as_float64_2d(features)
        if len(x) == 0:
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros(x.shape[1])
            self._outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != self._shift.size:
            raise ValueError(f"features: dim {x.shape[1]} differs from earlier batches' {self._shift.size}")
        y = x - self._shift
        self._sum += y.sum(axis=0)
        self._outer += y.T @ y
        self.count += len(x)

    def result(self) -> FeatureStats:
        if self.count < 2 or self._shift is None:
            raise ValueError(f"FeatureStatsAccumulator: need at least 2 samples, have {self.count}")
        n = self.count
        mean_y = self._sum / n
        cov = (self._outer - n * np.outer(mean_y, mean_y)) / (n - 1)
        return FeatureStats(mean=self._shift + mean_y, cov=(cov + cov.T) / 2.0, count=n)


def _sqrtm_product(cov1: np.ndarray, cov2: np.ndarray, eps: float) -> np.ndarray:
    """Real part of sqrt(cov1 @ cov2); retried with an eps·I offset when the product is (near) singular."""
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        offset = np.eye(cov1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    if np.iscomplexobj(covmean):
        # Eigenvalues of cov1 @ cov2 are real and ≥ 0 in exact arithmetic; imaginary parts are rounding noise
        # unless they are large relative to the matrix itself.
        scale = max(1.0, float(np.abs(np.diagonal(covmean).real).max()))
        imag = float(np.abs(np.diagonal(covmean).imag).max())
        if imag > 1e-3 * scale:
            raise ValueError(f"frechet_distance: sqrtm has imaginary component {imag:.3g}; covariances are degenerate")
        covmean = covmean.real
    return covmean


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, eps: float = 1e-6) -> float:
    """‖μ1 - μ2‖² + Tr(C1 + C2 - 2 (C1 C2)^½) (Heusel et al. 2017, eq. 6; EDM `calculate_fid_from_inception_stats`).

    Clamped at 0: the distance is a squared metric, and identical inputs otherwise give rounding noise of either sign.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape}/{mu2.shape}, cov {cov1.shape}/{cov2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm_product(cov1, cov2, eps)
    value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean)
    return max(float(value), 0.0)


def stats_distance(stats1: FeatureStats, stats2: FeatureStats) -> float:
    """Fréchet distance between two `FeatureStats`."""
    return frechet_distance(stats1.mean, stats1.cov, stats2.mean, stats2.cov)


def builtin_features(
    images: torch.Tensor | np.ndarray, classifier: MnistClassifier | None = None, batch_size: int = 256
) -> np.ndarray:
    """(N, 64) float64 penultimate features of the builtin MNIST classifier for images in [-1, 1], (N, 1, 28, 28).

    This is the builtin model's FID feature space: Inception features are meaningless on 28×28 digits.
    """
    import torch

    if classifier is None:
        from schedsearch.runtime.builtin import load_builtin_classifier

        classifier = load_builtin_classifier()
    device = next(classifier.parameters()).device
    images = torch.as_tensor(images)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device=device, dtype=torch.float32)
            out.append(classifier.features(batch).double().cpu())
    if not out:
        return np.zeros((0, classifier.feature_dim))
    return torch.cat(out).numpy()


# Feature spaces up to this width get an interval of the Fréchet distance: one symmetric eigenvalue problem per
# sample (the jackknife below), 0.6 s for 1,000 samples of the builtin classifier's 64-d features; EfficientNet-Lite0's
# 1,280-d or Inception's 2,048-d features would take minutes per evaluation, so they get none.
MAX_INTERVAL_DIM = 256
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


class _ReferenceTrace:
    """Tr((C1 C2)^½) = Σ √λ(S C1 S) with S = C2^½ symmetric, so a reference's square root is taken once and every
    other distance costs one symmetric eigenvalue problem (instead of a general `sqrtm`)."""

    def __init__(self, reference: FeatureStats) -> None:
        self.reference = reference
        root = np.real(scipy.linalg.sqrtm(reference.cov))
        self.root = (root + root.T) / 2.0

    def distance(self, mean: np.ndarray, cov: np.ndarray) -> float:
        ref = self.reference
        eig = np.linalg.eigvalsh(self.root @ cov @ self.root)
        trace_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
        diff = mean - ref.mean
        return max(float(diff @ diff + np.trace(cov) + np.trace(ref.cov) - 2.0 * trace_sqrt), 0.0)


def leave_one_out_distances(features: np.ndarray, reference: FeatureStats) -> np.ndarray:
    """The Fréchet distance of the features with each sample left out in turn (mean and scatter downdated by one
    sample, O(D²) each, then one eigenvalue problem)."""
    x = _as_float64_2d(features)
    n = len(x)
    trace = _ReferenceTrace(reference)
    mean = x.mean(axis=0)
    scatter = (x - mean).T @ (x - mean)
    out = np.empty(n)
    for i in range(n):
        d = x[i] - mean
        out[i] = trace.distance(mean - d / (n - 1), (scatter - np.outer(d, d) * n / (n - 1)) / (n - 2))
    return out


def frechet_interval(features: np.ndarray, reference: FeatureStats) -> tuple[float, float]:
    """95% interval of the Fréchet distance of `features` (N, D) to a fixed `reference`: the estimate ± 1.96
    jackknife standard errors (Efron & Stein 1981), clamped at 0. It says how far the figure could move on other
    seeds of the candidate, as the per-image means' intervals do; the reference's own noise is not in it.

    Why not the bootstrap used for means: resampling with replacement duplicates samples, which shrinks the
    covariance's rank and inflates the distance, so the bootstrap distribution sits above the estimate (for 1,000
    64-d Gaussian samples its 95% interval was [2.70, 3.06] around an estimate of 1.78 whose sampling distribution
    is [1.67, 1.91]). The jackknife's standard error matched the sampling spread over 79 seeds within 5-25%
    (tests/test_fid.py checks it on Gaussian features)."""
    x = _as_float64_2d(features)
    n = len(x)
    center = _ReferenceTrace(reference).distance(x.mean(axis=0), np.cov(x, rowvar=False, ddof=1))
    loo = leave_one_out_distances(x, reference)
    se = float(np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))
    return max(center - Z95 * se, 0.0), center + Z95 * se
