"""Sana (linear-attention DiT, DC-AE latents, flow matching) on a tiny random pipeline saved and loaded back: the
layout, the pipeline's own flow DPM-Solver++ plan equal to `pipe(...)`, timestep_scale, and a cached schedule
applied inside the stock pipeline equal to our sampler."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from schedsearch.runtime.apply import apply_schedule  # noqa: E402
from schedsearch.runtime.models import initial_noise, load_model, model_layout  # noqa: E402
from schedsearch.runtime.sampler import sample  # noqa: E402
from schedsearch.spaces import baselines  # noqa: E402
from schedsearch.spaces.schedule import Schedule  # noqa: E402

TEXT_DIM, TEXT_LEN, PIXELS = 8, 5, 32


def build_sana(timestep_scale: float = 1.0):
    torch.manual_seed(0)
    transformer = diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=TEXT_DIM,
        sample_size=16, timestep_scale=timestep_scale,
    )
    vae = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    scheduler = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0)
    return diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                  scheduler=scheduler)


@pytest.fixture(scope="module", params=[1.0, 1000.0], ids=["t-scale-1", "t-scale-1000"])
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("sana") / "pipe"
    build_sana(request.param).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(saved):
    torch.set_num_threads(1)
    return load_model(f"diffusers:{saved}", resolution=PIXELS)


def embeddings(n: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"prompt_embeds": torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g),
            "prompt_attention_mask": torch.tensor([[1, 1, 1, 0, 0]] * n),
            "negative_prompt_embeds": torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)}


def _pipe(saved):
    pipe = diffusers.SanaPipeline.from_pretrained(saved, tokenizer=None, text_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock(saved, x, cond, steps):
    pipe = _pipe(saved)
    n = len(x)
    return pipe(prompt_embeds=cond["prompt_embeds"], prompt_attention_mask=cond["prompt_attention_mask"],
                negative_prompt_embeds=cond["negative_prompt_embeds"].expand(n, -1, -1),
                negative_prompt_attention_mask=torch.ones(n, TEXT_LEN), negative_prompt=None, latents=x,
                num_inference_steps=steps, guidance_scale=4.5, height=PIXELS, width=PIXELS,
                use_resolution_binning=False, output_type="latent"), pipe


def test_info(model):
    info = model.info
    assert (info.family, info.prediction_type, info.conditioning) == ("sana", "flow_prediction", "prompt")
    assert info.sample_shape == (4, 16, 16)  # DC-AE: 2x here (32x in the real model)
    assert info.block_groups[0].components == ("attn1", "attn2", "ff")


def test_default_plan_is_the_pipelines_own_call(model, saved):
    x = initial_noise([0, 1], model.info.sample_shape)
    cond = embeddings(2)
    with torch.no_grad():
        ours = sample(model.denoiser(cond), x, model.default_plan(4), model.noise_schedule, "flow_prediction")
        theirs = _stock(saved, x, cond, 4)[0].images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_cached_schedule_in_the_pipeline_equals_our_sampler(model, saved):
    plan = model.default_plan(4)
    schedule = Schedule(model.info.name, plan, baselines.fora_cache_plan(model_layout(model.info), 4, 2))
    x = initial_noise([0, 1], model.info.sample_shape)
    cond = embeddings(2)
    pipe = _pipe(saved)
    with apply_schedule(pipe, schedule, resolution=PIXELS), torch.no_grad():
        theirs = pipe(prompt_embeds=cond["prompt_embeds"], prompt_attention_mask=cond["prompt_attention_mask"],
                      negative_prompt_embeds=cond["negative_prompt_embeds"].expand(2, -1, -1),
                      negative_prompt_attention_mask=torch.ones(2, TEXT_LEN), negative_prompt=None, latents=x,
                      num_inference_steps=4, guidance_scale=4.5, height=PIXELS, width=PIXELS,
                      use_resolution_binning=False, output_type="latent").images
    with apply_schedule(model, schedule) as applied:
        ours = applied.sample(cond, [0, 1], 4.5, decode=False)
    with apply_schedule(model, Schedule(model.info.name, plan)) as applied:
        uncached = applied.sample(cond, [0, 1], 4.5, decode=False)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (uncached - ours).abs().max() > 1e-4
    images = model.decode(ours)
    assert images.shape == (2, 3, PIXELS, PIXELS) and images.abs().max() <= 1.0
