"""The diffusers adapter on tiny random pipelines, saved to disk and loaded back offline.

Every family is a real diffusers pipeline directory (model_index.json + components) written with `save_pretrained`.
Prompt families other than SD have no text encoder here (T5/Gemma tokenizers cannot be built offline): their
directories hold the denoiser, scheduler and VAE with the text components saved as null, and the denoiser is given
pre-encoded embeddings. SD gets a tiny CLIP tokenizer + text encoder built from a handwritten vocabulary, so the
prompt-encoding path runs end to end. SD3 and Flux are checked against their own pipelines' sampling loops.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from schedsearch.runtime import diffusers_models as dm  # noqa: E402
from schedsearch.runtime.models import ModelNotAvailableError, initial_noise, load_model  # noqa: E402
from schedsearch.runtime.sampler import sample  # noqa: E402
from schedsearch.spaces.baselines import ddim_plan  # noqa: E402

PROMPT_DIM, POOLED_DIM, TEXT_LEN = 16, 8, 5


def _vae(**kwargs) -> "diffusers.AutoencoderKL":
    return diffusers.AutoencoderKL(
        block_out_channels=(4, 8),  # vae_scale_factor 2
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
        **kwargs,
    )


def _clip(tmp: Path):
    """A CLIP tokenizer over a handwritten character vocabulary and a 1-layer text encoder: no download needed."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(ch + "</w>" for ch in letters)]
    vocab = {token: i for i, token in enumerate(tokens)}
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=TEXT_LEN)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=PROMPT_DIM,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=TEXT_LEN,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return tokenizer, CLIPTextModel(config).eval()


def _unet(**kwargs) -> "diffusers.UNet2DConditionModel":
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=PROMPT_DIM,
        attention_head_dim=2,
        norm_num_groups=4,
        **kwargs,
    )


def build_pipeline(family: str, tmp: Path):
    """A tiny random pipeline of the family (latents 4 x 8 x 8 for 16 px images)."""
    torch.manual_seed(0)
    if family == "dit":
        net = diffusers.DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,  # learned sigma, as the DiT-XL-2 checkpoints
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
            norm_num_groups=1,
        )
        return diffusers.DiTPipeline(transformer=net, vae=_vae(), scheduler=diffusers.DDIMScheduler())
    if family == "pixart":
        net = diffusers.PixArtTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_channels=PROMPT_DIM,
            in_channels=4,
            cross_attention_dim=16,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        )
        scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear")
        return diffusers.PixArtSigmaPipeline(
            tokenizer=None, text_encoder=None, vae=_vae(), transformer=net, scheduler=scheduler
        )
    if family == "sd":
        tokenizer, text_encoder = _clip(tmp)
        scheduler = diffusers.DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
        )
        return diffusers.StableDiffusionPipeline(
            vae=_vae(scaling_factor=0.5),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=_unet(),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "sdxl":
        unet = _unet(
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + POOLED_DIM,
        )
        return diffusers.StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            unet=unet,
            scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear"),
            add_watermarker=False,
        )
    if family == "sd3":
        net = diffusers.SD3Transformer2DModel(
            sample_size=8,
            patch_size=1,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=PROMPT_DIM,
            caption_projection_dim=16,
            pooled_projection_dim=POOLED_DIM,
            out_channels=4,
        )
        none = dict.fromkeys(
            ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]
        )
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        return diffusers.StableDiffusion3Pipeline(
            transformer=net, scheduler=scheduler, vae=_vae(shift_factor=0.1), **none
        )
    if family == "flux":
        net = diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=PROMPT_DIM,
            pooled_projection_dim=POOLED_DIM,
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),
        )
        none = dict.fromkeys(["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"])
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        vae = _vae(shift_factor=0.1, scaling_factor=0.5)
        return diffusers.FluxPipeline(transformer=net, scheduler=scheduler, vae=vae, **none)
    raise AssertionError(family)


def embeddings(family: str, n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random pre-encoded conditions with the keys the adapter documents (negatives except for Flux)."""
    g = torch.Generator().manual_seed(seed)
    out = {"prompt_embeds": torch.randn(n, TEXT_LEN, PROMPT_DIM, generator=g)}
    if family in ("sdxl", "sd3", "flux"):
        out["pooled_prompt_embeds"] = torch.randn(n, POOLED_DIM, generator=g)
    if family != "flux":
        out |= {
            f"negative_{k}": torch.randn(1, *v.shape[1:], generator=g) for k, v in out.items()
        }  # batch 1: broadcast
    if family == "pixart":
        out["prompt_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0]] * n)
    return out


UNET_GROUPS = [(path, 1, ("resnets", "attentions")) for path in ("down_blocks.0", "mid_block", "up_blocks.1")]
EXPECTED = {  # family: (prediction type, block groups as (path, count, components))
    "dit": ("epsilon", [("transformer_blocks", 2, ("attn1", "ff"))]),
    "pixart": ("epsilon", [("transformer_blocks", 2, ("attn1", "attn2", "ff"))]),
    "sd": ("v_prediction", UNET_GROUPS),
    "sdxl": ("epsilon", UNET_GROUPS),
    "sd3": ("flow_prediction", [("transformer_blocks", 2, ("attn", "ff", "ff_context"))]),
    "flux": ("flow_prediction", [("transformer_blocks", 1, ("attn", "ff", "ff_context")),
                                 ("single_transformer_blocks", 2, ("attn", "proj_mlp", "proj_out"))]),
}  # fmt: skip
FAMILIES = list(EXPECTED)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny pipeline, saved once per module."""
    root = tmp_path_factory.mktemp("pipelines")
    paths = {}
    for family in FAMILIES:
        paths[family] = root / family
        build_pipeline(family, root).save_pretrained(paths[family])
    return paths


@pytest.fixture(scope="module")
def models(saved):
    """Each family loaded back through the registry from its directory, offline."""
    torch.set_num_threads(1)
    return {f: load_model(f"diffusers:{p}", **({"resolution": 16} if f == "flux" else {})) for f, p in saved.items()}


def conditions(family: str, n: int = 2):
    return [3, 7][:n] if family == "dit" else ["a cat", "a dog"][:n] if family == "sd" else embeddings(family, n)


def reference_forward(model, family: str, x: torch.Tensor, t: float, cond) -> torch.Tensor:
    """The conditional network output, written out by hand from diffusers' pipelines (independent of the adapter)."""
    net, n = model.network, len(x)
    ts = torch.full((n,), float(t))
    if family == "dit":
        labels = torch.as_tensor(cond) if not isinstance(cond, torch.Tensor) else cond
        return net(x, timestep=ts, class_labels=labels).sample[:, :4]
    if family == "pixart":
        added = {"resolution": None, "aspect_ratio": None}
        mask = cond.get("prompt_attention_mask", torch.ones(cond["prompt_embeds"].shape[:2]))
        return net(x, cond["prompt_embeds"], timestep=ts, encoder_attention_mask=mask, added_cond_kwargs=added).sample[
            :, :4
        ]
    if family == "sd":
        return net(x, ts, encoder_hidden_states=cond["prompt_embeds"]).sample
    if family == "sdxl":
        added = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * n)}
        return net(x, ts, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added).sample
    sigma = t / 1000
    if family == "sd3":  # static shift 3, model time σ·1000
        sigma = 3 * sigma / (1 + 2 * sigma)
        return net(
            hidden_states=x,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            timestep=torch.full((n,), sigma * 1000),
        ).sample
    raise AssertionError(family)


def _pipeline(path: Path):
    """The saved pipeline itself (text components that are not there load as None)."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(path, **dm._absent_components(path / "model_index.json"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _negatives(cond: dict, n: int) -> dict:
    return {k: cond[f"negative_{k}"].expand(n, *cond[k].shape[1:]) for k in cond if f"negative_{k}" in cond}


@pytest.mark.parametrize("family", FAMILIES)
def test_info_describes_the_pipeline(models, family):
    info = models[family].info
    prediction_type, groups = EXPECTED[family]
    assert info.family == family
    assert info.prediction_type == prediction_type
    assert [(g.path, g.count, g.components) for g in info.block_groups] == groups
    assert info.sample_shape == (4, 8, 8)  # 16 px through a VAE of scale 2 (Flux: unpacked layout)
    assert info.guidance_default == dm.GUIDANCE_DEFAULTS[family]
    assert info.conditioning == ("class" if family == "dit" else "prompt")
    assert info.num_train_timesteps == 1000
    for key in ("hidden_size", "num_heads", "patch_size", "tokens_per_sample", "vae_scale_factor"):
        assert key in info.extra
    for path, count, components in groups:  # every named component exists on the network
        module = models[family].network.get_submodule(path)
        blocks = list(module) if isinstance(module, torch.nn.ModuleList) else [module]
        assert len(blocks) == count
        assert any(getattr(b, components[-1], None) is not None for b in blocks)


def test_family_specific_info(models):
    dit, sd3, flux, sd = models["dit"].info, models["sd3"].info, models["flux"].info, models["sd"].info
    assert dit.num_classes == 10 and dit.extra["hidden_size"] == 16 and dit.extra["tokens_per_sample"] == 16
    assert sd3.extra["absent_components"] == {"transformer_blocks.1": ("ff_context",)}  # SD3's last block
    assert flux.extra["tokens_per_sample"] == 16 and flux.extra["patch_size"] == 2
    mu = 0.5 + (1.15 - 0.5) * (16 - 256) / (4096 - 256)  # FluxPipeline's calculate_shift for 16 tokens
    assert models["flux"].noise_schedule.shift == pytest.approx(math.exp(mu))
    assert models["sd3"].noise_schedule.shift == 3.0
    assert sd.extra["deepcache_unit"]["cached_output_of"] == "up_blocks.0"
    assert sd.extra["deepcache_unit"]["shallow"] == ["conv_in", "down_blocks.0", "up_blocks.1", "conv_out"]
    assert sd.extra["tokens_per_sample"] == (64, 16)


def test_vp_schedule_is_the_schedulers_alphas_cumprod(models):
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.equal(torch.from_numpy(models["sd"].noise_schedule.alphas_cumprod).float(), sched.alphas_cumprod)


@pytest.mark.parametrize("family", ["dit", "pixart", "sd", "sdxl", "sd3"])
def test_guidance_one_is_cond_and_cfg_matches_two_passes(models, family):
    model = models[family]
    x, t, g = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), 500.0, 3.0
    cond = conditions(family)
    if family == "sd":  # the reference uses the pipeline's own encoder, called directly
        pe, ne = _pipeline(Path(model.info.name.removeprefix("diffusers:"))).encode_prompt(cond, "cpu", 1, True)
        ref_cond, ref_uncond = {"prompt_embeds": pe}, {"prompt_embeds": ne}
    elif family == "dit":
        ref_cond, ref_uncond = torch.tensor(cond), torch.tensor([10, 10])
    else:
        ref_cond = {k: v for k, v in cond.items() if not k.startswith("negative_")}
        ref_uncond = _negatives(cond, 2)
    with torch.no_grad():
        c = reference_forward(model, family, x, t, ref_cond)
        u = reference_forward(model, family, x, t, ref_uncond)
        out_1 = model.denoiser(cond, guidance=1.0)(x, t, 0)
        out_g = model.denoiser(cond, guidance=g)(x, t, 0)
    assert out_1.shape == x.shape
    torch.testing.assert_close(out_1, c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_g, u + g * (c - u), rtol=1e-4, atol=1e-5)
    assert (out_g - out_1).abs().max() > 1e-3  # guidance did something


def test_cfg_is_one_batched_forward_and_skipped_at_guidance_one(models):
    model, batches = models["pixart"], []
    handle = model.network.register_forward_pre_hook(lambda m, args: batches.append(len(args[0])))
    try:
        x = torch.randn(3, 4, 8, 8)
        model.denoiser(embeddings("pixart", 3), guidance=4.5)(x, 10.0, 0)
        model.denoiser(embeddings("pixart", 3), guidance=1.0)(x, 10.0, 0)
    finally:
        handle.remove()
    assert batches == [6, 3]


def _pipeline_latents(family: str, path: Path, x: torch.Tensor, cond: dict, sigmas: list[float]) -> torch.Tensor:
    """Run the family's own diffusers pipeline (Euler on flow matching) from the same noise and embeddings."""
    pipe = _pipeline(path)
    cond = {k: v.expand(len(x), *v.shape[1:]) for k, v in cond.items()}  # the pipeline wants equal batch sizes
    kwargs = dict(num_inference_steps=len(sigmas), sigmas=sigmas, height=16, width=16, output_type="latent")
    if family == "flux":
        packed = pipe._pack_latents(x, len(x), 4, 8, 8)
        out = pipe(latents=packed, guidance_scale=3.5, **cond, **kwargs).images
        return pipe._unpack_latents(out, 16, 16, pipe.vae_scale_factor)
    return pipe(latents=x, guidance_scale=7.0, **cond, **kwargs).images


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_models_match_their_pipelines(models, saved, family):
    """Timestep units, shift, packing and CFG order against diffusers' own loop: Euler on rectified flow is the
    first-order (DDIM) step of the unified sampler."""
    model = models[family]
    cond = embeddings(family, 2)
    x = initial_noise([0, 1], model.info.sample_shape)
    sigmas = [0.9, 0.5]
    with torch.no_grad():
        ours = sample(
            model.denoiser(cond), x, ddim_plan([s * 1000 for s in sigmas]), model.noise_schedule, "flow_prediction"
        )
        theirs = _pipeline_latents(family, saved[family], x, cond, sigmas)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_flux_guidance_is_an_input_not_a_cfg_pair(models):
    model, batches = models["flux"], []
    handle = model.network.register_forward_pre_hook(
        lambda m, args, kw: batches.append(len(kw["hidden_states"])), with_kwargs=True
    )
    x, cond = torch.randn(2, 4, 8, 8), embeddings("flux", 2)
    try:
        a = model.denoiser(cond, guidance=1.0)(x, 300.0, 0)
        b = model.denoiser(cond, guidance=3.5)(x, 300.0, 0)
    finally:
        handle.remove()
    assert batches == [2, 2]
    assert a.shape == x.shape and (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_default_plan_samples_and_decodes(models, family):
    model = models[family]
    x = initial_noise([0, 1], model.info.sample_shape)
    with torch.no_grad():
        out = sample(
            model.denoiser(conditions(family)),
            x,
            model.default_plan(4),
            model.noise_schedule,
            model.info.prediction_type,
        )
        images = model.decode(out)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1.0


def test_decode_uses_the_vae_scaling_and_shift(models):
    model = models["flux"]  # scaling 0.5, shift 0.1
    latents = torch.randn(1, 4, 8, 8)
    vae = diffusers.AutoencoderKL.from_pretrained(model.info.name.removeprefix("diffusers:") + "/vae")
    with torch.no_grad():
        expected = vae.decode(latents / 0.5 + 0.1).sample.clamp(-1, 1)
        torch.testing.assert_close(model.decode(latents), expected)


def test_bad_conditions_are_reported(models):
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds"):
        models["sd3"].denoiser({"prompt_embeds": torch.zeros(1, 5, 16), "pooled_prompt_embeds": torch.zeros(1, 8)})
    with pytest.raises(ValueError, match="no text encoder"):
        models["pixart"].denoiser(["a cat"])
    with pytest.raises(ValueError, match="batch of 3"):
        models["dit"].denoiser([1, 2])(torch.randn(3, 4, 8, 8), 10.0, 0)


def test_missing_path_names_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "no-such-pipeline"
    with pytest.raises(ModelNotAvailableError) as err:
        load_model(f"diffusers:{missing}")
    assert str(missing) in str(err.value) and "model_index.json" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match=r"has no model_index\.json"):
        dm.load_diffusers_model(str(tmp_path / "empty"))


def test_uncached_hub_id_names_the_cache_and_the_fix(tmp_path):
    cache = tmp_path / "hub"
    with pytest.raises(ModelNotAvailableError) as err:
        dm.load_diffusers_model("someorg/tiny-pipeline", cache_dir=cache)
    message = str(err.value)
    assert str(cache) in message and "someorg/tiny-pipeline" in message
    assert "huggingface-cli download someorg/tiny-pipeline" in message and "HF_HOME" in message


def _fake_cache(cache: Path, repo_id: str, source: Path | None, files: dict[str, str] | None = None) -> Path:
    """A hub-cache layout (refs/main -> snapshots/<rev>/...) holding `source`'s files or the given ones."""
    rev = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / rev
    (repo / "refs").mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    entries = {p.relative_to(source): p.read_bytes() for p in source.rglob("*") if p.is_file()} if source else {}
    entries |= {Path(k): v.encode() for k, v in (files or {}).items()}
    for i, (rel, data) in enumerate(entries.items()):
        blob = repo / "blobs" / f"{i:040x}"
        blob.write_bytes(data)
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).symlink_to(blob)
    return snapshot


def test_cached_hub_id_loads_and_is_listed(tmp_path, saved, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = _fake_cache(cache, "tiny/dit", saved["dit"])
    _fake_cache(cache, "tiny/text-model", None, {"config.json": "{}"})  # not a diffusers pipeline
    model = dm.load_diffusers_model("tiny/dit", cache_dir=cache)
    assert model.info.name == "diffusers:tiny/dit" and model.info.block_groups[0].count == 2
    assert dm.cached_pipelines(cache) == [("tiny/dit", str(snapshot))]
    assert dm.cached_pipelines(tmp_path / "absent") == []
    import huggingface_hub.constants

    from schedsearch.runtime.models import available_models

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    row = {"name": "diffusers:tiny/dit", "where": str(snapshot), "family": "dit", "status": "local"}
    assert row in available_models()


def test_unsupported_denoiser_is_named(tmp_path):
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=2,
        layers_per_block=1,
    )
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(ValueError, match="'UNet2DModel' is not supported") as err:
        load_model(f"diffusers:{tmp_path / 'ddpm'}")
    assert "FluxTransformer2DModel" in str(err.value) and "DiTTransformer2DModel" in str(err.value)


def test_cache_search_runs_on_a_unet(models, tmp_path):
    """ECAD's cache search on a Stable Diffusion UNet, end to end (it crashed seeding block subsets of dotted
    group paths, and the crash was shown as bad input)."""
    from schedsearch.search.base import Budget
    from schedsearch.study import run_search

    result = run_search(model=models["sd"], space="cache", strategy="ecad", objectives=["psnr", "macs"],
                        study="unet", store=tmp_path / "r.db", budget=Budget(evaluations=3), samples=2,
                        prompts=["a cat", "a dog"], cache_dir=tmp_path / "cache", batch_size=2,
                        space_options={"num_steps": 4}, strategy_options={"population": 4}, progress=False,
                        validate=False)
    assert result.evaluations >= 3 and result.failed == 0


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_cachequant_features_are_the_image_stream_of_dual_stream_blocks(models, family):
    """CacheQuant's feature of a Flux / SD3 block range is the image-token residual: diffusers' block registry
    says which output that is (Flux returns (text, image); SD3's last block (None, image))."""
    from schedsearch.calibration.unit_features import unit_feature_distances, unit_features

    model = models[family]
    group = model.info.block_groups[0]
    plan = model.default_plan(3)
    seeds = [0, 1]
    image_tokens = model.info.extra["tokens_per_sample"]
    features = unit_features(model, plan, (group.path, 0, group.count), conditions(family), seeds)
    assert all(f is not None and f.shape[1] == image_tokens for f in features)
    table = unit_feature_distances(model, plan, (group.path, 0, group.count), conditions(family), seeds)
    assert table.shape == (3, 3) and np.isfinite(table).all() and np.allclose(table, table.T)
    assert (np.diag(table) == 0).all() and (table[~np.eye(3, dtype=bool)] > 0).all()


def test_models_lists_saved_pipelines_under_a_directory_with_their_family(saved, tmp_path, capsys):
    """`schedsearch models --dir`: every saved pipeline with the family it runs as (read from model_index.json, no
    weights loaded); an unsupported denoiser is named, not hidden."""
    from schedsearch.cli import main
    from schedsearch.runtime.models import available_models

    root = next(iter(saved.values())).parent
    for name, pipeline, denoiser, scheduler in (
        ("mochi", "MochiPipeline", "MochiTransformer3DModel", "FlowMatchEulerDiscreteScheduler"),
        ("cog", "CogVideoXPipeline", "CogVideoXTransformer3DModel", "CogVideoXDDIMScheduler"),
        ("ltx", "LTXPipeline", "LTXVideoTransformer3DModel", "FlowMatchEulerDiscreteScheduler"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(
            f'{{"_class_name": "{pipeline}", "transformer": ["diffusers", "{denoiser}"], '
            f'"scheduler": ["diffusers", "{scheduler}"]}}')
    rows = {row["where"]: row for row in available_models(str(root))}
    for family, path in saved.items():
        assert rows[str(path)]["family"] == family and rows[str(path)]["status"] == "local"
        assert rows[str(path)]["name"] == f"diffusers:{path}"
    listed = {row["where"]: row for row in available_models(str(tmp_path))}
    unsupported = listed[str(tmp_path / "mochi")]
    assert unsupported["family"] == "unsupported (MochiTransformer3DModel)"
    assert unsupported["status"] == "not supported"
    assert listed[str(tmp_path / "ltx")]["family"] == "ltx"
    assert listed[str(tmp_path / "cog")]["family"] == "cogvideox"
    assert main(["models", "--dir", str(root)]) == 0
    assert main(["models", "--dir", str(tmp_path / "none")]) == 2
    assert "--dir" in capsys.readouterr().err


def stock_call(family: str, pipe, x: torch.Tensor, cond, steps: int) -> torch.Tensor:
    """The unmodified pipeline from the same noise and conditions, latent output (benchmarks/pipelines.py too)."""
    common = {"num_inference_steps": steps, "output_type": "latent", "height": 16, "width": 16}
    if family == "sd":
        return pipe(prompt=list(cond), latents=x, guidance_scale=7.5, **common).images
    full = {k: v.expand(len(x), *v.shape[1:]) for k, v in cond.items()}
    if family == "flux":
        packed = pipe._pack_latents(x, len(x), 4, 8, 8)
        out = pipe(latents=packed, guidance_scale=3.5, **full, **common).images
        return pipe._unpack_latents(out, 16, 16, pipe.vae_scale_factor)
    guidance = {"pixart": 4.5, "sdxl": 5.0, "sd3": 7.0}[family]
    extra = {}
    if family == "pixart":  # the adapter attends to every negative token unless given a mask; the pipeline needs one
        extra = {"use_resolution_binning": False, "negative_prompt": None,
                 "negative_prompt_attention_mask": torch.ones(full["negative_prompt_embeds"].shape[:2])}
    return pipe(latents=x, guidance_scale=guidance, **full, **extra, **common).images


@pytest.mark.parametrize("family", ["pixart", "sd", "sdxl", "sd3", "flux"])
def test_default_plan_is_the_pipelines_own_sampling(models, saved, family):
    """With no schedule, a pipeline samples as its own `pipe(...)` call does with its default scheduler and settings
    (PixArt: DPM-Solver++ 2M; SD: DDIM with steps_offset; SDXL: Euler, its σ_max start included; SD3: FlowMatch
    Euler at shift 3; Flux: the pipeline's linspace sigmas with the dynamic shift), in float32."""
    model = models[family]
    x = initial_noise([0, 1], model.info.sample_shape)
    plan = model.default_plan(4)
    assert plan.num_steps == 4
    with torch.no_grad():
        ours = sample(model.denoiser(conditions(family)), x, plan, model.noise_schedule, model.info.prediction_type)
        theirs = stock_call(family, _pipeline(saved[family]), x, conditions(family), 4)
    # Euler keeps its state in x/α (up to σ_max ≈ 14.6 here) with float32 sigmas: rounding alone reaches ~1e-4
    tol = 2e-4 if family == "sdxl" else 1e-5
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


def test_schedule_pipeline_writes_the_pipelines_scheduler(saved, tmp_path, capsys):
    from schedsearch.cli import main
    from schedsearch.spaces.schedule import load_schedule

    out = tmp_path / "pipe.json"
    assert main(["schedule", "pipeline", "--model", f"diffusers:{saved['sd3']}", "--steps", "5", "--out",
                 str(out)]) == 0
    schedule = load_schedule(out)
    assert schedule.meta["baseline"] == "FlowMatchEulerDiscreteScheduler" and schedule.solver.timesteps[0] == 1000.0
    assert main(["schedule", "pipeline", "--model", "builtin:mnist-dit", "--out", str(tmp_path / "x.json")]) == 2
    assert "has no pipeline scheduler" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_unit_cache_carries_both_streams_of_mm_dit_blocks(models, family):
    """A unit over every double-stream block, refreshed at step 0 only: at step 1 what leaves the unit is what
    enters it plus the step-0 residual, for the image stream and (where the last block returns it) the text stream.
    Before, unit caching refused MM-DiT blocks, so CacheQuant's space and DeepCache-style baselines failed there."""
    from schedsearch.runtime.cache_hooks import CacheRuntime
    from schedsearch.spaces.cache_plan import UnitCachePlan

    model = models[family]
    blocks = model.network.transformer_blocks
    n = len(blocks)
    seen: dict[str, list] = {"in": [], "out": []}

    def grab_in(module, args, kwargs):
        seen["in"].append((kwargs["hidden_states"].clone(), kwargs["encoder_hidden_states"].clone()))

    def grab_out(module, args, kwargs, output):
        encoder, hidden = output  # JointTransformerBlock / FluxTransformerBlock: (encoder_hidden_states, hidden)
        seen["out"].append((hidden.clone(), None if encoder is None else encoder.clone()))

    handles = [blocks[0].register_forward_pre_hook(grab_in, with_kwargs=True),
               blocks[n - 1].register_forward_hook(grab_out, with_kwargs=True)]
    plan = UnitCachePlan("transformer_blocks", 0, n, refresh_steps=(0,), num_steps=2)
    x = initial_noise([0, 1], model.info.sample_shape)
    try:
        with CacheRuntime(model.network, model.info, plan) as runtime, torch.no_grad():
            sample(runtime.wrap(model.denoiser(embeddings(family, 2))), x, dm_plan(), model.noise_schedule,
                   model.info.prediction_type)
    finally:
        for h in handles:
            h.remove()
    (h0, e0), (h1, e1) = seen["in"]
    (o0, oe0), (o1, oe1) = seen["out"]
    torch.testing.assert_close(o1, h1 + (o0 - h0))
    if oe0 is not None:  # Flux's double blocks return the text stream; SD3's last (context-pre-only) block does not
        torch.testing.assert_close(oe1, e1 + (oe0 - e0))
    assert (o1 - o0).abs().max() > 0  # the step-1 input differs, so this is not a replay of step 0


def dm_plan():
    from schedsearch.spaces.baselines import dpm_solver_plan

    return dpm_solver_plan([900.0, 500.0], 2)
