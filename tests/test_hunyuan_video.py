"""HunyuanVideo (double- then single-stream video DiT, guidance-distilled, FlowMatch Euler) on a tiny random
pipeline saved and loaded back: the layout, the pipeline's own sigmas and embedded guidance, the default plan
equal to `pipe(...)`, and a cached schedule (per-component and a unit over the double-stream blocks) applied inside
the stock pipeline equal to our sampler."""

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

TEXT_DIM, POOLED_DIM, TEXT_LEN, FRAMES, PIXELS = 16, 8, 6, 9, 16


def build_hunyuan():
    torch.manual_seed(0)
    transformer = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, rope_axes_dim=(2, 4, 4),
    )
    vae = diffusers.AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True,
    )
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    return diffusers.HunyuanVideoPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None,
                                          tokenizer=None, text_encoder_2=None, tokenizer_2=None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("hunyuan") / "pipe"
    build_hunyuan().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(saved):
    torch.set_num_threads(1)
    return load_model(f"diffusers:{saved}", resolution=PIXELS, num_frames=FRAMES)


def embeddings(n: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"prompt_embeds": torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g),
            "prompt_attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]] * n),
            "pooled_prompt_embeds": torch.randn(n, POOLED_DIM, generator=g)}


def _pipe(saved):
    pipe = diffusers.HunyuanVideoPipeline.from_pretrained(saved, text_encoder=None, tokenizer=None,
                                                          text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, x, cond, steps):
    return pipe(latents=x, num_inference_steps=steps, guidance_scale=6.0, height=PIXELS, width=PIXELS,
                num_frames=FRAMES, output_type="latent", **cond).frames


def test_info(model):
    info = model.info
    assert (info.family, info.prediction_type, info.conditioning) == ("hunyuan_video", "flow_prediction", "prompt")
    assert info.sample_shape == (4, 3, 2, 2)
    assert [g.path for g in info.block_groups] == ["transformer_blocks", "single_transformer_blocks"]


def test_default_plan_is_the_pipelines_own_call(model, saved):
    """The pipeline's sigmas linspace(1, 0, N + 1)[:-1] at shift 7, guidance 6 embedded as 6000, no CFG pair."""
    x = initial_noise([0, 1], model.info.sample_shape)
    cond = embeddings(2)
    with torch.no_grad():
        ours = sample(model.denoiser(cond), x, model.default_plan(4), model.noise_schedule, "flow_prediction")
        theirs = _call(_pipe(saved), x, cond, 4)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["fora", "unit"])
def test_cached_schedule_in_the_pipeline_equals_our_sampler(model, saved, kind):
    plan = model.default_plan(4)
    layout = model_layout(model.info)
    cache = (baselines.fora_cache_plan(layout, 4, 2) if kind == "fora"
             else baselines.uniform_unit_plan("transformer_blocks", 0, 2, 4, 2))
    schedule = Schedule(model.info.name, plan, cache)
    x = initial_noise([0, 1], model.info.sample_shape)
    cond = embeddings(2)
    pipe = _pipe(saved)
    with apply_schedule(pipe, schedule, resolution=PIXELS, num_frames=FRAMES), torch.no_grad():
        theirs = _call(pipe, x, cond, 4)
    with apply_schedule(model, schedule) as applied:
        ours = applied.sample(cond, [0, 1], 6.0, decode=False)
    with apply_schedule(model, Schedule(model.info.name, plan)) as applied:
        uncached = applied.sample(cond, [0, 1], 6.0, decode=False)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (uncached - ours).abs().max() > 1e-5
    video = model.decode(ours)
    assert video.shape == (2, 3, FRAMES, PIXELS, PIXELS) and video.abs().max() <= 1.0
