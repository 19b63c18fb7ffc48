"""Wan 2.2 text to video: WanPipeline with two transformers (`transformer` above boundary_ratio · T, `transformer_2`
below, with guidance_scale and guidance_scale_2), on a tiny random pipeline built from config as diffusers' own
tests build it (tests/pipelines/wan/test_wan_22.py), saved with `save_pretrained` and loaded back. The two tiny
transformers have different weights and widths, so a step run by the wrong one, or a cost counted on the wrong one,
shows."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from stand_in_text import clip_stand_in

diffusers = pytest.importorskip("diffusers")

from schedsearch.runtime.models import initial_noise, load_model  # noqa: E402
from schedsearch.runtime.sampler import sample  # noqa: E402

TEXT_DIM, FRAMES, PIXELS, BOUNDARY, STEPS = 32, 9, 16, 0.875, 6
PROMPTS = ["a cat", "a dog"]


def _transformer(seed: int, ffn_dim: int):
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=ffn_dim, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )


def build_wan22(tmp):
    """diffusers' Wan 2.2 test components; transformer_2 seeded differently and wider (ffn 48 against 32)."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0)
    tokenizer, text_encoder = clip_stand_in(tmp, TEXT_DIM, 512)  # WanPipeline.__call__ pads prompts to 512 tokens
    return diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                 transformer=_transformer(0, 32), transformer_2=_transformer(1, 48),
                                 boundary_ratio=BOUNDARY)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan22")
    build_wan22(root).save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def model(saved):
    torch.set_num_threads(1)
    return load_model(f"diffusers:{saved}", resolution=PIXELS, num_frames=FRAMES)


@pytest.fixture()
def pipe(saved):
    loaded = diffusers.WanPipeline.from_pretrained(saved)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def call(pipe, x, **kwargs):
    """pipe(prompt=...) as users call it, at the test's size, with given starting latents; the final latents."""
    with torch.no_grad():
        return pipe(prompt=PROMPTS, negative_prompt="", latents=x, height=PIXELS, width=PIXELS, num_frames=FRAMES,
                    output_type="latent", **kwargs).frames


def test_info_knows_both_transformers(model):
    from schedsearch.runtime.experts import ExpertPair
    from schedsearch.spaces.baselines import step_experts

    info = model.info
    assert (info.family, info.prediction_type, info.sample_shape) == ("wan", "flow_prediction", (16, 3, 2, 2))
    assert isinstance(model.network, ExpertPair) and info.extra["denoiser_class"] == "WanTransformer3DModel"
    assert info.block_groups[0].path == "blocks" and info.block_groups[0].components == ("attn1", "attn2", "ffn")
    boundary = info.extra["expert_boundary"]
    assert boundary == {"timestep": 875.0, "ratio": BOUNDARY, "num_train_timesteps": 1000, "flow_shift": 3.0}
    plan = model.default_plan(STEPS)  # UniPC flow: the network at int(σ·T) = 999, 937, 857, 750, 600, 375
    assert step_experts(plan, boundary) == (0, 0, 1, 1, 1, 1)


def test_default_plan_is_the_pipelines_own_call(model, pipe):
    """UniPC as WanPipeline runs it, each stage's transformer with its own guidance scale, CFG as two calls per
    step: our batched sampler equals pipe(prompt=...) to 1e-5; and the second transformer and scale are used (the
    low-noise stage's scale changes the result)."""
    x = initial_noise([0, 1], model.info.sample_shape)
    theirs = call(pipe, x, num_inference_steps=STEPS, guidance_scale=5.0, guidance_scale_2=2.0)
    plan = model.default_plan(STEPS)
    with torch.no_grad():
        ours = sample(model.denoiser(PROMPTS, 5.0, guidance_2=2.0), x, plan, model.noise_schedule, "flow_prediction")
        same_scale = sample(model.denoiser(PROMPTS, 5.0), x, plan, model.noise_schedule, "flow_prediction")
    assert (ours - theirs).abs().max() < 1e-5
    assert (same_scale - ours).abs().max() > 1e-3
    default_scale = call(pipe, x, num_inference_steps=STEPS, guidance_scale=5.0)  # guidance_scale_2 = 5.0
    assert (same_scale - default_scale).abs().max() < 1e-5
