"""Wan 2.2 text to video: WanPipeline with two transformers (`transformer` above boundary_ratio · T, `transformer_2`
below, with guidance_scale and guidance_scale_2), on a tiny random pipeline built from config as diffusers' own
tests build it (tests/pipelines/wan/test_wan_22.py), saved with `save_pretrained` and loaded back. The two tiny
transformers have different weights and widths, so a step run by the wrong one, or a cost counted on the wrong one,
shows."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from family_checks import every_baseline_runs, quick_cache_search
from stand_in_text import clip_stand_in

diffusers = pytest.importorskip("diffusers")

from schedsearch.runtime.models import initial_noise, load_model, model_layout  # noqa: E402
from schedsearch.runtime.sampler import sample  # noqa: E402
from schedsearch.spaces.schedule import Schedule  # noqa: E402

TEXT_DIM, FRAMES, PIXELS, BOUNDARY, STEPS = 32, 9, 16, 0.875, 6
PROMPTS = ["a cat", "a dog"]


def _transformer(seed: int, ffn_dim: int, num_layers: int = 2):
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=ffn_dim, num_layers=num_layers, cross_attn_norm=True,
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


def embeddings(n: int) -> dict:
    """Pre-encoded prompts (the text encoder's width, 6 tokens) and a negative prompt."""
    g = torch.Generator().manual_seed(1)
    return {"prompt_embeds": torch.randn(n, 6, TEXT_DIM, generator=g),
            "negative_prompt_embeds": torch.randn(1, 6, TEXT_DIM, generator=g)}


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


def test_what_the_pipeline_cannot_run_is_refused(pipe, saved):
    """Refused before any work, naming the setting and the fix: boundary_ratio without transformer_2 (the
    pipeline's loop would call None), transformers of different depths (one plan layout cannot address both),
    guidance_2 on a one-transformer model (WanPipeline refuses guidance_scale_2 without boundary_ratio), each as
    `<field>: <problem>; <fix>`; the CLI describes the two-transformer pipeline."""
    from schedsearch.cli import main
    from schedsearch.errors import UserInputError
    from schedsearch.runtime.diffusers_models import loaded_model_from_pipeline

    parts = {k: v for k, v in pipe.components.items() if k != "transformer_2"}
    missing = r"--model: WanPipeline has boundary_ratio=0.875 but no `transformer_2`"
    with pytest.raises(UserInputError, match=missing) as err:
        loaded_model_from_pipeline(diffusers.WanPipeline(**parts, transformer_2=None, boundary_ratio=BOUNDARY))
    assert str(err.value).endswith("; load the pipeline with both transformers")  # the CLI prints error: <this>
    deeper = diffusers.WanPipeline(**parts, transformer_2=_transformer(1, 32, num_layers=3), boundary_ratio=BOUNDARY)
    with pytest.raises(UserInputError, match="same number of blocks"):
        loaded_model_from_pipeline(deeper)
    one = loaded_model_from_pipeline(diffusers.WanPipeline(**parts, transformer_2=None), resolution=PIXELS,
                                     num_frames=FRAMES)
    assert "expert_boundary" not in one.info.extra
    with pytest.raises(UserInputError, match=r"guidance_2: .* runs one network"):
        one.denoiser(PROMPTS, 5.0, guidance_2=2.0)
    assert main(["info", "--model", f"diffusers:{saved}", "--resolution", str(PIXELS), "--frames", str(FRAMES)]) == 0


def test_a_second_guidance_scale_given_at_load_is_the_models_and_its_calibrations(model, saved, pipe, tmp_path):
    """`--guidance-2` (load_model's guidance_2): the loaded model's denoiser runs the low-noise transformer at that
    scale (the same output as passing it per call), the calibration set's identity holds it (a teacher at another
    second scale is never reused), and the CLI takes it; refused on a one-transformer pipeline, before any work."""
    from schedsearch.calibration.calibration_set import default_spec
    from schedsearch.cli import main
    from schedsearch.errors import UserInputError
    from schedsearch.runtime.diffusers_models import loaded_model_from_pipeline

    scaled = load_model(f"diffusers:{saved}", resolution=PIXELS, num_frames=FRAMES, guidance_2=2.0)
    x = initial_noise([0, 1], model.info.sample_shape)
    plan = model.default_plan(STEPS)
    with torch.no_grad():
        loaded_scale = sample(scaled.denoiser(PROMPTS, 5.0), x, plan, model.noise_schedule, "flow_prediction")
        per_call = sample(model.denoiser(PROMPTS, 5.0, guidance_2=2.0), x, plan, model.noise_schedule,
                          "flow_prediction")
    assert torch.equal(loaded_scale, per_call)
    spec, plain = default_spec(scaled.info, samples=2, prompts=PROMPTS), default_spec(model.info, samples=2,
                                                                                        prompts=PROMPTS)
    assert spec.guidance_2 == 2.0 and plain.guidance_2 is None and spec.hash != plain.hash
    assert type(spec).from_dict(spec.to_dict()) == spec
    parts = {k: v for k, v in pipe.components.items() if k != "transformer_2"}
    with pytest.raises(UserInputError, match=r"--guidance-2: WanPipeline runs one transformer"):
        loaded_model_from_pipeline(diffusers.WanPipeline(**parts, transformer_2=None), guidance_2=2.0)
    schedule = tmp_path / "fora.json"
    schedule.write_text(fora(scaled, 2).to_json())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    assert main(["evaluate", "--model", f"diffusers:{saved}", "--resolution", str(PIXELS), "--frames", str(FRAMES),
                 "--guidance-2", "2", "--schedule", str(schedule), "--objectives", "psnr", "--samples", "2",
                 "--prompts", str(prompts), "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    built = list((tmp_path / "cache" / "calibration").glob("*/manifest.json"))
    assert len(built) == 1 and '"guidance_2": 2.0' in built[0].read_text()

def test_a_runtime_policy_is_refused(model):
    """A runtime policy keeps one network's state: refused before any work, with the static-plan fix."""
    from schedsearch.runtime.execute import run_batches
    from schedsearch.spaces.errors import ScheduleError
    from schedsearch.spaces.policy_plan import KNOBS, RuntimePolicy

    policy = RuntimePolicy("first_block_cache", tuple((k.name, k.default) for k in KNOBS["first_block_cache"]))
    schedule = Schedule(model.info.name, model.default_plan(STEPS), policy=policy)
    with pytest.raises(ScheduleError, match=r"policy: .* runs two transformers.*; use a static cache plan"):
        next(run_batches(model, schedule, PROMPTS, [0, 1], decode=False))


def fora(model, interval: int) -> Schedule:
    from schedsearch.spaces import baselines

    cache = baselines.fora_cache_plan(model_layout(model.info), STEPS, interval)
    return Schedule(model.info.name, model.default_plan(STEPS), cache)


def test_cached_schedule_in_the_stock_pipeline_equals_our_sampler(model, pipe):
    """FORA every 2 (recomputing at steps 0, 2, 4: step 2 is transformer_2's first) applied to the stock WanPipeline
    and run by a normal pipe(prompt=...) call, which picks the transformer itself (hooks on both, two calls per
    step), equals our sampler; and the cache changed the result."""
    from schedsearch.runtime.apply import apply_schedule

    schedule = fora(model, 2)
    x = initial_noise([0, 1], model.info.sample_shape)
    with apply_schedule(pipe, schedule, strict=False, resolution=PIXELS, num_frames=FRAMES):
        theirs = call(pipe, x, num_inference_steps=STEPS, guidance_scale=5.0, guidance_scale_2=2.0)
    plan = schedule.solver
    with apply_schedule(model, schedule) as applied, torch.no_grad():
        denoise = applied.runtime.wrap(model.denoiser(PROMPTS, 5.0, guidance_2=2.0))
        ours = sample(denoise, x, plan, model.noise_schedule, "flow_prediction")
    with torch.no_grad():
        uncached = sample(model.denoiser(PROMPTS, 5.0, guidance_2=2.0), x, plan, model.noise_schedule,
                          "flow_prediction")
    assert (theirs - ours).abs().max() < 1e-5
    assert (uncached - ours).abs().max() > 1e-4
    untouched = call(pipe, x, num_inference_steps=STEPS, guidance_scale=5.0, guidance_scale_2=2.0)
    assert (untouched - uncached).abs().max() < 1e-5  # removed: the stock pipeline is itself again


def test_latency_is_timed_per_transformer_and_charged_to_its_steps(model, tmp_path):
    """latency_s on two transformers: each transformer's components timed with the probe routed to it, the
    uncached run's unexplained time spread over its evaluations, the table kept on disk and read back as it was;
    a cached schedule is predicted faster than the uncached one."""
    from schedsearch.objectives.cost import ExpertCostTable
    from schedsearch.objectives.standard import PredictedLatency

    objective = PredictedLatency(model, str(tmp_path))
    objective.batch = 2  # the tiny probe
    table = objective.table()
    assert isinstance(table, ExpertCostTable) and len(table.experts) == 2
    assert table.experts[0].base == table.experts[1].base  # one unexplained time per evaluation
    assert 0 < objective.value(fora(model, 2)) < objective.value(Schedule(model.info.name, model.default_plan(STEPS)))
    again = PredictedLatency(model, str(tmp_path))
    again.batch = 2
    assert again.table() == table and len(list(tmp_path.glob("latency_*_b2.json"))) == 1

def test_a_reuse_at_a_transformers_first_step_is_refused(model, pipe):
    """FORA every 3 reuses at step 2, where transformer_2 has computed nothing: refused before any work, by our
    sampler's entry point, apply_schedule on the pipeline and on the model, naming the step and the fix."""
    from schedsearch.runtime.apply import apply_schedule
    from schedsearch.runtime.execute import run_batches
    from schedsearch.spaces.errors import ScheduleError

    schedule = fora(model, 3)
    with pytest.raises(ScheduleError, match=r"cache.recompute\[2\]: step 2 is the first step transformer_2 runs"):
        next(run_batches(model, schedule, PROMPTS, [0, 1], decode=False))
    with pytest.raises(ScheduleError, match="recompute every slot at step 2"):
        apply_schedule(pipe, schedule, strict=False, resolution=PIXELS, num_frames=FRAMES)
    assert not hasattr(pipe.transformer_2.blocks[0].attn1, "_diffusers_hook")  # nothing was attached
    with pytest.raises(ScheduleError, match="transformer_2"):
        apply_schedule(model, schedule)


def forced_rows_recompute(schedule, boundary) -> bool:
    from schedsearch.spaces.baselines import forced_recompute_steps

    cache, forced = schedule.cache, forced_recompute_steps(schedule.solver, boundary)
    return cache is None or all("0" not in cache.recompute[i] for i in forced)


def test_spaces_force_each_transformers_first_step(model):
    """The cache space leaves transformer_2's first step out of the genome (an all-reuse genome recomputes it), its
    encode refuses a plan reusing there, refresh placements get it; the joint space forces it wherever the decoded
    timesteps put the boundary. No genome or baseline of either can express a reuse there."""
    import numpy as np

    from schedsearch.runtime.models import model_structure
    from schedsearch.spaces.cache_mask import CacheMaskSpace
    from schedsearch.spaces.joint import JointSpace

    boundary = model.info.extra["expert_boundary"]
    structure = model_structure(model.info)
    space = CacheMaskSpace(structure, num_steps=STEPS)  # DPM-Solver++ at t = 999, 833, ...: σ·T 999.7, 937.5, 857
    assert space.forced == (0, 2) and space.genome_steps == (1, 3, 4, 5)
    reuse_all = space.decode(np.zeros(space.genome.size)).cache.recompute
    assert [row == "1" * len(space.slots) for row in reuse_all] == [True, False, True, False, False, False]
    hand = Schedule(model.info.name, space.solver, fora(model, 3).cache)  # reuses at step 2
    with pytest.raises(ValueError, match=r"steps \[0, 2\] must recompute"):
        space.encode(hand)
    assert space.refresh_schedule([0, 4]).cache.recompute[2] == "1" * len(space.slots)
    assert space.whole_stack_refresh(space.encode(space.refresh_schedule([0, 4]))) == ((0, 2, 4), False)
    joint = JointSpace(structure, nfe_range=(4, 8))
    rng = np.random.default_rng(0)
    decoded = [joint.decode(joint.genome.random(rng)) for _ in range(50)]
    decoded += [joint.decode(np.append(g[: joint._mask.start], np.zeros(joint.genome.size - joint._mask.start)))
                for g in (joint.genome.random(rng) for _ in range(20))]
    assert all(forced_rows_recompute(s, boundary) for s in decoded)
    assert any(s.cache is not None and set(s.cache.recompute[1]) == {"0"} for s in decoded)  # others are free
    for s in decoded[:10]:
        assert joint.decode(joint.encode(s)) == s


def test_every_baseline_of_the_cache_joint_and_solver_spaces_runs(model):
    """At the spaces' default step counts, every cache and joint baseline recomputes each transformer's first step,
    every CacheQuant unit baseline and decoded genome refreshes there, and every baseline of the solver, cache,
    CacheQuant, DC and joint spaces runs (one sample) to a finite output; a hand-made unit plan that misses that
    refresh is refused before any work, naming the step."""
    import numpy as np

    from schedsearch.runtime.execute import check_schedule_for
    from schedsearch.spaces.errors import ScheduleError
    from schedsearch.study import build_space

    boundary = model.info.extra["expert_boundary"]
    for name in ("cache", "joint"):
        for label, schedule in build_space(name, model.info).baselines():
            assert forced_rows_recompute(schedule, boundary), f"{name}: {label}"
    unit = build_space("cachequant", model.info)
    assert len(unit.forced) == 2  # the first evaluated step and transformer_2's first
    for _, schedule in unit.baselines():
        assert set(unit.forced) <= set(schedule.cache.refresh_steps)
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert set(unit.forced) <= set(unit.decode(rng.integers(0, 2, unit.genome.size)).cache.refresh_steps)
    assert every_baseline_runs(model, embeddings(1)) > 50
    missing = unit.plan(tuple(s for s in range(0, unit.num_steps, 4) if s != unit.forced[1]))
    with pytest.raises(ScheduleError, match="; refresh the unit at step") as err:
        check_schedule_for(model, Schedule(model.info.name, unit.solver, missing))
    assert "first step transformer_2 runs" in str(err.value)
    with pytest.raises(ValueError, match="refreshed steps"):
        unit.encode(Schedule(model.info.name, unit.solver, missing))


def test_macs_are_counted_per_transformer(model):
    """MACs counted on the real forward of each transformer (transformer_2's feed-forward is 1.5× as wide), and a
    schedule is charged, step by step, the MACs of the transformer that runs the step."""
    from schedsearch.objectives.cost import ExpertCostTable
    from schedsearch.objectives.standard import MACs

    macs = MACs(model)
    table = macs.table()
    assert isinstance(table, ExpertCostTable) and len(table.experts) == 2
    high, low = table.experts
    assert low.slots["blocks.0.ffn"] == 1.5 * high.slots["blocks.0.ffn"]
    assert low.slots["blocks.0.attn1"] == high.slots["blocks.0.attn1"]
    uncached = Schedule(model.info.name, model.default_plan(STEPS))  # 2 steps of transformer, 4 of transformer_2
    assert macs.value(uncached) == 2 * (2 * high.full + 4 * low.full)  # a CFG pair counts twice
    cached = fora(model, 2)  # reuses at steps 1 (transformer), 3 and 5 (transformer_2)
    reused = (high.full - high.base) + 2 * (low.full - low.base)
    assert macs.value(cached) == pytest.approx(macs.value(uncached) - 2 * reused, rel=1e-9)


def test_cache_search_runs_on_wan22(model, tmp_path):
    """ECAD's cache search, PSNR on whole videos, MACs counted per transformer: nothing it proposes fails (no plan
    reuses at a transformer's first step)."""
    quick_cache_search(model, tmp_path, "wan22")


def test_block_observers_see_whichever_transformer_runs(model):
    """CacheQuant's unit features hook the network's blocks by path: on the pair they are hooked on both
    transformers, so every step has its feature (transformer_2's steps included), and the hooks come off again."""
    from schedsearch.calibration.unit_features import unit_features

    features = unit_features(model, model.default_plan(STEPS), ("blocks", 0, 2), PROMPTS, [0, 1], 5.0)
    assert all(f is not None and f.shape == (4, 3, 24) for f in features)  # CFG pair × 2, 3 tokens, width 24
    assert all(not block._forward_hooks and not block._forward_pre_hooks
               for expert in model.network.experts for block in expert.blocks)


def build_ti2v(tmp):
    """diffusers' Wan 2.2 TI2V-5B test components: one transformer, the 48-channel VAE (16× spatial), and the
    pipeline's `expand_timesteps` (a timestep per latent token)."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True,
                                     patch_size=2, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
                                     dim_mult=[1, 1, 1, 1], num_res_blocks=1, scale_factor_spatial=16,
                                     scale_factor_temporal=4, temperal_downsample=[False, True, True])
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0)
    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48, out_channels=48,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    tokenizer, text_encoder = clip_stand_in(tmp, TEXT_DIM, 512)
    return diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                 transformer=transformer, expand_timesteps=True)


def test_ti2v_5b_is_supported(tmp_path):
    """TI2V-5B (expand_timesteps=True, one transformer): the transformer gets a timestep per latent token, shaped
    as WanPipeline makes it (its mask[:, ::2, ::2] over the 3 × 2 × 2 latent: 3 tokens); the default plan equals
    pipe(prompt=...) to 1e-5 at 32 px; decoding goes through its 48-channel VAE."""
    build_ti2v(tmp_path).save_pretrained(tmp_path / "pipe")
    ti2v = load_model(f"diffusers:{tmp_path / 'pipe'}", resolution=32, num_frames=FRAMES)
    assert ti2v.info.extra["expand_timesteps"] and "expert_boundary" not in ti2v.info.extra
    assert ti2v.info.sample_shape == (48, 3, 2, 2)
    pipe = diffusers.WanPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    x = initial_noise([0, 1], ti2v.info.sample_shape)
    shapes = []
    handle = ti2v.network.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["timestep"].shape)),
                                                    with_kwargs=True)
    with torch.no_grad():
        ours = sample(ti2v.denoiser(PROMPTS, 5.0), x, ti2v.default_plan(3), ti2v.noise_schedule, "flow_prediction")
    handle.remove()
    with torch.no_grad():
        theirs = pipe(prompt=PROMPTS, negative_prompt="", latents=x, height=32, width=32, num_frames=FRAMES,
                      num_inference_steps=3, guidance_scale=5.0, output_type="latent").frames
    assert shapes == [(4, 3)] * 3  # the CFG batch of 2 × 2 samples, 3 tokens
    assert (ours - theirs).abs().max() < 1e-5
    assert ti2v.decode(ours[:1]).shape == (1, 3, FRAMES, 32, 32)


def test_the_evaluators_row_counter_sees_both_transformers(model):
    """The evaluators count model work on `model.network` (a pre-hook on the pair): every step's CFG batch counts,
    the low-noise transformer's steps included."""
    from schedsearch.runtime.execute import counting_rows, run_batches

    with counting_rows(model.network) as rows:
        list(run_batches(model, Schedule(model.info.name, model.default_plan(STEPS)), PROMPTS, [0, 1], decode=False))
    assert rows[0] == STEPS * 2 * 2  # 6 steps × (cond + uncond) × 2 samples
