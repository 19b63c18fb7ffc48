"""Exports that need no schedsearch at inference: each exported file, loaded by the stock library into the stock
pipeline (diffusers' `enable_cache` from the snippet; cache-dit's `load_configs` + `enable_cache`), reproduces
schedsearch's own run of that schedule."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers")

from test_diffusers_models import _pipeline, build_pipeline, embeddings  # noqa: E402

from schedsearch.results.runtime_export import NotExpressible, runtime_files  # noqa: E402
from schedsearch.runtime.diffusers_caches import calibrate_mag_ratios  # noqa: E402
from schedsearch.runtime.execute import run_batches  # noqa: E402
from schedsearch.runtime.models import initial_noise, load_model  # noqa: E402
from schedsearch.runtime.sampler import sample  # noqa: E402
from schedsearch.spaces.policy_plan import RuntimePolicy  # noqa: E402
from schedsearch.spaces.schedule import Schedule  # noqa: E402

STEPS = 8


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    build_pipeline("flux", root).save_pretrained(root / "pipe")
    torch.set_num_threads(1)
    return root / "pipe", load_model(f"diffusers:{root / 'pipe'}", resolution=16)


def _flux_policies(model) -> list[RuntimePolicy]:
    cond = embeddings("flux", 2)
    x = initial_noise([0, 1], model.info.sample_shape)
    plan = model.default_plan(STEPS)
    ratios = calibrate_mag_ratios(model.network, model.denoiser(cond, 3.5),
                                  lambda d: sample(d, x, plan, model.noise_schedule, "flow_prediction"), plan.nfe)
    return [
        RuntimePolicy("first_block_cache", {"threshold": 0.3}),
        RuntimePolicy("mag_cache", {"threshold": 0.3, "max_skip_steps": 2, "retention_ratio": 0.2,
                                    "mag_ratios": tuple(round(r, 5) for r in ratios)}),
        RuntimePolicy("taylorseer_cache", {"cache_interval": 3, "max_order": 1, "disable_cache_before_step": 2}),
        RuntimePolicy("pyramid_attention_broadcast", {"spatial_attention_block_skip_range": 2,
                                                      "spatial_attention_timestep_low": 100.0,
                                                      "spatial_attention_timestep_high": 900.0}),
    ]


def test_diffusers_export_enabled_on_the_stock_flux_pipeline_reproduces_our_run(flux, tmp_path):
    path, model = flux
    cond = embeddings("flux", 2)
    x = initial_noise([0, 1], model.info.sample_shape)
    uncached = torch.cat([im for _, im in run_batches(model, Schedule(model.info.name, model.default_plan(STEPS)),
                                                      cond, [0, 1], 3.5, decode=False)])
    for policy in _flux_policies(model):
        schedule = Schedule(model.info.name, model.default_plan(STEPS), policy=policy,
                            meta={"scheduler": "pipeline"}).validate()
        ours = torch.cat([im for _, im in run_batches(model, schedule, cond, [0, 1], 3.5, decode=False)])
        files = runtime_files(schedule, "diffusers", "s")
        assert set(files) == {"s.diffusers.json", "s.diffusers.py"}
        data = json.loads(files["s.diffusers.json"])
        assert data["num_inference_steps"] == STEPS and data["config_class"].endswith("Config")
        assert data["apply"] in files["s.diffusers.py"]
        # the JSON is the config class's own keyword arguments
        getattr(diffusers.hooks, data["config_class"])(**{
            k: (getattr(torch, v) if k == "taylor_factors_dtype" else v) for k, v in data["config"].items()})
        pipe = _pipeline(path)
        exec(files["s.diffusers.py"], {"pipe": pipe})  # what a user pastes, on the stock pipeline
        with torch.no_grad():
            packed = pipe._pack_latents(x, 2, 4, 8, 8)
            out = pipe(latents=packed, guidance_scale=3.5, **cond, num_inference_steps=STEPS, height=16, width=16,
                       output_type="latent").images
        theirs = pipe._unpack_latents(out, 16, 16, pipe.vae_scale_factor)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4, msg=policy.kind)
        assert (ours - uncached).abs().max() > 1e-3, f"{policy.kind} reused nothing: the test would prove nothing"


def test_cache_dit_yaml_loaded_into_the_stock_sd3_pipeline_reproduces_our_run(tmp_path, monkeypatch):
    pytest.importorskip("cache_dit")
    import cache_dit

    from schedsearch.runtime import builtin_flow

    model = load_model("builtin:mnist-flow")
    labels = [3, 7]
    x = initial_noise([0, 1], model.info.sample_shape)
    plan = model.default_plan(20)
    uncached = torch.cat([im for _, im in run_batches(model, Schedule(model.info.name, plan), labels, [0, 1], 2.0,
                                                      decode=False)])
    flow = builtin_flow.load_builtin_flow()
    monkeypatch.chdir(tmp_path)
    for settings in ({"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.12,
                      "max_warmup_steps": 4},
                     {"Fn_compute_blocks": 2, "Bn_compute_blocks": 1, "residual_diff_threshold": 0.2,
                      "max_warmup_steps": 3, "max_continuous_cached_steps": 2, "taylorseer_order": 1}):
        schedule = Schedule(model.info.name, plan, policy=RuntimePolicy("dbcache", settings),
                            meta={"scheduler": "pipeline"}).validate()
        ours = torch.cat([im for _, im in run_batches(model, schedule, labels, [0, 1], 2.0, decode=False)])
        files = runtime_files(schedule, "cache-dit", "s")
        for name, text in files.items():
            (tmp_path / name).write_text(text)
        pipe = builtin_flow.flow_pipeline(flow)
        exec(files["s.cache-dit.py"], {"pipe": pipe})
        try:
            with torch.no_grad():
                theirs = pipe(**flow.conditioner.embeddings(torch.tensor(labels)), latents=x, height=28, width=28,
                              num_inference_steps=20, guidance_scale=2.0, output_type="latent").images
        finally:
            cache_dit.disable_cache(pipe)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        assert (ours - uncached).abs().max() > 1e-3


def test_what_a_runtime_cannot_run_is_not_exported_and_says_why(flux):
    _, model = flux
    plan = model.default_plan(STEPS)
    fbc = RuntimePolicy("first_block_cache", {"threshold": 0.1})
    assert isinstance(runtime_files(Schedule(model.info.name, plan), "diffusers", "s"), NotExpressible)
    found = runtime_files(Schedule(model.info.name, plan, policy=fbc), "diffusers", "s")  # no stock scheduler
    assert isinstance(found, NotExpressible) and "stock scheduler" in found.reason
    other = runtime_files(Schedule(model.info.name, plan, policy=fbc, meta={"scheduler": "pipeline"}), "cache-dit",
                          "s")
    assert isinstance(other, NotExpressible) and "--format diffusers" in other.reason


def test_static_plans_exported_as_cache_dit_masks_reproduce_our_run(tmp_path):
    """A CacheQuant unit and a block-skipping ECAD plan, written as DBCache static steps masks, run by cache-dit
    (its registered DiT adapter, from the YAML) equal schedsearch's own cache hooks; what cache-dit cannot run (a
    unit from block 0, FORA's component reuse) is refused with the reason."""
    pytest.importorskip("cache_dit")
    import cache_dit

    from schedsearch.runtime.cache_dit_runtime import patch_state, restore_patch_state
    from schedsearch.runtime.models import model_layout
    from schedsearch.spaces.baselines import fora_cache_plan
    from schedsearch.spaces.cache_plan import ComponentCachePlan
    from schedsearch.study import build_space

    model = load_model("builtin:mnist-dit")
    net = model.network
    unit_space = build_space("cachequant", model.info, "quick", {"num_steps": 10, "unit": [1, 5]})
    unit = unit_space.decode(unit_space.refresh_genome([0, 3, 6, 8]))
    layout = model_layout(model.info)
    rows = ["11" * 6 if i in (0, 2, 5, 7, 9) else "11" * 2 + "00" * 3 + "11" for i in range(10)]
    skip = Schedule(model.info.name, unit.solver, ComponentCachePlan(layout, tuple(rows), skip_reused_blocks=True))
    labels, seeds = [3, 7], [0, 1]
    x = initial_noise(seeds, model.info.sample_shape)
    # the unit adds one residual as cache-dit does; block skipping adds the blocks' residuals one by one, which
    # telescope to the same sum up to float32 rounding (measured 2.6e-5 after 10 steps)
    for schedule, tolerance in ((unit, 1e-5), (skip, 1e-4)):
        ours = torch.cat([im for _, im in run_batches(model, schedule, labels, seeds, 2.0, decode=False)])
        files = runtime_files(schedule, "cache-dit", "s")
        assert isinstance(files, dict), files
        (tmp_path / "s.cache-dit.yaml").write_text(files["s.cache-dit.yaml"])
        assert "steps_computation_policy: static" in files["s.cache-dit.yaml"]
        before = patch_state(net)
        cache_dit.enable_cache(net, **cache_dit.load_configs(str(tmp_path / "s.cache-dit.yaml")))
        cache_dit.refresh_context(net)
        try:
            with torch.no_grad():
                theirs = sample(model.denoiser(labels, 2.0), x, schedule.solver, model.noise_schedule)
        finally:
            cache_dit.disable_cache(net)
            restore_patch_state(net, before)
        torch.testing.assert_close(theirs, ours, rtol=tolerance, atol=tolerance)
    from_zero = unit_space.decode(unit_space.refresh_genome([0, 5]))
    zero_unit = Schedule(model.info.name, from_zero.solver,
                         type(from_zero.cache)("transformer_blocks", 0, 6, (0, 5), 10), meta={"num_blocks": 6})
    assert "Fn ≥ 1" in runtime_files(zero_unit, "cache-dit", "s").reason
    fora = Schedule(model.info.name, unit.solver, fora_cache_plan(layout, 10, 2))
    assert isinstance(runtime_files(fora, "cache-dit", "s"), NotExpressible)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("solver_export")
    out = {}
    for family in ("pixart", "sd3"):
        build_pipeline(family, root).save_pretrained(root / family)
        out[family] = (root / family, load_model(f"diffusers:{root / family}"))
    return out


def test_solver_plans_of_one_rule_export_as_a_stock_scheduler_the_pipeline_runs(pipelines):
    """DPM-Solver++ 1M/2M/3M on custom timesteps (VP PixArt) and FlowMatch Euler on custom sigmas (SD3, shift 3:
    the pipeline shifts the exported unshifted σ itself): the snippet on the stock pipeline, called with the
    exported `timesteps=` / `sigmas=`, equals our sampler's run of the plan."""
    from schedsearch.results.runtime_export import solver_files
    from schedsearch.spaces.baselines import ddim_plan, dpm_solver_plan

    cases = [("pixart", "vp", dpm_solver_plan([951.0, 700.0, 480.0, 260.0, 90.0], order=k)) for k in (1, 2, 3)]
    cases += [("pixart", "vp", ddim_plan([900.0, 500.0, 100.0]))]
    cases += [("sd3", "flow", ddim_plan([1000.0, 820.0, 550.0, 300.0]))]
    for family, kind, plan in cases:
        path, model = pipelines[family]
        schedule = Schedule(model.info.name, plan)
        files = solver_files(schedule, "s", kind)
        assert isinstance(files, dict), files
        cond = embeddings(family, 2)
        x = initial_noise([0, 1], model.info.sample_shape)
        with torch.no_grad():
            ours = sample(model.denoiser(cond, 4.5), x, plan, model.noise_schedule, model.info.prediction_type)
        pipe = _pipeline(path)
        namespace = {"pipe": pipe}
        exec(files["s.diffusers-scheduler.py"], namespace)
        argument = {k.lower(): v for k, v in namespace.items() if k in ("TIMESTEPS", "SIGMAS")}
        batch = {k: v.expand(2, *v.shape[1:]) for k, v in cond.items()}
        if family == "pixart":  # as the adapter runs it: no resolution binning, its default negative mask
            batch |= {"use_resolution_binning": False, "negative_prompt": None,
                      "negative_prompt_attention_mask": torch.ones(2, 5, dtype=torch.long)}
        with torch.no_grad():
            theirs = pipe(latents=x, guidance_scale=4.5, height=16, width=16, output_type="latent",
                          **argument, **batch).images
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4, msg=f"{family} {plan.steps[1]}")


def test_solver_plans_no_stock_scheduler_runs_are_not_exported():
    from schedsearch.results.runtime_export import solver_files
    from schedsearch.spaces.baselines import linspace_timesteps, unipc_plan

    ts = linspace_timesteps(1000, 6)
    unipc = Schedule("m", unipc_plan(ts, order=2))  # correctors
    assert "corrector" in solver_files(unipc, "s", "vp").reason
    assert "VP or flow" in solver_files(Schedule("m", unipc_plan(ts, order=2, corrector=False)), "s", None).reason


def test_model_time_kind_reads_local_configs_only(pipelines, flux):
    from schedsearch.results.runtime_export import model_time_kind

    assert model_time_kind("builtin:mnist-dit") == "vp" and model_time_kind("builtin:mnist-flow") == "flow"
    assert model_time_kind(f"diffusers:{pipelines['pixart'][0]}") == "vp"
    assert model_time_kind(f"diffusers:{pipelines['sd3'][0]}") == "flow"
    assert model_time_kind(f"diffusers:{flux[0]}") == "flow"
    assert model_time_kind("diffusers:/nowhere/at/all") is None


def test_a_policy_on_another_stock_scheduler_exports_and_reproduces_on_the_stock_pipeline(pipelines):
    """The policy space's solver gene (`solvers`): UniPC built from PixArt's own scheduler config, with a
    FirstBlockCache policy. The exported snippet swaps UniPC in by name and enables the config; PixArt's loop opens no
    cache context, so the call runs inside one, as the snippet says. Equal to schedsearch's run."""
    from schedsearch.study import build_space

    path, model = pipelines["pixart"]
    cond = embeddings("pixart", 2)
    space = build_space("policy", model.info, "quick", {"kinds": ["first_block_cache"], "steps_range": [4, 6],
                                                         "solvers": ["UniPCMultistepScheduler"]},
                        model=model, conditions=[cond], guidance=4.5)
    assert space.genome.names[-1] == "solver"
    x_genes = space.encode(space.baselines()[0][1])
    x_genes[0], x_genes[-1] = 5, 1  # 5 steps, UniPC
    x_genes[space._slices["first_block_cache"]] = np.log10(0.3)
    schedule = space.decode(x_genes)
    assert schedule.meta["scheduler"] == "UniPCMultistepScheduler" and schedule.solver.steps[0].corrector
    assert space.decode(space.encode(schedule)).key == schedule.key
    x = initial_noise([0, 1], model.info.sample_shape)
    ours = torch.cat([im for _, im in run_batches(model, schedule, cond, [0, 1], 4.5, decode=False)])
    files = runtime_files(schedule, "diffusers", "s")
    assert "UniPCMultistepScheduler.from_config(pipe.scheduler.config)" in files["s.diffusers.py"]
    pipe = _pipeline(path)
    exec(files["s.diffusers.py"], {"pipe": pipe})
    batch = {k: v.expand(2, *v.shape[1:]) for k, v in cond.items()}
    from diffusers.hooks import HookRegistry
    from diffusers.models.cache_utils import CacheMixin

    for _ in range(2):  # twice: the state is reset between calls as the snippet says, so both calls are the same
        HookRegistry.check_if_exists_or_initialize(pipe.transformer).reset_stateful_hooks()
        with torch.no_grad(), CacheMixin.cache_context(pipe.transformer, "cond"):
            theirs = pipe(latents=x, guidance_scale=4.5, height=16, width=16, output_type="latent",
                          num_inference_steps=5, use_resolution_binning=False, negative_prompt=None,
                          negative_prompt_attention_mask=torch.ones(2, 5, dtype=torch.long), **batch).images
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    uncached = torch.cat([im for _, im in run_batches(model, Schedule(model.info.name, schedule.solver), cond,
                                                      [0, 1], 4.5, decode=False)])
    assert (ours - uncached).abs().max() > 1e-4
