"""CogVideoX (a video DiT with joint text-video attention, v-prediction DDIM on zero terminal SNR) on tiny random
pipelines saved with `save_pretrained` and loaded back, with a real T5 tokenizer and encoder built offline: the
layout (latents (C, F, H, W) here, (F, C, H, W) at the network), the pipeline's own CogVideoXDDIMScheduler (its
first step at ᾱ = 0, pure noise), DDIM / DPM-Solver++ / UniPC built from its config, CogVideoX 1.5's padded
frames, the default plan equal to `pipe(...)`, the stochastic CogVideoXDPMScheduler refused, every space's
baselines, a search, the CLI's search, export and evaluate, and cached schedules inside the stock pipeline called
as users call it equal to our sampler. The unified sampler's steps from α = 0 are checked against their limits."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import pytest
import torch
from family_checks import cli_search_export_evaluate, every_baseline_runs, quick_cache_search
from stand_in_text import t5_stand_in

diffusers = pytest.importorskip("diffusers")

from schedsearch.errors import UserInputError  # noqa: E402
from schedsearch.runtime.apply import apply_schedule  # noqa: E402
from schedsearch.runtime.diffusers_models import loaded_model_from_pipeline  # noqa: E402
from schedsearch.runtime.models import initial_noise, load_model, model_layout  # noqa: E402
from schedsearch.runtime.sampler import sample  # noqa: E402
from schedsearch.spaces import baselines  # noqa: E402
from schedsearch.spaces.schedule import Schedule, SolverPlan, SolverStep  # noqa: E402

TEXT_DIM, TEXT_LEN, FRAMES, PIXELS, GUIDANCE, STEPS = 16, 6, 9, 32, 6.0, 4  # 9 frames -> 3 latent, 32 px -> 4
PROMPTS = ["a cat", "a dog on a mat"]
TOL = 1e-5


def build_cogvideox(rotary: bool = True, patch_size_t: int | None = None):
    """CogVideoX-5b's layout (rotary positions) or 2b's (`rotary=False`: sin-cos positions over 226 text tokens),
    1.5's with `patch_size_t`; the scheduler as CogVideoX ships it (v-prediction, zero terminal SNR, SNR shift 3,
    trailing spacing)."""
    torch.manual_seed(0)
    transformer = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=TEXT_DIM, num_layers=2, sample_width=4, sample_height=4, sample_frames=FRAMES, patch_size=2,
        patch_size_t=patch_size_t, temporal_compression_ratio=4, max_text_seq_length=226,
        use_rotary_positional_embeddings=rotary,
    )
    vae = diffusers.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )
    scheduler = diffusers.CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        set_alpha_to_one=True, snr_shift_scale=3.0, timestep_spacing="trailing",
    )
    tokenizer, text_encoder = t5_stand_in(TEXT_DIM)
    return diffusers.CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                       transformer=transformer, scheduler=scheduler)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("cogvideox") / "pipe"
    build_cogvideox().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(saved):
    torch.set_num_threads(1)
    return load_model(f"diffusers:{saved}", resolution=PIXELS, num_frames=FRAMES)


def _pipe(saved):
    pipe = diffusers.CogVideoXPipeline.from_pretrained(saved)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(n: int) -> dict:
    """Pre-encoded conditions (rotary positions take any text length): the prompts' and the negative prompts'."""
    g = torch.Generator().manual_seed(1)
    return {"prompt_embeds": torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g),
            "negative_prompt_embeds": torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g)}


def _call(pipe, x, steps=STEPS, **kwargs):
    """The stock call on our (C, F, H, W) noise, which CogVideoXPipeline takes and returns as (F, C, H, W); the
    prompt strings unless embeddings are given."""
    if "prompt_embeds" not in kwargs:
        kwargs.setdefault("prompt", PROMPTS)
    out = pipe(latents=x.permute(0, 2, 1, 3, 4), num_inference_steps=steps, guidance_scale=GUIDANCE, height=PIXELS,
               width=PIXELS, num_frames=FRAMES, **{"output_type": "latent"} | kwargs).frames
    return out.permute(0, 2, 1, 3, 4) if kwargs.get("output_type", "latent") == "latent" else out


def test_info_is_a_v_prediction_video_model_from_pure_noise(model):
    info = model.info
    assert (info.family, info.prediction_type, info.conditioning) == ("cogvideox", "v_prediction", "prompt")
    assert info.sample_shape == (4, 3, 4, 4) and info.extra["tokens_per_sample"] == 3 * 2 * 2
    assert [(g.path, g.count, g.components) for g in info.block_groups] == [("transformer_blocks", 2,
                                                                              ("attn1", "ff"))]
    assert info.guidance_default == GUIDANCE
    # the scheduler's own ᾱ (SNR-shifted, rescaled to zero terminal SNR): α = 0 exactly at t = 999, and the
    # continuation into the last interval reaches it continuously
    schedule = model.noise_schedule
    assert schedule.alpha_sigma(999) == (0.0, 1.0) and math.isinf(schedule.diffusers_sigma(999))
    ours = schedule.alphas_cumprod
    theirs = model.scheduler.alphas_cumprod.double().numpy()
    assert (ours == theirs).all() and ours[0] < 0.9999  # the shift moved ᾱ off DDPM's (0.99915 unshifted)
    a, s = schedule.alpha_sigma(998.5)
    assert 0 < a < schedule.alpha_sigma(998)[0] and math.isclose(a * a + s * s, 1.0)
    assert schedule.time_at(schedule.sigma_ratio(998.5)) == pytest.approx(998.5)
    assert schedule.time_at(schedule.sigma_ratio(400.25)) == pytest.approx(400.25)


SCHEDULERS = {
    "CogVideoXDDIMScheduler": None,  # the pipeline's own
    "DDIMScheduler": diffusers.DDIMScheduler,
    "DPMSolverMultistepScheduler": diffusers.DPMSolverMultistepScheduler,
    "UniPCMultistepScheduler": diffusers.UniPCMultistepScheduler,
    "EulerDiscreteScheduler": diffusers.EulerDiscreteScheduler,
}
# Euler's step upcasts to float32 whatever the dtype and keeps x/α, 4096x the noise at σ_max = (1 - 2^-24)^½ / 2^-12:
# 1.7e-4 in float32 and in float64 alike (measured), as test_scheduler_plan's TOL_VE_STATE allows for it
TOL_SCHEDULER = {"EulerDiscreteScheduler": 1e-3}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_default_plan_is_the_pipelines_own_call(saved, name):
    """Each scheduler as `pipe(prompt=...)` runs it (CFG as one batch, [uncond, cond]) equals our sampler's default
    plan; schedulers built from CogVideoX's config keep its zero terminal SNR (the multistep ones end at ᾱ = 2^-24,
    their own ᾱ, which the noise schedule is read from) but not its SNR shift."""
    pipe = _pipe(saved)
    if SCHEDULERS[name] is not None:
        pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)
    model = loaded_model_from_pipeline(pipe, name=f"diffusers:{saved}", resolution=PIXELS, num_frames=FRAMES)
    x = initial_noise([0, 1], model.info.sample_shape)
    with torch.no_grad():
        ours = sample(model.denoiser(PROMPTS, GUIDANCE), x, model.default_plan(STEPS), model.noise_schedule,
                      model.info.prediction_type)
        theirs = _call(pipe, x)
    tol = TOL_SCHEDULER.get(name, TOL)
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    assert (ours - x).abs().max() > 0.5  # the model moved the noise


def test_pre_encoded_conditions_equal_the_pipeline(model, saved):
    """Embeddings given directly (`prompt_embeds`, `negative_prompt_embeds`), as the pipeline takes them."""
    cond = embeddings(2)
    x = initial_noise([0, 1], model.info.sample_shape)
    with torch.no_grad():
        ours = sample(model.denoiser(cond, GUIDANCE), x, model.default_plan(STEPS), model.noise_schedule,
                      "v_prediction")
        theirs = _call(_pipe(saved), x, **cond)
    torch.testing.assert_close(ours, theirs, rtol=TOL, atol=TOL)


def test_macs_are_counted_on_the_video_and_text_tokens(model, saved):
    """MACs counted on the real forward: the feed-forward runs on text and video tokens together (6 + F·2·2), so
    one more latent frame (13 frames) scales it by exactly (6 + 16) / (6 + 12); attention grows faster."""
    from schedsearch.objectives.cost import measured_macs_table

    def table(m):
        x = initial_noise([0], m.info.sample_shape)
        denoise = m.denoiser({"prompt_embeds": embeddings(1)["prompt_embeds"]}, guidance=1.0)
        return measured_macs_table(m.network, m.info, lambda: denoise(x, 500.0, 0), batch=1)

    longer = load_model(f"diffusers:{saved}", resolution=PIXELS, num_frames=FRAMES + 4)
    assert longer.info.extra["tokens_per_sample"] == 16
    short, long = table(model), table(longer)
    ff = "transformer_blocks.0.ff"
    assert long.slots[ff] / short.slots[ff] == pytest.approx((6 + 16) / (6 + 12), rel=1e-9)
    attn = "transformer_blocks.0.attn1"
    assert long.slots[attn] / short.slots[attn] > (6 + 16) / (6 + 12)


def test_ddim_at_a_step_count_not_dividing_1000_is_refused(model):
    """diffusers' DDIM steps from t to t - 1000 // N, not to its next trailing timestep, at N = 3 (666 -> 333, then
    the model at 332): not expressible, named rather than approximated."""
    with pytest.raises(UserInputError, match="timestep_spacing") as err:
        model.pipeline_plan(3)
    assert "e.g. 4" in err.value.fix
    assert model.pipeline_plan(5).timesteps == (999.0, 799.0, 599.0, 399.0, 199.0)
    with pytest.warns(UserWarning, match=r"cannot run as a plan at 3 steps .*timestep_spacing.*DPM-Solver\+\+"):
        fallback = model.default_plan(3)  # not the pipeline's output, and said so
    assert fallback.num_steps == 3


def test_stochastic_dpm_scheduler_is_refused_before_any_work(saved):
    """CogVideoXDPMScheduler adds fresh noise at every step: refused on load, naming it and what is supported."""
    pipe = _pipe(saved)
    pipe.scheduler = diffusers.CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(UserInputError) as err:
        loaded_model_from_pipeline(pipe, resolution=PIXELS, num_frames=FRAMES)
    assert "CogVideoXDPMScheduler" in err.value.problem and "noise" in err.value.problem
    assert "CogVideoXDDIMScheduler" in err.value.fix and "DPMSolverMultistepScheduler" in err.value.fix


def test_image_to_video_is_refused_by_name(saved):
    """The image-to-video pipeline feeds the transformer image latents, and 1.5 I2V's transformer wants an `ofs`
    input CogVideoXPipeline never passes: both refused before any work, naming what."""
    pipe = _pipe(saved)
    i2v = diffusers.CogVideoXImageToVideoPipeline(**pipe.components)
    with pytest.raises(UserInputError, match="CogVideoXImageToVideoPipeline"):
        loaded_model_from_pipeline(i2v, resolution=PIXELS, num_frames=FRAMES)
    pipe.register_modules(transformer=diffusers.CogVideoXTransformer3DModel.from_config(
        pipe.transformer.config, ofs_embed_dim=4))
    with pytest.raises(UserInputError, match="ofs_embed_dim"):
        loaded_model_from_pipeline(pipe, resolution=PIXELS, num_frames=FRAMES)


def test_epsilon_prediction_at_zero_terminal_snr_is_refused(saved):
    pipe = _pipe(saved)
    pipe.scheduler = diffusers.CogVideoXDDIMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    with pytest.raises(UserInputError, match="zero terminal SNR"):
        loaded_model_from_pipeline(pipe, resolution=PIXELS, num_frames=FRAMES)


@pytest.mark.parametrize(("rotary", "patch_size_t"), [(False, None), (True, 2)], ids=["2b-sincos", "1.5-padded"])
def test_other_layouts_equal_the_pipeline(tmp_path, rotary, patch_size_t):
    """CogVideoX-2b's sin-cos positions (226 text tokens), and 1.5's temporal patches: 3 latent frames padded to 4
    in front as the pipeline pads them, dropped again before decoding; sampled and decoded as `pipe(...)` does."""
    build_cogvideox(rotary, patch_size_t).save_pretrained(tmp_path / "pipe")
    model = load_model(f"diffusers:{tmp_path / 'pipe'}", resolution=PIXELS, num_frames=FRAMES)
    padding = 1 if patch_size_t else 0
    assert model.info.sample_shape == (4, 3 + padding, 4, 4) and model.info.extra["padding_frames"] == padding
    x = initial_noise([0], model.info.sample_shape)
    with torch.no_grad():
        ours = sample(model.denoiser(PROMPTS[:1], GUIDANCE), x, model.default_plan(STEPS), model.noise_schedule,
                      "v_prediction")
        theirs = _call(_pipe(tmp_path / "pipe"), x, prompt=PROMPTS[:1], output_type="pt")
    video = model.decode(ours) * 0.5 + 0.5
    assert video.shape == (1, 3, FRAMES, PIXELS, PIXELS)
    torch.testing.assert_close(video, theirs.transpose(1, 2), rtol=TOL, atol=TOL)


def test_prompts_are_encoded_as_the_pipelines_call_encodes_them(saved):
    """T5 over __call__'s max_sequence_length (226 tokens, `</s>` then padding), the empty negative prompt."""
    from schedsearch.runtime.diffusers_models import encode_prompts

    pipe = _pipe(saved)
    cond = encode_prompts(pipe, "cogvideox", PROMPTS)
    assert cond.keys() == {"prompt_embeds", "negative_prompt_embeds"}
    assert cond["prompt_embeds"].shape == cond["negative_prompt_embeds"].shape == (2, 226, TEXT_DIM)
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=226, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(cond["prompt_embeds"], pipe.text_encoder(ids)[0])


def test_decoded_video_equals_the_pipelines(model, saved):
    """Our decode (latents / scaling_factor through the VAE) equals the pipeline's "pt" video mapped to [-1, 1]."""
    x = initial_noise([0, 1], model.info.sample_shape)
    with torch.no_grad():
        ours = sample(model.denoiser(PROMPTS, GUIDANCE), x, model.default_plan(STEPS), model.noise_schedule,
                      "v_prediction")
        theirs = _call(_pipe(saved), x, output_type="pt")
    video = model.decode(ours)
    assert video.shape == (2, 3, FRAMES, PIXELS, PIXELS) and video.abs().max() <= 1.0
    torch.testing.assert_close(video * 0.5 + 0.5, theirs.transpose(1, 2), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("kind", ["fora", "unit"])
def test_cached_schedule_in_the_pipeline_equals_our_sampler(model, saved, kind):
    """FORA (attention returns text and video outputs: both reused) and a unit over both blocks (the two streams'
    residuals, located by diffusers' block registry) inside `pipe(prompt=...)`, whose one CFG-batched call per step
    runs under one cache context, equal our sampler."""
    plan = model.default_plan(STEPS)
    cache = (baselines.fora_cache_plan(model_layout(model.info), STEPS, 2) if kind == "fora"
             else baselines.uniform_unit_plan("transformer_blocks", 0, 2, STEPS, 2))
    schedule = Schedule(model.info.name, plan, cache)
    x = initial_noise([0, 1], model.info.sample_shape)
    pipe = _pipe(saved)
    with apply_schedule(pipe, schedule, resolution=PIXELS, num_frames=FRAMES), torch.no_grad():
        theirs = _call(pipe, x)
    with apply_schedule(model, schedule) as applied:
        ours = applied.sample(PROMPTS, [0, 1], GUIDANCE, decode=False)
    with apply_schedule(model, Schedule(model.info.name, plan)) as applied:
        uncached = applied.sample(PROMPTS, [0, 1], GUIDANCE, decode=False)
    torch.testing.assert_close(theirs, ours, rtol=TOL, atol=TOL)
    assert (uncached - ours).abs().max() > 1e-3


def test_every_space_and_baseline_runs(model):
    """Every space but the policy one builds on CogVideoX and each baseline runs from a prompt to a finite output:
    solver plans (DPM-Solver, UniPC with UniC, noise and data forms) starting at t = 999 where α = 0, component
    caches, CacheQuant's unit, DC ratios and joint ones."""
    assert every_baseline_runs(model, ["a cat"]) > 10


def test_random_solver_and_joint_schedules_run_from_pure_noise(model):
    """The solver space starts every plan at t = 999 (α = 0 here): random genomes, whose first steps take the noise
    form, higher orders after it and UniC of it in every rule, all sample to finite outputs."""
    import numpy as np

    from schedsearch.study import build_space

    rng, firsts = np.random.default_rng(0), set()
    for name in ("solver", "joint"):
        space = build_space(name, model.info)
        for _ in range(12):
            schedule = space.sample(rng)
            first = schedule.solver.steps[0]
            firsts.add((first.prediction, first.corrector and first.rule))
            with apply_schedule(model, schedule) as applied:
                assert torch.isfinite(applied.sample(embeddings(1), [0], decode=False)).all(), schedule.solver
    assert {("noise", False), ("noise", "bh2"), ("data", "bh1"), ("data", "dpmsolver")} <= firsts


def test_cache_search_runs_from_prompts(model, tmp_path):
    quick_cache_search(model, tmp_path, "cogvideox")


def test_search_export_evaluate_and_apply_in_the_pipeline(saved, tmp_path, capsys):
    """The CLI as users run it, then the exported schedule with the most reuse inside the stock pipeline called with
    prompt strings, equal to our sampler running it from the same prompts."""
    name, size = f"diffusers:{saved}", ["--resolution", str(PIXELS), "--frames", str(FRAMES)]
    schedule = cli_search_export_evaluate(name, size, PROMPTS, tmp_path, capsys)
    model = load_model(name, resolution=PIXELS, num_frames=FRAMES)
    x = initial_noise([0, 1], model.info.sample_shape)
    pipe = _pipe(saved)
    with apply_schedule(pipe, schedule, resolution=PIXELS, num_frames=FRAMES), torch.no_grad():
        theirs = _call(pipe, x, steps=schedule.solver.num_steps)
    with apply_schedule(model, schedule) as applied:
        ours = applied.sample(PROMPTS, [0, 1], GUIDANCE, decode=False)
    with apply_schedule(model, type(schedule)(schedule.model, schedule.solver)) as applied:
        uncached = applied.sample(PROMPTS, [0, 1], GUIDANCE, decode=False)
    torch.testing.assert_close(theirs, ours, rtol=TOL, atol=TOL)
    assert (uncached - ours).abs().max() > 1e-3


def test_cachequant_search_calibrates_on_the_video_stream(model, tmp_path):
    """CacheQuant's calibration features: the video tokens' residual over the unit (CogVideoXBlock returns (video,
    text)), the CFG pair batched: 2 prompts x 2, 12 video tokens, width 2 x 16; then its DP search from prompts."""
    from schedsearch.calibration.unit_features import unit_features
    from schedsearch.search.base import Budget
    from schedsearch.study import run_search

    features = unit_features(model, model.default_plan(4), ("transformer_blocks", 0, 2), PROMPTS, [0, 1], GUIDANCE)
    assert all(f.shape == (4, 12, 32) and torch.isfinite(f).all() for f in features)
    assert (features[1] - features[2]).abs().max() > 1e-4
    result = run_search(model=model, space="cachequant", strategy="dp", objectives=["psnr", "macs"], study="cq",
                        store=tmp_path / "r.db", budget=Budget(evaluations=3), samples=2, prompts=PROMPTS,
                        cache_dir=tmp_path / "cache", batch_size=2, space_options={"num_steps": 4},
                        progress=False, validate=False)
    assert result.evaluations >= 1 and result.failed == 0


def test_skipped_blocks_in_the_pipeline_equal_our_sampler(model, saved):
    """Block skipping (a block whose every component is reused returns its input plus both streams' residuals,
    modulation skipped) works on CogVideoXBlock through diffusers' block registry, inside `pipe(...)` as in our
    sampler, so the cache space searches them."""
    from schedsearch.spaces.cache_plan import ComponentCachePlan

    plan = model.default_plan(STEPS)
    layout = model_layout(model.info)  # 2 blocks x (attn1, ff): block 1 skipped at steps 1 and 3
    cache = ComponentCachePlan(layout, ("1111", "1100", "1111", "1100"), skip_reused_blocks=True)
    plain = ComponentCachePlan(layout, cache.recompute)
    x = initial_noise([0, 1], model.info.sample_shape)
    pipe = _pipe(saved)
    schedule = Schedule(model.info.name, plan, cache)
    with apply_schedule(pipe, schedule, resolution=PIXELS, num_frames=FRAMES), torch.no_grad():
        theirs = _call(pipe, x)
    outs = []
    for c in (cache, plain):
        with apply_schedule(model, Schedule(model.info.name, plan, c)) as applied:
            outs.append(applied.sample(PROMPTS, [0, 1], GUIDANCE, decode=False))
    torch.testing.assert_close(theirs, outs[0], rtol=TOL, atol=TOL)
    assert (outs[0] - outs[1]).abs().max() > 1e-4  # skipping the modulation is not plain reuse
    from schedsearch.runtime.models import model_structure

    assert model_structure(model.info).block_skip  # the cache space's block-skip gene is on


def test_info_shows_the_layout(saved, capsys):
    import json

    from schedsearch.cli import main

    assert main(["info", "--model", f"diffusers:{saved}", "--resolution", str(PIXELS), "--frames",
                 str(FRAMES)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["prediction_type"], info["sample_shape"]) == ("cogvideox", "v_prediction",
                                                                               [4, 3, 4, 4])
    assert [(g["path"], g["count"]) for g in info["block_groups"]] == [("transformer_blocks", 2)]


# ---------------------------------------------------------------------------------- the sampler from α = 0


def _v_model(schedule):
    """A smooth stand-in v-prediction network in float64 (its x0 and ε vary with t), for limits to converge."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 8, generator=g, dtype=torch.float64) / 3

    def denoise(x, t, i):
        return torch.tanh(x @ weight) * (1 + t / 1000)

    return denoise


PLANS = {
    "ddim-noise": [SolverStep(order=1, prediction="noise")] * 4,
    "dpm++3m": [SolverStep(order=min(i + 1, 3), rule="dpmsolver") for i in range(3)] + [SolverStep(order=1)],
    "dpm3m-noise": [SolverStep(order=min(i + 1, 3), prediction="noise", rule="dpmsolver") for i in range(3)]
    + [SolverStep(order=1, prediction="noise")],
    "unipc3-bh2": [SolverStep(order=min(i + 1, 3), corrector=i < 3) for i in range(3)] + [SolverStep(order=1)],
    "unipc3-bh1": [SolverStep(order=min(i + 1, 3), rule="bh1") for i in range(3)] + [SolverStep(order=1)],
    "unipc2-corr-order2": [SolverStep(order=1), SolverStep(order=2, corrector=True), SolverStep(order=2),
                           SolverStep(order=1)],
}


@pytest.mark.parametrize("form", ["data", "noise"])
def test_first_step_from_pure_noise_is_the_limit_of_steps_near_it(model, form):
    """A step from t = 999 (α = 0, λ = −∞) is α_t·x0 + σ_t·ε of the model's output in either form (the noise
    form's own expression is ∞·0 there), the limit of the same step started just below 999, where α → 0
    continuously (e^{−h} = O(α_s))."""
    schedule, denoise = model.noise_schedule, _v_model(model.noise_schedule)
    x = initial_noise([5], (8, 8)).double()
    step = (SolverStep(order=1, prediction=form),)
    near, at = (sample(denoise, x, SolverPlan((start,), step, 700.0), schedule, "v_prediction")
                for start in (999.0 - 1e-3, 999.0))  # α = 2.5e-7 there: O(α) off the limit, 1e-16/α rounding
    a, s = schedule.alpha_sigma(700.0)
    torch.testing.assert_close(at, a * -denoise(x, 999.0, 0) + s * x, rtol=1e-12, atol=1e-12)  # x0 = −v at α = 0
    torch.testing.assert_close(near, at, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PLANS)
def test_multistep_plans_from_pure_noise_are_finite(model, name):
    """Higher orders and UniC after a first step at λ = −∞: that output drops out of their terms (r = −∞, D = 0;
    the solve without it is the limit of R ρ = b, which is NaN with it); the finite outputs still act, so the result
    differs from DDIM's on the same timesteps, which the noise form of DDIM equals, as it does away from α = 0."""
    schedule, denoise = model.noise_schedule, _v_model(model.noise_schedule)
    x = initial_noise([5], (8, 8)).double()
    times = (999.0, 700.0, 400.0, 100.0)
    out = sample(denoise, x, SolverPlan(times, tuple(PLANS[name])), schedule, "v_prediction")
    ddim = sample(denoise, x, SolverPlan(times, (SolverStep(order=1),) * 4), schedule, "v_prediction")
    assert torch.isfinite(out).all()
    if name == "ddim-noise":
        torch.testing.assert_close(out, ddim, rtol=1e-9, atol=1e-9)
    else:
        assert (out - ddim).abs().max() > 1e-4


def test_unic_without_a_limit_leaves_the_first_step_uncorrected(model):
    """UniC of the step from λ = −∞ in the noise form (or with bh1) has a coefficient that grows without bound:
    that step stays the predictor's exact limit, finite; data-form bh2 keeps its (finite) correction."""
    schedule, denoise = model.noise_schedule, _v_model(model.noise_schedule)
    x = initial_noise([5], (8, 8)).double()

    def run(first):
        return sample(denoise, x, SolverPlan((999.0, 500.0), (first, SolverStep(order=1)), 200.0), schedule,
                      "v_prediction")

    plain = run(SolverStep(order=1))
    for form, rule in (("noise", "bh2"), ("data", "bh1")):
        torch.testing.assert_close(run(SolverStep(order=1, prediction=form, rule=rule, corrector=True)), plain)
    corrected = run(SolverStep(order=1, corrector=True))
    assert torch.isfinite(corrected).all() and (corrected - plain).abs().max() > 1e-3
