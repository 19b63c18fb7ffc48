"""Feature extractors for Fréchet distances, by name. Each maps images in [-1, 1] to (N, d) float64 features and
checks up front that its weights are on this machine.

- `classifier`: the builtin MNIST classifier's 64-d penultimate features (the builtin model's default: Inception
  features mean nothing on 28×28 digits).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from schedsearch.objectives.base import ObjectiveUnavailableError

if TYPE_CHECKING:
    import torch

    from schedsearch.runtime.models import ModelInfo


class FeatureExtractor(ABC):
    name: str
    dim: int

    def check(self) -> None:  # noqa: B027 - optional hook
        """Raise ObjectiveUnavailableError when weights or packages are missing."""

    @abstractmethod
    def features(self, images: torch.Tensor) -> np.ndarray:
        """(N, dim) float64 features of images in [-1, 1], (N, C, H, W)."""


class BuiltinClassifierFeatures(FeatureExtractor):
    name, dim = "classifier", 64

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self._classifier = None

    def check(self) -> None:
        if tuple(self.info.sample_shape) != (1, 28, 28):
            raise ObjectiveUnavailableError(
                f"feature extractor 'classifier' scores 1×28×28 MNIST digits; {self.info.name} makes "
                f"{self.info.sample_shape}: use efficientnet-lite0 or inception"
            )

    def features(self, images: torch.Tensor) -> np.ndarray:
        from schedsearch.objectives.fid import builtin_features
        from schedsearch.runtime.builtin import load_builtin_classifier

        if self._classifier is None:
            self._classifier = load_builtin_classifier()
        return builtin_features(images, self._classifier)


_EXTRACTORS: dict[str, Callable[[ModelInfo], FeatureExtractor]] = {"classifier": BuiltinClassifierFeatures}


def register_extractor(name: str, factory: Callable[[ModelInfo], FeatureExtractor]) -> None:
    _EXTRACTORS[name] = factory


def extractor_names() -> list[str]:
    _load_optional()
    return sorted(_EXTRACTORS)


def get_extractor(name: str, info: ModelInfo) -> FeatureExtractor:
    _load_optional()
    if name not in _EXTRACTORS:
        raise ValueError(f"feature extractor: unknown {name!r}; choose from {', '.join(sorted(_EXTRACTORS))}")
    return _EXTRACTORS[name](info)


def default_extractor_name(info: ModelInfo) -> str:
    """The builtin MNIST model is scored in its classifier's feature space; everything else in efficientnet-lite0."""
    return "classifier" if info.name.startswith("builtin:mnist") else "efficientnet-lite0"


def _load_optional() -> None:
    import importlib
    import importlib.util

    if importlib.util.find_spec("schedsearch.objectives.extra_features") is not None:  # efficientnet-lite0, inception
        importlib.import_module("schedsearch.objectives.extra_features")
