import sys
import types

import numpy as np
import pytest

from schedsearch.objectives import clip_score
from schedsearch.objectives.clip_score import class_alignment, open_clip_score, resolve_open_clip_weights


@pytest.fixture(scope="module")
def classifier():
    from schedsearch.runtime.builtin import load_builtin_classifier

    return load_builtin_classifier()


@pytest.fixture(scope="module")
def correctly_classified(classifier):
    """Held-out real digits the classifier gets right (200 of them, every class present)."""
    import torch

    from schedsearch.calibration.mnist_data import load_split

    split = load_split()
    with torch.inference_mode():
        pred = classifier(torch.from_numpy(split.heldout_images)).argmax(1).numpy()
    keep = np.flatnonzero(pred == split.heldout_labels)[::4][:200]
    return split.heldout_images[keep], split.heldout_labels[keep]


def test_class_alignment_on_correct_real_digits(classifier, correctly_classified):
    images, labels = correctly_classified
    scores = class_alignment(images, labels, classifier, batch_size=64)
    assert set(scores) == {"class_probability", "accuracy"}
    assert scores["accuracy"] == 1.0
    assert 0.5 < scores["class_probability"] <= 1.0


def test_class_alignment_drops_with_shuffled_labels(classifier, correctly_classified):
    images, labels = correctly_classified
    shuffled = (labels + 1 + np.random.default_rng(0).integers(0, 9, size=len(labels))) % 10  # never the true class
    right = class_alignment(images, labels, classifier)
    wrong = class_alignment(images, shuffled, classifier)
    assert wrong["accuracy"] < 0.05 and wrong["accuracy"] < right["accuracy"]
    assert wrong["class_probability"] < right["class_probability"]


def test_class_alignment_rejects_mismatched_lengths(classifier, correctly_classified):
    images, labels = correctly_classified
    with pytest.raises(ValueError, match="labels"):
        class_alignment(images[:3], labels[:2], classifier)


def test_open_clip_missing_package_is_actionable(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install schedsearch\[clip\]"):
        open_clip_score(np.zeros((1, 1, 28, 28)), ["a digit"])


def _fake_open_clip(cfg: dict) -> types.ModuleType:
    module = types.ModuleType("open_clip")
    module.get_pretrained_cfg = lambda model_name, tag: cfg

    def never(*args, **kwargs):
        raise AssertionError("must not build a model without local weights")

    module.create_model_and_transforms = never
    return module


@pytest.mark.parametrize(
    "cfg",
    [{"hf_hub": "laion/CLIP-ViT-B-32-laion2B-s34B-b79K/"}, {"url": "https://example.invalid/ViT-B-32.pt"}, {}],
)
def test_open_clip_absent_weights_is_actionable(monkeypatch, tmp_path, cfg):
    monkeypatch.setitem(sys.modules, "open_clip", _fake_open_clip(cfg))
    monkeypatch.delenv(clip_score.OPEN_CLIP_CHECKPOINT_ENV, raising=False)
    with pytest.raises(RuntimeError, match="not on this machine") as err:
        open_clip_score(np.zeros((1, 1, 28, 28)), ["a digit"], cache_dir=str(tmp_path))
    assert "checkpoint=" in str(err.value) and "never" in str(err.value)


def test_open_clip_missing_checkpoint_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "open_clip", _fake_open_clip({}))
    missing = tmp_path / "nope.bin"
    with pytest.raises(RuntimeError, match="does not exist") as err:
        resolve_open_clip_weights(checkpoint=missing)
    assert str(missing) in str(err.value)
    monkeypatch.setenv(clip_score.OPEN_CLIP_CHECKPOINT_ENV, str(missing))
    with pytest.raises(RuntimeError, match="does not exist"):
        resolve_open_clip_weights()


def test_open_clip_weights_found_locally(monkeypatch, tmp_path):
    weights = tmp_path / "ViT-B-32.pt"
    weights.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "open_clip", _fake_open_clip({"url": "https://example.invalid/ViT-B-32.pt"}))
    monkeypatch.delenv(clip_score.OPEN_CLIP_CHECKPOINT_ENV, raising=False)
    assert resolve_open_clip_weights(cache_dir=str(tmp_path)) == weights
    assert resolve_open_clip_weights(checkpoint=weights) == weights


def test_open_clip_score_with_a_stand_in_model(monkeypatch, tmp_path):
    """The scoring path (preprocessing, embeddings, 100·cos) with a stand-in for open_clip's model."""
    import torch

    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x")
    seen = {}

    class StandIn(torch.nn.Module):
        visual = types.SimpleNamespace(image_size=(32, 32), preprocess_cfg={})

        def encode_image(self, pixels):
            seen["pixels"] = pixels.shape
            return torch.tensor([[3.0, 0.0]]).expand(len(pixels), 2)

        def encode_text(self, tokens):
            return torch.stack([torch.tensor([1.0, 1.0]) if int(t[0]) else torch.tensor([-1.0, 0.0]) for t in tokens])

    module = _fake_open_clip({})
    module.create_model_and_transforms = lambda name, pretrained, device: (StandIn(), None, None)
    module.get_tokenizer = lambda name: lambda texts: torch.tensor([[int(t == "match")] for t in texts])
    monkeypatch.setitem(sys.modules, "open_clip", module)
    score = open_clip_score(torch.zeros(2, 1, 28, 28), ["match", "other"], checkpoint=weights)
    assert seen["pixels"] == (2, 3, 32, 32)
    assert score == pytest.approx((100.0 * 2**-0.5 + 0.0) / 2)  # cos 45° and a negative cosine clamped to 0
