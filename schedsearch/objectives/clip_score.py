"""Text/class alignment of generated images.

- `class_alignment`: the builtin analogue of CLIP score. The builtin model is class-conditional, so alignment is how
  confidently the builtin MNIST classifier sees the conditioning class.
- `open_clip_score`: CLIP score (100 · max(cos(image, text), 0), as torchmetrics and the diffusers evaluation guide
  define it) with an open_clip model whose weights are already on this machine. It never downloads: weights come from
  an explicit checkpoint file or from open_clip's local caches, and their absence is a clear error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from schedsearch.runtime.builtin import MnistClassifier

OPEN_CLIP_CHECKPOINT_ENV = "SCHEDSEARCH_OPEN_CLIP_CHECKPOINT"
DEFAULT_OPEN_CLIP_MODEL = "ViT-B-32"
DEFAULT_OPEN_CLIP_PRETRAINED = "laion2b_s34b_b79k"
_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's published preprocessing constants
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def class_probabilities(
    images: torch.Tensor | np.ndarray,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    classifier: MnistClassifier | None = None,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the softmax probability of its conditioning class, and whether it is the top-1 class (images in
    [-1, 1])."""
    import torch

    if classifier is None:
        from schedsearch.runtime.builtin import load_builtin_classifier

        classifier = load_builtin_classifier()
    device = next(classifier.parameters()).device
    images = torch.as_tensor(images)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"class_alignment: {len(images)} images and {len(labels)} labels (need equal, non-zero)")
    probabilities, correct = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device=device, dtype=torch.float32)
            target = labels[start : start + batch_size].to(device)
            probs = classifier(batch).double().softmax(dim=1)
            probabilities.append(probs.gather(1, target[:, None])[:, 0].cpu().numpy())
            correct.append((probs.argmax(dim=1) == target).cpu().numpy())
    return np.concatenate(probabilities), np.concatenate(correct)


def class_alignment(
    images: torch.Tensor | np.ndarray,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    classifier: MnistClassifier | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Mean softmax probability of each image's conditioning class and top-1 accuracy, for images in [-1, 1]."""
    probabilities, correct = class_probabilities(images, labels, classifier, batch_size)
    return {"class_probability": float(probabilities.sum()) / len(probabilities),
            "accuracy": int(correct.sum()) / len(correct)}


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as err:
        raise RuntimeError(
            "CLIP score needs the optional package open_clip, which is not installed: run "
            "`pip install schedsearch[clip]` (or `pip install open-clip-torch`), then provide local weights "
            f"(a checkpoint path via `checkpoint=` or ${OPEN_CLIP_CHECKPOINT_ENV})."
        ) from err
    return open_clip


def _cached_weights(open_clip: Any, model_name: str, pretrained: str, cache_dir: str | None) -> Path | None:
    """Where open_clip would have cached `model_name:pretrained`, if it is there; looks only, never fetches."""
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    url = cfg.get("url") or ""
    if url:
        path = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
        if path.is_file():
            return path
    hf_hub = cfg.get("hf_hub") or ""
    if hf_hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        repo_id, filename = os.path.split(hf_hub)  # "org/model/" (default file names) or "org/model/file.bin"
        names = (filename,) if filename else _HF_WEIGHT_FILES
        for name in names:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
    return None


def resolve_open_clip_weights(
    model_name: str = DEFAULT_OPEN_CLIP_MODEL,
    pretrained: str = DEFAULT_OPEN_CLIP_PRETRAINED,
    checkpoint: str | Path | None = None,
    cache_dir: str | None = None,
) -> Path:
    """A local weights file for open_clip: `checkpoint`, else $SCHEDSEARCH_OPEN_CLIP_CHECKPOINT, else open_clip's
    cache (~/.cache/clip for URL weights, the Hugging Face cache for hub weights). Raises RuntimeError otherwise."""
    open_clip = _import_open_clip()
    checkpoint = checkpoint or os.environ.get(OPEN_CLIP_CHECKPOINT_ENV) or None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise RuntimeError(
                f"open_clip checkpoint {path} does not exist: pass the path of a local {model_name} weights file "
                f"(e.g. open_clip_pytorch_model.bin / .safetensors) as `checkpoint=` or ${OPEN_CLIP_CHECKPOINT_ENV}."
            )
        return path
    cached = _cached_weights(open_clip, model_name, pretrained, cache_dir)
    if cached is None:
        raise RuntimeError(
            f"open_clip weights for {model_name}:{pretrained} are not on this machine and schedsearch never "
            f"downloads: pass a local checkpoint file as `checkpoint=` (or set ${OPEN_CLIP_CHECKPOINT_ENV}), or place "
            "the weights in open_clip's cache (the Hugging Face hub cache, or ~/.cache/clip) on a machine with "
            "network access first. `pip install schedsearch[clip]` installs the code, not the weights."
        )
    return cached


def _clip_pixels(images: torch.Tensor, image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) -> CLIP input: RGB, shortest side resized (bicubic), centre crop, normalised."""
    import torch
    import torch.nn.functional as F

    x = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    scale = image_size / min(h, w)
    size = (max(image_size, round(h * scale)), max(image_size, round(w * scale)))
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    x = x[..., top : top + image_size, left : left + image_size]
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean_t) / std_t


def open_clip_score(
    images: torch.Tensor,
    prompts: Sequence[str],
    *,
    model_name: str = DEFAULT_OPEN_CLIP_MODEL,
    pretrained: str = DEFAULT_OPEN_CLIP_PRETRAINED,
    checkpoint: str | Path | None = None,
    cache_dir: str | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> float:
    """Mean CLIP score of images in [-1, 1] against their prompts (one prompt per image), from local weights only."""
    import torch

    if len(images) != len(prompts) or len(images) == 0:
        raise ValueError(f"open_clip_score: {len(images)} images and {len(prompts)} prompts (need equal, non-zero)")
    open_clip = _import_open_clip()
    weights = resolve_open_clip_weights(model_name, pretrained, checkpoint, cache_dir)
    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(weights), device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    pcfg = getattr(model.visual, "preprocess_cfg", None) or {}
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    mean = pcfg.get("mean") or cfg.get("mean") or _OPENAI_MEAN
    std = pcfg.get("std") or cfg.get("std") or _OPENAI_STD
    size = model.visual.image_size
    size = int(size if isinstance(size, int) else size[0])
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pixels = _clip_pixels(images[start : start + batch_size].to(device), size, mean, std)
            tokens = tokenizer(list(prompts[start : start + batch_size])).to(device)
            image_emb = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)
            text_emb = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
            total += float((100.0 * (image_emb * text_emb).sum(dim=-1).clamp(min=0.0)).sum())
    return total / len(images)
