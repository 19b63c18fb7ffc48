"""apply_schedule on tiny random diffusers pipelines saved and loaded back offline.

The independent reference is diffusers' own DPMSolverMultistepScheduler inside the same pipeline (same timesteps);
the cache path is checked against our sampler + CacheRuntime on the same network and noise; remove() must leave
the pipeline producing bit-identical output.
"""

import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from family_checks import true_cfg_per_pass  # noqa: E402
from test_diffusers_models import _pipeline, build_pipeline, embeddings  # noqa: E402

import schedsearch  # noqa: E402
from schedsearch.runtime.apply import ScheduleScheduler, apply_schedule  # noqa: E402
from schedsearch.runtime.cache_hooks import model_layout  # noqa: E402
from schedsearch.runtime.execute import run_batches  # noqa: E402
from schedsearch.runtime.models import initial_noise, load_model  # noqa: E402
from schedsearch.spaces import baselines  # noqa: E402
from schedsearch.spaces.schedule import Schedule, ScheduleError, SolverPlan  # noqa: E402

N = 8  # steps
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("apply_pipelines")
    for family in ("pixart", "sd3"):
        build_pipeline(family, root).save_pretrained(root / family)
    return {"pixart": root / "pixart", "sd3": root / "sd3"}


@pytest.fixture(scope="module")
def pixart(saved):
    return _pipeline(saved["pixart"])


def _pixart_kwargs(dtype: torch.dtype = torch.float32) -> dict:
    cond, n = embeddings("pixart", len(SEEDS)), len(SEEDS)
    return dict(
        prompt_embeds=cond["prompt_embeds"].to(dtype),
        prompt_attention_mask=cond["prompt_attention_mask"],
        negative_prompt=None,
        negative_prompt_embeds=cond["negative_prompt_embeds"].expand(n, -1, -1).to(dtype),
        negative_prompt_attention_mask=torch.ones(n, 5, dtype=torch.long),  # the adapter's default mask
        height=16,
        width=16,
        use_resolution_binning=False,
        output_type="latent",
        guidance_scale=4.5,
        num_inference_steps=N,
    )


def _run(pipe, dtype: torch.dtype = torch.float32, **overrides) -> torch.Tensor:
    x = initial_noise(SEEDS, (4, 8, 8)).to(dtype)
    with torch.no_grad():
        return pipe(latents=x, **(_pixart_kwargs(dtype) | overrides)).images


def _dpmpp_2m(pipe, name: str, cache=None) -> Schedule:
    """DPM-Solver++(2M) on the timesteps the pipeline's own DPMSolverMultistepScheduler uses for N steps."""
    reference = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    reference.set_timesteps(N)
    timesteps = [float(t) for t in reference.timesteps]
    return Schedule(model=name, solver=baselines.dpm_solver_plan(timesteps, 2), cache=cache)


def test_dpmpp_2m_plan_matches_diffusers_dpm_solver_in_the_pipeline(saved):
    """float64 (as tests/test_sampler_equivalence.py): in float32 the final latents (|x| ≈ 600 on a random model)
    differ by 2e-4 from rounding alone."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        saved["pixart"], text_encoder=None, tokenizer=None, torch_dtype=torch.float64
    )
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    reference = _run(pipe, torch.float64)
    with apply_schedule(pipe, _dpmpp_2m(pipe, f"diffusers:{saved['pixart']}")) as applied:
        assert isinstance(pipe.scheduler, ScheduleScheduler) and applied.scheduler is pipe.scheduler
        ours = _run(pipe, torch.float64)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("skip_reused_blocks", [False, True])
def test_cached_plan_in_the_pipeline_equals_our_sampler_and_remove_restores(saved, pixart, skip_reused_blocks):
    name = f"diffusers:{saved['pixart']}"
    model = load_model(name)
    plan = baselines.fora_cache_plan(model_layout(model.info), N, 2)
    fora = _dpmpp_2m(pixart, name, dataclasses.replace(plan, skip_reused_blocks=skip_reused_blocks))
    before = _run(pixart)
    scheduler, config = pixart.scheduler, dict(pixart.config)
    with apply_schedule(pixart, fora) as applied:
        through_pipeline = _run(pixart)
        assert torch.equal(_run(pixart), through_pipeline)  # cache state resets between pipeline calls
        with pytest.raises(RuntimeError, match="already applied"):
            apply_schedule(pixart, fora)
        with pytest.raises(ValueError, match=f"num_inference_steps={N}"):
            _run(pixart, num_inference_steps=N + 1)
        with pytest.raises(TypeError, match="call the pipeline"):
            applied.sample([0], [0])
    with apply_schedule(model, fora) as on_model:  # our sampler + CacheRuntime on the same network and noise
        ours = on_model.sample(embeddings("pixart", 2), SEEDS, 4.5, decode=False)
    torch.testing.assert_close(through_pipeline, ours, rtol=0, atol=1e-6)
    with apply_schedule(model, Schedule(name, fora.solver)) as no_cache:
        uncached = no_cache.sample(embeddings("pixart", 2), SEEDS, 4.5, decode=False)
    assert (uncached - ours).abs().max() > 1e-3  # the cache plan did something
    # removed: same scheduler object, same config, no hooks, bit-identical output
    assert pixart.scheduler is scheduler and dict(pixart.config) == config
    network = pixart.transformer
    assert not network._forward_pre_hooks
    assert not [m for m in network.modules() if hasattr(m, "_diffusers_hook") or "forward" in m.__dict__]
    assert torch.equal(_run(pixart), before)
    applied.remove()  # idempotent


def test_loaded_model_sample_equals_the_sampler(saved):
    model = load_model(f"diffusers:{saved['pixart']}")
    schedule = Schedule(model.info.name, model.default_plan(4))
    with apply_schedule(model, schedule) as applied:
        images = applied.sample(embeddings("pixart", 2), SEEDS, 4.5)
    cond = embeddings("pixart", 2)
    denoise = model.denoiser(cond, 4.5)
    with torch.no_grad():
        out = schedsearch.sample(denoise, initial_noise(SEEDS, (4, 8, 8)), schedule.solver, model.noise_schedule)
    assert torch.equal(images, model.decode(out))


def test_builtin_model_and_analytical_first_step(builtin_model):
    ts = baselines.linspace_timesteps(1000, 6)
    plan = baselines.unipc_plan(ts, 2)
    afs = Schedule(builtin_model.info.name, SolverPlan(plan.timesteps, plan.steps, first_step="zero_x0"))
    with schedsearch.apply_schedule(builtin_model, afs) as applied:
        images = applied.sample([1, 2], [3, 4], 2.0)
    (_, expected), *_ = run_batches(builtin_model, afs, [1, 2], [3, 4], 2.0)
    assert torch.equal(images, expected)


def test_errors(saved, pixart, builtin_model):
    name = f"diffusers:{saved['pixart']}"
    good = _dpmpp_2m(pixart, name)
    with pytest.raises(ScheduleError, match="schedule is for 'diffusers:elsewhere'") as err:
        apply_schedule(pixart, Schedule("diffusers:elsewhere", good.solver))
    assert "strict=False" in str(err.value)
    with pytest.raises(ScheduleError, match="schedule is for"):
        apply_schedule(builtin_model, good)
    with apply_schedule(pixart, Schedule("diffusers:elsewhere", good.solver), strict=False):
        assert isinstance(pixart.scheduler, ScheduleScheduler)
    assert not isinstance(pixart.scheduler, ScheduleScheduler)
    afs = Schedule(name, SolverPlan(good.solver.timesteps, good.solver.steps, first_step="zero_x0"))
    with pytest.raises(ScheduleError, match="zero_x0"):
        apply_schedule(pixart, afs)
    layout = model_layout(load_model(name).info)
    bad_cache = Schedule(name, good.solver, baselines.fora_cache_plan(layout.replace("2", "3"), N, 2))
    with pytest.raises(ValueError, match="cache"):
        apply_schedule(pixart, bad_cache)
    assert not isinstance(pixart.scheduler, ScheduleScheduler)  # a failed apply leaves nothing behind
    assert not [m for m in pixart.transformer.modules() if hasattr(m, "_diffusers_hook")]
    with pytest.raises(TypeError, match="diffusers pipeline or a LoadedModel"):
        apply_schedule(object(), good)


def test_flow_pipeline_gets_model_time(saved):
    """SD3 (shift 3): the pipeline's network sees σ(t)·1000 and its loop equals our sampler on the LoadedModel."""
    pipe = _pipeline(saved["sd3"])
    name = f"diffusers:{saved['sd3']}"
    cond = embeddings("sd3", 2)
    plan = baselines.dpm_solver_plan([900.0, 700.0, 450.0, 200.0], 2)
    schedule = Schedule(name, plan, baselines.fora_cache_plan(model_layout(load_model(name).info), 4, 2))
    kw = {k: v.expand(2, *v.shape[1:]) for k, v in cond.items()}
    x = initial_noise(SEEDS, (4, 8, 8))
    with apply_schedule(pipe, schedule) as applied, torch.no_grad():
        shift = applied.model.noise_schedule.shift
        sigma = 3 * 0.9 / (1 + 2 * 0.9)
        assert shift == 3.0 and pipe.scheduler.timesteps[0].item() == pytest.approx(sigma * 1000)
        theirs = pipe(latents=x, num_inference_steps=4, height=16, width=16, output_type="latent", **kw).images
    with apply_schedule(load_model(name), schedule) as applied:
        ours = applied.sample(cond, SEEDS, 7.0, decode=False)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_flux_true_cfg_runs_a_cached_schedule_with_a_cache_per_pass(tmp_path):
    """Flux with true CFG calls the transformer twice per step (cond, then uncond). A FORA schedule applied to the
    stock pipeline keeps one cache per pass and equals our sampler doing the same by hand; before, the second call
    was refused mid-run ("the denoiser was called twice")."""
    build_pipeline("flux", tmp_path).save_pretrained(tmp_path / "flux")
    name = f"diffusers:{tmp_path / 'flux'}"
    model = load_model(name, resolution=16)
    plan = baselines.dpm_solver_plan([900.0, 700.0, 450.0, 200.0], 2)
    schedule = Schedule(name, plan, baselines.fora_cache_plan(model_layout(model.info), 4, 2))
    cond, neg = embeddings("flux", 2), embeddings("flux", 2, seed=2)
    x = initial_noise(SEEDS, model.info.sample_shape)
    pipe = _pipeline(tmp_path / "flux")
    kwargs = {**cond, **{f"negative_{k}": v for k, v in neg.items()}}
    with apply_schedule(pipe, schedule, resolution=16), torch.no_grad():
        packed = pipe._pack_latents(x, len(x), 4, 8, 8)
        out = pipe(latents=packed, num_inference_steps=4, height=16, width=16, guidance_scale=3.5,
                   true_cfg_scale=2.0, output_type="latent", **kwargs).images
        theirs = pipe._unpack_latents(out, 16, 16, pipe.vae_scale_factor)

    with apply_schedule(model, schedule) as applied, torch.no_grad():
        ours = true_cfg_per_pass(model, applied, cond, neg, 3.5, 2.0, x, plan)
        shared = true_cfg_per_pass(model, applied, cond, neg, 3.5, 2.0, x, plan, separate=False)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (shared - ours).abs().max() > 1e-3  # the per-pass caches matter
