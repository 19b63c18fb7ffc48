"""A pipeline's own scheduler as a plan: the plan reproduces diffusers' scheduler loop (settings included: Karras
sigmas, spacing, flow shift, the flow variants of DPM-Solver++ and UniPC), in float64 so any algorithmic or timing
difference shows (those are ≥ 1e-2; see test_sampler_equivalence)."""

import copy

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from schedsearch.errors import UserInputError
from schedsearch.runtime import builtin_flow
from schedsearch.runtime.diffusers_models import loaded_model_from_pipeline
from schedsearch.runtime.models import _class_denoiser, initial_noise
from schedsearch.runtime.sampler import sample
from schedsearch.runtime.scheduler_plan import plan_from_scheduler
from schedsearch.spaces.schedule import Schedule

BETAS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
TOL = 1e-4
# Euler keeps its state in the VE scaling x/α (|x| up to σ_max/α ≈ 157 here) with float32 sigmas: rounding alone puts
# ~2e-4 into the result (measured); algorithmic differences are ≥ 1e-2
TOL_VE_STATE = 1e-3


def run_diffusers(scheduler, num_steps, denoise, x, **kwargs):
    scheduler.set_timesteps(num_steps, **kwargs)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    for i, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = denoise(scaled, float(t), i)
        x = scheduler.step(out, t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def dit(builtin_model):
    network = copy.deepcopy(builtin_model.network).double()
    return _class_denoiser(network, 10)(torch.tensor([3, 7]), 2.0), builtin_model.noise_schedule


@pytest.fixture(scope="module")
def flow_net():
    torch.manual_seed(0)
    return builtin_flow.build_flow().eval().double()


def flow_model(net, shift):
    """The flow model through the SD3 adapter, its pipeline's scheduler at `shift`."""
    pipe = builtin_flow.flow_pipeline(net)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return loaded_model_from_pipeline(pipe, class_conditioner=net.conditioner.embeddings, num_classes=10)


VP = [
    ("dpm++2m-karras", lambda: DPMSolverMultistepScheduler(**BETAS, use_karras_sigmas=True)),
    ("dpm++3m-exponential", lambda: DPMSolverMultistepScheduler(**BETAS, solver_order=3, use_exponential_sigmas=True)),
    ("dpm++2m-trailing", lambda: DPMSolverMultistepScheduler(**BETAS, timestep_spacing="trailing")),
    ("unipc-karras", lambda: UniPCMultistepScheduler(**BETAS, use_karras_sigmas=True)),
    ("euler", lambda: EulerDiscreteScheduler(**BETAS)),
    ("euler-karras-leading", lambda: EulerDiscreteScheduler(**BETAS, use_karras_sigmas=True,
                                                            timestep_spacing="leading", steps_offset=1)),
    ("ddim-leading-offset", lambda: DDIMScheduler(**BETAS, clip_sample=False, steps_offset=1)),
    ("ddim-clip-sample", lambda: DDIMScheduler(**BETAS, clip_sample=True, clip_sample_range=0.8)),
]


@pytest.mark.parametrize(("name", "make"), VP, ids=[v[0] for v in VP])
def test_vp_scheduler_plans_match_diffusers(dit, name, make):
    denoise, schedule = dit
    x = initial_noise([11, 12], (1, 28, 28)).double()
    plan = plan_from_scheduler(make(), 8, schedule)
    ours = sample(denoise, x.clone(), plan, schedule)
    theirs = run_diffusers(make(), 8, denoise, x.clone())
    assert (ours - theirs).abs().max().item() <= (TOL_VE_STATE if name.startswith("euler") else TOL)


def test_karras_needs_the_rounded_network_time(dit):
    """Guards the point of network_timesteps: calling the network at the exact time differs by far more."""
    denoise, schedule = dit
    x = initial_noise([11, 12], (1, 28, 28)).double()
    make = VP[0][1]
    plan = plan_from_scheduler(make(), 8, schedule)
    assert plan.network_timesteps is not None
    exact = sample(denoise, x.clone(), type(plan)(plan.timesteps, plan.steps, plan.final_timestep), schedule)
    theirs = run_diffusers(make(), 8, denoise, x.clone())
    assert (exact - theirs).abs().max().item() > 10 * TOL


FLOW = [
    ("flowmatch-euler", lambda s: FlowMatchEulerDiscreteScheduler(shift=s)),
    ("dpm++2m-flow", lambda s: DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                           flow_shift=s)),
    ("dpm++3m-flow", lambda s: DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                           flow_shift=s, solver_order=3)),
    ("unipc-flow", lambda s: UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                     flow_shift=s)),
]


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize(("name", "make"), FLOW, ids=[f[0] for f in FLOW])
def test_flow_scheduler_plans_match_diffusers(flow_net, name, make, shift):
    model = flow_model(flow_net, shift)
    schedule = model.noise_schedule
    assert schedule.shift == shift
    denoise = model.denoiser(torch.tensor([3, 7]), guidance=2.0)
    x = initial_noise([11, 12], (1, 28, 28)).double()
    plan = plan_from_scheduler(make(shift), 6, schedule)
    ours = sample(denoise, x.clone(), plan, schedule, "flow_prediction")
    # diffusers' loop hands the network σ·T; the model's denoiser takes model time (it applies σ(t)·T itself)
    unit = schedule.num_train_timesteps
    theirs = run_diffusers(make(shift), 6, lambda x, t, i: denoise(x, schedule.time_at(t / unit), i), x.clone())
    assert (ours - theirs).abs().max().item() <= TOL


def test_plan_survives_the_schedule_file(dit):
    _, schedule = dit
    plan = plan_from_scheduler(VP[0][1](), 8, schedule)
    again = Schedule.from_dict(Schedule("builtin:mnist-dit", plan).to_dict()).solver
    assert again == plan and again.network_timesteps == plan.network_timesteps
    plain = plan_from_scheduler(DDIMScheduler(**BETAS, clip_sample=False), 8, schedule)
    assert plain.network_timesteps is None  # integer timesteps: nothing to round, the key is unchanged
    assert "network_timesteps" not in Schedule("m", plain).to_dict()["solver"]


@pytest.mark.parametrize(("scheduler", "setting"), [
    (lambda: DDIMScheduler(**BETAS, thresholding=True), "thresholding"),
    (lambda: DPMSolverMultistepScheduler(**BETAS, thresholding=True), "thresholding"),
    (lambda: DPMSolverMultistepScheduler(**BETAS, algorithm_type="sde-dpmsolver++"), "algorithm_type"),
    (lambda: DPMSolverMultistepScheduler(**BETAS, solver_type="heun"), "solver_type"),
    (lambda: UniPCMultistepScheduler(**BETAS, lower_order_final=False), "lower_order_final"),
])
def test_inexpressible_settings_are_named(dit, scheduler, setting):
    with pytest.raises(UserInputError, match=setting):
        plan_from_scheduler(scheduler(), 8, dit[1])


def test_unsupported_scheduler_is_named(dit):
    from diffusers import PNDMScheduler

    with pytest.raises(UserInputError, match="PNDMScheduler is not supported"):
        plan_from_scheduler(PNDMScheduler(**BETAS), 8, dit[1])


def test_euler_start_scale_round_trips_and_is_bounded(dit):
    """Euler with linspace spacing starts from σ_max·ε in x/α: the plan's noise_scale, kept in the JSON only when
    it is not 1, and refused outside [0.5, 1.5]."""
    import dataclasses

    from schedsearch.spaces.errors import ScheduleError

    sdxl_like = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear")
    plan = plan_from_scheduler(sdxl_like, 8, VPScheduleOf(sdxl_like))
    assert 0.99 < plan.noise_scale < 1.0
    again = Schedule.from_dict(Schedule("m", plan).to_dict()).solver
    assert again.noise_scale == plan.noise_scale
    with pytest.raises(ScheduleError, match="noise_scale"):
        dataclasses.replace(plan, noise_scale=3.0).validate()


def VPScheduleOf(scheduler):
    from schedsearch.runtime.diffusers_models import noise_schedule_of

    return noise_schedule_of(scheduler, 0)


def test_clipping_matters(dit):
    """Guards the clip_sample case: the same DDIM without clipping lands far from diffusers' clipped run."""
    denoise, schedule = dit
    x = initial_noise([11, 12], (1, 28, 28)).double()
    clipped = plan_from_scheduler(DDIMScheduler(**BETAS, clip_sample_range=0.8), 8, schedule)
    assert clipped.clip_x0 == 0.8 and Schedule.from_dict(Schedule("m", clipped).to_dict()).solver == clipped
    import dataclasses

    unclipped = sample(denoise, x.clone(), dataclasses.replace(clipped, clip_x0=None), schedule)
    theirs = run_diffusers(DDIMScheduler(**BETAS, clip_sample_range=0.8), 8, denoise, x.clone())
    assert (unclipped - theirs).abs().max().item() > 10 * TOL
