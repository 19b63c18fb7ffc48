"""Wan 2.1 (a video flow-matching DiT) on a tiny random pipeline saved with `save_pretrained` and loaded back:
video latents (C, F, H, W), the pipeline's own UniPC flow scheduler, pre-encoded prompts, the VAE's per-channel
latent statistics, cache hooks on its blocks, a search, and the schedule applied inside `pipe(...)`, whose loop
calls the transformer twice per step (cache_context "cond" then "uncond")."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from family_checks import quick_cache_search
from stand_in_text import clip_stand_in

diffusers = pytest.importorskip("diffusers")

from schedsearch.runtime.models import initial_noise, load_model  # noqa: E402
from schedsearch.runtime.sampler import sample  # noqa: E402
from schedsearch.spaces.schedule import Schedule  # noqa: E402

TEXT_DIM, TEXT_LEN, FRAMES, PIXELS = 32, 6, 9, 16


def _text(tmp) -> tuple:
    """A 1-layer stand-in for the pipeline's T5 encoder that takes the 512 tokens WanPipeline.__call__ pads to."""
    return clip_stand_in(tmp, TEXT_DIM, 512)


def build_wan(tmp):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0)
    tokenizer, text_encoder = _text(tmp)
    return diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                 transformer=transformer)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    path = root / "pipe"
    build_wan(root).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(saved):
    torch.set_num_threads(1)
    return load_model(f"diffusers:{saved}", resolution=PIXELS, num_frames=FRAMES)


def embeddings(n: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"prompt_embeds": torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g),
            "negative_prompt_embeds": torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)}


def test_info_is_a_video_flow_model(model):
    info = model.info
    assert (info.family, info.prediction_type, info.conditioning) == ("wan", "flow_prediction", "prompt")
    assert info.sample_shape == (16, 3, 2, 2)  # 9 frames -> 3 latent frames, 16 px -> 2
    assert info.block_groups[0].path == "blocks" and info.block_groups[0].components == ("attn1", "attn2", "ffn")
    assert info.extra["tokens_per_sample"] == 3 and info.extra["num_frames"] == FRAMES
    assert model.noise_schedule.shift == 3.0  # the UniPC flow scheduler's flow_shift


def test_default_plan_is_the_pipelines_own_call(model, saved):
    """UniPC on flow sigmas as WanPipeline runs it, with CFG as two calls per step, equals our batched sampler."""
    x = initial_noise([0, 1], model.info.sample_shape)
    cond = embeddings(2)
    with torch.no_grad():
        ours = sample(model.denoiser(cond, guidance=5.0), x, model.default_plan(4), model.noise_schedule,
                      "flow_prediction")
        pipe = diffusers.WanPipeline.from_pretrained(saved)
        pipe.set_progress_bar_config(disable=True)
        theirs = pipe(prompt_embeds=cond["prompt_embeds"],
                      negative_prompt_embeds=cond["negative_prompt_embeds"].expand(2, -1, -1), latents=x,
                      num_inference_steps=4, guidance_scale=5.0, height=PIXELS, width=PIXELS, num_frames=FRAMES,
                      output_type="latent").frames
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_decode_undoes_the_latent_statistics(model, saved):
    """Decoding is WanPipeline's own: latents · std + mean per channel, then the VAE (compared with output "pt")."""
    x = initial_noise([0], model.info.sample_shape)
    video = model.decode(x)
    assert video.shape == (1, 3, FRAMES, PIXELS, PIXELS) and video.abs().max() <= 1.0
    pipe = diffusers.WanPipeline.from_pretrained(saved)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = vae.decode(x / (1.0 / std) + mean).sample.clamp(-1, 1)
    torch.testing.assert_close(video, expected)


def test_prompts_go_through_the_pipelines_encoder(model):
    x = initial_noise([0, 1], model.info.sample_shape)
    with torch.no_grad():
        out = sample(model.denoiser(["a cat", "a dog"], guidance=5.0), x, model.default_plan(2),
                     model.noise_schedule, "flow_prediction")
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_cached_schedule_in_the_pipeline_equals_our_sampler(model, saved):
    """A FORA schedule on the pipeline's own UniPC plan (rounded network times included), applied to the stock
    WanPipeline (a cache per call: "cond", "uncond"), equals our sampler's batched CFG with one cache."""
    from schedsearch.runtime.apply import apply_schedule
    from schedsearch.runtime.models import model_layout
    from schedsearch.spaces import baselines
    from schedsearch.spaces.schedule import Schedule

    plan = model.default_plan(4)
    assert plan.network_timesteps is not None  # UniPC flow calls the network at int(σ·T)
    schedule = Schedule(model.info.name, plan, baselines.fora_cache_plan(model_layout(model.info), 4, 2))
    x = initial_noise([0, 1], model.info.sample_shape)
    cond = embeddings(2)
    pipe = diffusers.WanPipeline.from_pretrained(saved)
    pipe.set_progress_bar_config(disable=True)
    with apply_schedule(pipe, schedule, resolution=PIXELS, num_frames=FRAMES), torch.no_grad():
        theirs = pipe(prompt_embeds=cond["prompt_embeds"],
                      negative_prompt_embeds=cond["negative_prompt_embeds"].expand(2, -1, -1), latents=x,
                      num_inference_steps=4, guidance_scale=5.0, height=PIXELS, width=PIXELS, num_frames=FRAMES,
                      output_type="latent").frames
    with apply_schedule(model, schedule) as applied:
        ours = applied.sample(cond, [0, 1], 5.0, decode=False)
    with apply_schedule(model, Schedule(model.info.name, plan)) as applied:
        uncached = applied.sample(cond, [0, 1], 5.0, decode=False)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (uncached - ours).abs().max() > 1e-4  # the cache plan did something


def test_cache_search_runs_on_wan(model, tmp_path):
    """ECAD's cache search (block skipping on) with PSNR on whole videos and MACs counted on the real forward."""
    quick_cache_search(model, tmp_path, "wan")


def test_calibration_sets_of_two_sizes_never_share_a_teacher(model, saved):
    """The same pipeline at two frame counts (or resolutions) has two calibration hashes: a teacher of one size is
    never reused for the other."""
    from schedsearch.calibration.calibration_set import CalibrationSpec, default_spec

    longer = load_model(f"diffusers:{saved}", resolution=PIXELS, num_frames=FRAMES + 4)
    a = default_spec(model.info, samples=2, prompts=["a cat"])
    b = default_spec(longer.info, samples=2, prompts=["a cat"])
    assert a.sample_shape == (16, 3, 2, 2) and b.sample_shape == (16, 4, 2, 2) and a.hash != b.hash
    assert CalibrationSpec.from_dict(b.to_dict()).hash == b.hash


def test_teachers_of_the_older_prompt_encoding_are_not_reused(model):
    """Wan prompts are encoded at the call's 512 tokens (what pipe(prompt=...) feeds the transformer); a teacher
    cached from the older 226-token encoding had the same spec otherwise, so the encoding names the set."""
    import dataclasses

    from schedsearch.calibration.calibration_set import CalibrationSpec, default_spec

    spec = default_spec(model.info, samples=2, prompts=["a cat"])
    assert spec.text_encoding == "max_sequence_length=512"
    assert CalibrationSpec.from_dict(spec.to_dict()) == spec
    assert dataclasses.replace(spec, text_encoding=None).hash != spec.hash


def test_cli_takes_the_video_size(saved, tmp_path, capsys):
    """--resolution and --frames reach the pipeline; a video grid is one row per sample, its frames in a row; a
    study at another size is refused on --resume by name; the builtin models refuse a size."""
    from PIL import Image

    from schedsearch.cli import main

    model = f"diffusers:{saved}"
    size = ["--resolution", str(PIXELS), "--frames", str(FRAMES)]
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", model, *size, "--prompts", "a cat|a dog", "--n-per-class", "1", "--steps",
                 "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (FRAMES * (PIXELS + 2) + 2, 2 * (PIXELS + 2) + 2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    common = ["search", "--model", model, "--space", "cache", "--strategy", "ecad", "--objectives", "psnr,macs",
              "--budget", "2", "--samples", "2", "--prompts", str(prompts), "--study", "v", "--store",
              str(tmp_path / "r.db"), "--cache-dir", str(tmp_path / "cache"), "--no-validate", "--quiet"]
    assert main([*common, *size]) == 0
    capsys.readouterr()
    assert main([*common, "--resolution", str(PIXELS), "--frames", str(FRAMES + 4), "--resume"]) == 2
    assert "--frames" in capsys.readouterr().err
    assert main(["info", "--model", "builtin:mnist-flow", "--frames", "9"]) == 2


def test_fid_scores_videos_frame_by_frame(model, tmp_path):
    """FID on a video model: the teacher's videos and a schedule's are both scored as frames (EfficientNet-Lite0
    features, reference = the teacher), so the distance of the teacher's own schedule to itself is 0."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from schedsearch.calibration.calibration_set import CalibrationSet, default_spec
    from schedsearch.evaluation.local import LocalEvaluator

    spec = default_spec(model.info, samples=2, prompts=["a cat", "a dog"], teacher_steps=3)
    calibration = CalibrationSet.open(spec, tmp_path).build(model, progress=False)
    evaluator = LocalEvaluator(model, calibration, ["fid", "psnr"], batch_size=2)
    with pytest.warns(UserWarning, match="singular"):
        teacher = evaluator.evaluate_one(spec.teacher).metrics
        other = evaluator.evaluate_one(Schedule(model.info.name, model.default_plan(2))).metrics
    assert teacher["fid"] < 1e-3 and other["fid"] > 10 * max(teacher["fid"], 1e-4)  # sqrtm of a singular covariance
    assert other["psnr"] < teacher["psnr"]


def test_the_reports_sample_figure_draws_each_video_as_a_frame_strip(model):
    """The report's schedule-vs-teacher figure on videos: one row per video, its frames left to right (a 2-video,
    9-frame call gives a grid 2 frames high and 9 wide in each panel)."""
    from schedsearch.results.plots import sample_grid_figure

    plan = model.default_plan(3)
    schedule = Schedule(model.info.name, plan)
    teacher = Schedule(model.info.name, model.default_plan(4))
    fig = sample_grid_figure(model, schedule, teacher, ["a cat", "a dog"], [0, 1], guidance=5.0)
    for panel in fig.axes:
        height, width, _ = panel.get_images()[0].get_array().shape
        assert (height, width) == (2 + 2 * (PIXELS + 2), 2 + FRAMES * (PIXELS + 2))  # make_grid's 2-pixel padding
