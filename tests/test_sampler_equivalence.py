"""The unified sampler reproduces diffusers' own schedulers on the builtin model (same timesteps, same noise).

The comparison runs the model and the state in float64: in float32, rounding (≈1e-6 a step, in both codes) is
amplified by the sampling ODE with guidance to ~2e-4 after 10 steps, which would hide the algorithm behind the
arithmetic. diffusers still computes its step coefficients in float32, which is what the tolerance absorbs.
"""

import copy

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from schedsearch.runtime.models import _class_denoiser, initial_noise
from schedsearch.runtime.sampler import sample
from schedsearch.spaces import baselines

TOL = 1e-4
# Noise-form (DPM-Solver / UniPC predict_x0=False) steps multiply x by α_t/α_s ≈ 6 at the first steps, so diffusers'
# float32 coefficients alone put 4e-6 into the first step and ~3e-4 into the result at 5 steps (measured, float64
# state): a looser bound that still fails on any algorithmic difference (those are ≥ 1e-2).
TOL_NOISE_FORM = 1e-3
BETAS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


def run_diffusers(scheduler, num_steps, denoise, x):
    scheduler.set_timesteps(num_steps)
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(denoise(x, float(t), i), t, x).prev_sample
    return x, [float(t) for t in scheduler.timesteps]


# (name, diffusers scheduler factory, our plan builder from diffusers' timesteps)
CORE = [
    ("ddim", lambda: DDIMScheduler(**BETAS, clip_sample=False), lambda ts: baselines.ddim_plan(ts)),
    *[
        (
            f"dpmsolver++{k}",
            lambda k=k: DPMSolverMultistepScheduler(**BETAS, solver_order=k),
            lambda ts, k=k: baselines.dpm_solver_plan(ts, k),
        )
        for k in (1, 2, 3)
    ],
    *[
        (
            f"unipc-bh{b}-{k}",
            lambda b=b, k=k: UniPCMultistepScheduler(**BETAS, solver_order=k, solver_type=f"bh{b}"),
            lambda ts, b=b, k=k: baselines.unipc_plan(ts, k, rule=f"bh{b}"),
        )
        for b, k in ((2, 2), (2, 3))
    ],
    # diffusers' UniPC bh1 returns NaN when its last step goes to σ = 0 (B(h) = h = -inf), so it ends at t = 0.
    (
        "unipc-bh1-2",
        lambda: UniPCMultistepScheduler(**BETAS, solver_order=2, solver_type="bh1", final_sigmas_type="sigma_min"),
        lambda ts: baselines.unipc_plan(ts, 2, rule="bh1", final_timestep=0.0),
    ),
]
EXTRA = [
    ("ddim-noise", lambda: DDIMScheduler(**BETAS, clip_sample=False), lambda ts: baselines.ddim_plan(ts, "noise")),
    (
        "dpmsolver2-noise",
        lambda: DPMSolverMultistepScheduler(
            **BETAS, solver_order=2, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"
        ),
        lambda ts: baselines.dpm_solver_plan(ts, 2, prediction="noise", final_timestep=0.0),
    ),
    (
        "unipc-bh2-1",
        lambda: UniPCMultistepScheduler(**BETAS, solver_order=1, solver_type="bh2"),
        lambda ts: baselines.unipc_plan(ts, 1, rule="bh2"),
    ),
    (
        "unipc-bh1-3",
        lambda: UniPCMultistepScheduler(**BETAS, solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"),
        lambda ts: baselines.unipc_plan(ts, 3, rule="bh1", final_timestep=0.0),
    ),
    (
        "unipc-bh2-2-noise",
        lambda: UniPCMultistepScheduler(**BETAS, solver_order=2, predict_x0=False, final_sigmas_type="sigma_min"),
        lambda ts: baselines.unipc_plan(ts, 2, prediction="noise", final_timestep=0.0),
    ),
    (
        "unipc-disable-corrector",
        lambda: UniPCMultistepScheduler(**BETAS, solver_order=2, disable_corrector=[0, 1, 2]),
        lambda ts: baselines.unipc_plan(ts, 2, disable_corrector=[0, 1, 2]),
    ),
]


@pytest.fixture(scope="module")
def double_model(builtin_model):
    return copy.deepcopy(builtin_model.network).double()


def compare(builtin_model, network, make_scheduler, make_plan, num_steps, guidance, dtype=torch.float64):
    denoise = _class_denoiser(network, 10)(torch.tensor([3, 7]), guidance)
    x_start = initial_noise([11, 12], builtin_model.info.sample_shape).to(dtype)
    expected, timesteps = run_diffusers(make_scheduler(), num_steps, denoise, x_start.clone())
    plan = make_plan(timesteps)
    assert plan.nfe == num_steps
    ours = sample(denoise, x_start.clone(), plan, builtin_model.noise_schedule)
    assert torch.isfinite(expected).all()
    assert ours.dtype == dtype
    return (ours - expected).abs().max().item()


@pytest.mark.parametrize("guidance", [1.0, 2.0])
@pytest.mark.parametrize("num_steps", [5, 10, 20])
@pytest.mark.parametrize(("name", "make_scheduler", "make_plan"), CORE, ids=[c[0] for c in CORE])
def test_matches_diffusers(builtin_model, double_model, name, make_scheduler, make_plan, num_steps, guidance):
    diff = compare(builtin_model, double_model, make_scheduler, make_plan, num_steps, guidance)
    assert diff <= TOL, f"{name} NFE {num_steps} guidance {guidance}: max |Δ| = {diff:.2e}"


@pytest.mark.parametrize(("name", "make_scheduler", "make_plan"), EXTRA, ids=[c[0] for c in EXTRA])
def test_matches_diffusers_variants(builtin_model, double_model, name, make_scheduler, make_plan):
    diff = compare(builtin_model, double_model, make_scheduler, make_plan, 10, 2.0)
    tol = TOL_NOISE_FORM if "noise" in name else TOL
    assert diff <= tol, f"{name}: max |Δ| = {diff:.2e}"


def test_float32_run_stays_close_to_diffusers(builtin_model):
    """In production precision the two codes agree to what float32 rounding allows."""
    make_scheduler, make_plan = CORE[2][1], CORE[2][2]  # DPM-Solver++(2M)
    diff = compare(builtin_model, builtin_model.network, make_scheduler, make_plan, 20, 2.0, dtype=torch.float32)
    assert diff <= 1e-3


def test_algorithms_differ_beyond_tolerance(builtin_model, double_model):
    """Guards the tolerance: two genuinely different solvers on the same timesteps differ by far more than TOL."""
    make_scheduler = CORE[2][1]
    diff = compare(builtin_model, double_model, make_scheduler, lambda ts: baselines.unipc_plan(ts, 2), 10, 2.0)
    assert diff > 10 * TOL_NOISE_FORM
