"""LTX-Video (a video flow-matching DiT on packed latent tokens) on a tiny random pipeline saved with
`save_pretrained` and loaded back: the layout, the pipeline's own sigmas with dynamic shifting at the video's token
count, the latents packed around the network call, the VAE's latent statistics, the default plan equal to
`pipe(...)`, a cached schedule applied inside the stock pipeline equal to our sampler, and a search."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from family_checks import quick_cache_search
from stand_in_text import clip_stand_in

diffusers = pytest.importorskip("diffusers")

from schedsearch.runtime.apply import apply_schedule  # noqa: E402
from schedsearch.runtime.models import initial_noise, load_model, model_layout  # noqa: E402
from schedsearch.runtime.sampler import sample  # noqa: E402
from schedsearch.spaces import baselines  # noqa: E402
from schedsearch.spaces.schedule import Schedule  # noqa: E402

TEXT_DIM, TEXT_LEN, FRAMES, PIXELS, GUIDANCE = 16, 6, 9, 32, 3.0  # LTXPipeline wants multiples of 32


def _text(tmp) -> tuple:
    """A 1-layer stand-in for the pipeline's T5 encoder that takes LTX's 128 tokens."""
    return clip_stand_in(tmp, TEXT_DIM, 128)


def build_ltx(tmp):
    torch.manual_seed(0)
    transformer = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=TEXT_DIM,
    )
    vae = diffusers.AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )
    with torch.no_grad():  # non-trivial latent statistics, so decoding checks that they are undone
        vae.latents_mean.copy_(torch.linspace(-0.5, 0.5, 8))
        vae.latents_std.copy_(torch.linspace(0.5, 1.5, 8))
    # LTX-Video's own scheduler settings: dynamic shifting from the video's token count
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=1024,
                                                          max_image_seq_len=4096, base_shift=0.95, max_shift=2.05)
    tokenizer, text_encoder = _text(tmp)
    return diffusers.LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                 transformer=transformer)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltx")
    build_ltx(root).save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def model(saved):
    torch.set_num_threads(1)
    return load_model(f"diffusers:{saved}", resolution=PIXELS, num_frames=FRAMES)


def embeddings(n: int) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]] * n)
    return {"prompt_embeds": torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g), "prompt_attention_mask": mask,
            "negative_prompt_embeds": torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g),
            "negative_prompt_attention_mask": mask}


def _pipe(saved):
    pipe = diffusers.LTXPipeline.from_pretrained(saved)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, x, cond, steps, **kwargs):
    """The stock call on our (unpacked) noise; LTXPipeline takes and returns packed tokens."""
    packed = diffusers.LTXPipeline._pack_latents(x)
    out = pipe(latents=packed, num_inference_steps=steps, guidance_scale=GUIDANCE, height=PIXELS, width=PIXELS,
               num_frames=FRAMES, output_type="latent", **cond, **kwargs).frames
    _, _, f, h, w = x.shape
    return diffusers.LTXPipeline._unpack_latents(out, f, h, w)


def test_info_is_a_video_flow_model(model):
    info = model.info
    assert (info.family, info.prediction_type, info.conditioning) == ("ltx", "flow_prediction", "prompt")
    assert info.sample_shape == (8, 3, 8, 8)  # 9 frames -> 3 latent frames, 32 px -> 8 (compression 4 and 4)
    assert info.block_groups[0].path == "transformer_blocks"
    assert info.block_groups[0].components == ("attn1", "attn2", "ff")
    # μ of LTXPipeline at 3·8·8 = 192 tokens: linear from (1024, 0.95) to (4096, 2.05), as calculate_shift
    mu = 0.95 + (2.05 - 0.95) * (192 - 1024) / (4096 - 1024)
    assert info.extra["flow_shift"] == pytest.approx(torch.tensor(mu).exp().item())


def test_default_plan_is_the_pipelines_own_call(model, saved):
    """linspace(1, 1/N, N) sigmas shifted by μ of the video's tokens, CFG as one batch of [uncond, cond]."""
    x = initial_noise([0, 1], model.info.sample_shape)
    cond = embeddings(2)
    with torch.no_grad():
        ours = sample(model.denoiser(cond, GUIDANCE), x, model.default_plan(4), model.noise_schedule,
                      "flow_prediction")
        theirs = _call(_pipe(saved), x, cond, 4)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_decode_undoes_the_latent_statistics(model, saved):
    """Decoding is LTXPipeline's own (latents · std / scaling + mean per channel, then the VAE), compared with its
    "pt" output of the same latents."""
    x = initial_noise([0], model.info.sample_shape)
    video = model.decode(x)
    assert video.shape == (1, 3, FRAMES, PIXELS, PIXELS) and video.abs().max() <= 1.0
    pipe = _pipe(saved)
    with torch.no_grad():
        expected = pipe.vae.decode(diffusers.LTXPipeline._denormalize_latents(
            x, pipe.vae.latents_mean, pipe.vae.latents_std, pipe.vae.config.scaling_factor)).sample.clamp(-1, 1)
    torch.testing.assert_close(video, expected)


@pytest.mark.parametrize("kind", ["fora", "unit"])
def test_cached_schedule_in_the_pipeline_equals_our_sampler(model, saved, kind):
    plan = model.default_plan(4)
    cache = (baselines.fora_cache_plan(model_layout(model.info), 4, 2) if kind == "fora"
             else baselines.uniform_unit_plan("transformer_blocks", 0, 2, 4, 2))
    schedule = Schedule(model.info.name, plan, cache)
    x = initial_noise([0, 1], model.info.sample_shape)
    cond = embeddings(2)
    pipe = _pipe(saved)
    with apply_schedule(pipe, schedule, resolution=PIXELS, num_frames=FRAMES), torch.no_grad():
        theirs = _call(pipe, x, cond, 4)
    with apply_schedule(model, schedule) as applied:
        ours = applied.sample(cond, [0, 1], GUIDANCE, decode=False)
    with apply_schedule(model, Schedule(model.info.name, plan)) as applied:
        uncached = applied.sample(cond, [0, 1], GUIDANCE, decode=False)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (uncached - ours).abs().max() > 1e-5


def test_cache_search_runs_on_ltx(model, tmp_path):
    """ECAD's cache search (block skipping on) from prompts through the pipeline's encoder, MACs counted."""
    quick_cache_search(model, tmp_path, "ltx")
