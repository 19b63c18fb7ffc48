"""Unified sampler behaviour beyond diffusers equivalence: DC compensation, analytical first step, determinism."""

import copy
import math

import pytest
import torch

from schedsearch.runtime.models import _class_denoiser, initial_noise
from schedsearch.runtime.noise import VPSchedule, log_snr, to_data_and_noise
from schedsearch.runtime.sampler import _Output, dynamic_compensation, sample
from schedsearch.spaces import baselines
from schedsearch.spaces.schedule import SolverPlan

TS = baselines.linspace_timesteps(1000, 8)


class CountingDenoiser:
    def __init__(self, denoise):
        self.denoise, self.calls = denoise, []

    def __call__(self, x, t, i):
        self.calls.append((t, i))
        return self.denoise(x, t, i)


@pytest.fixture(scope="module")
def setup(builtin_model):
    denoise = builtin_model.denoiser(torch.tensor([1, 4, 8]), 2.0)
    x = initial_noise([5, 6, 7], builtin_model.info.sample_shape)
    return builtin_model, denoise, x


def test_all_ratios_one_is_the_plain_solver(setup):
    model, denoise, x = setup
    plan = baselines.unipc_plan(TS, 2)
    plain = sample(denoise, x, plan, model.noise_schedule)
    ones = sample(denoise, x, baselines.with_dc_ratios(plan, [1.0] * len(TS)), model.noise_schedule)
    assert torch.equal(plain, ones)
    ratios = [1.0, 1.0] + [0.97] * (len(TS) - 2)
    compensated = sample(denoise, x, baselines.with_dc_ratios(plan, ratios), model.noise_schedule)
    assert (compensated - plain).abs().max() > 1e-3


def test_lagrange_compensation_is_exact_on_quadratics():
    """DC-Solver interpolates the last 3 outputs in time: exact for outputs quadratic in t."""
    ts = [900.0, 700.0, 450.0]

    def f(t):
        return torch.full((2, 2), 0.3 + 0.01 * t - 2e-5 * t * t)

    history = [_Output(t=t, lam=0.0, x0=f(t), eps=2 * f(t)) for t in ts]
    out = dynamic_compensation(history, ratio=0.8, dc_order=2)
    tau = 700.0 + 0.8 * (450.0 - 700.0)
    assert torch.allclose(out.x0, f(tau), atol=1e-6)
    assert torch.allclose(out.eps, 2 * f(tau), atol=1e-6)
    assert out.t == 450.0
    same = dynamic_compensation(history, ratio=1.0, dc_order=2)
    assert torch.allclose(same.x0, f(450.0), atol=1e-6)


def test_analytical_first_step_skips_one_model_call(setup):
    model, denoise, x = setup
    plan = baselines.dpm_solver_plan(TS, 2)
    afs = SolverPlan(plan.timesteps, plan.steps, first_step="zero_x0")
    counter = CountingDenoiser(denoise)
    out = sample(counter, x, afs, model.noise_schedule)
    assert len(counter.calls) == afs.nfe == len(TS) - 1
    assert [i for _, i in counter.calls] == list(range(1, len(TS)))
    assert torch.isfinite(out).all()
    # at t = 999 the data estimate is nearly zero anyway, so AFS changes the result only slightly
    full = sample(denoise, x, plan, model.noise_schedule)
    assert 0 < (out - full).abs().mean() < 0.1


def test_model_called_at_plan_timesteps_in_order(setup):
    model, denoise, x = setup
    counter = CountingDenoiser(denoise)
    sample(counter, x, baselines.unipc_plan(TS, 3), model.noise_schedule)
    assert [t for t, _ in counter.calls] == list(TS)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 5e-4)])
def test_same_seed_same_image_whatever_the_batch(setup, dtype, tol):
    """Per-sample noise makes a sample independent of its batch; what is left is matmul rounding, which differs
    with the batch size on CPU (float32: ~7e-5 after 8 guided steps; float64: ~1e-14)."""
    model, _, _ = setup
    network = copy.deepcopy(model.network).to(dtype)
    make = _class_denoiser(network, 10)
    plan = baselines.dpm_solver_plan(TS, 2)
    labels, seeds = torch.tensor([0, 1, 2, 3, 4, 5]), [40, 41, 42, 43, 44, 45]

    def run(part: slice) -> torch.Tensor:
        x = initial_noise(seeds[part], (1, 28, 28)).to(dtype)
        return sample(make(labels[part], 2.0), x, plan, model.noise_schedule)

    whole = run(slice(0, 6))
    parts = torch.cat([run(s) for s in (slice(0, 1), slice(1, 4), slice(4, 6))])
    assert (parts - whole).abs().max() <= tol
    assert torch.equal(initial_noise([42], (1, 28, 28))[0], initial_noise([7, 42], (1, 28, 28))[1])


def test_final_timestep_stops_early(setup):
    model, denoise, x = setup
    plan = baselines.ddim_plan(TS, final_timestep=50.0)
    seen = []
    out = sample(denoise, x, plan, model.noise_schedule, callback=lambda i, state: seen.append(i))
    assert seen == list(range(len(TS)))
    clean = sample(denoise, x, baselines.ddim_plan(TS), model.noise_schedule)
    # stopping at t = 50 leaves noise of std σ_50 on top of the (nearly) clean image
    _, sigma = model.noise_schedule.alpha_sigma(50.0)
    assert 0.3 * sigma < (out - clean).std() < 3 * sigma


def test_vp_schedule_interpolates_in_log_sigma():
    schedule = VPSchedule.linear()
    s10, s11 = schedule.sigma_ratio(10.0), schedule.sigma_ratio(11.0)
    assert schedule.sigma_ratio(10.5) == pytest.approx(math.sqrt(s10 * s11), rel=1e-6)
    a, s = schedule.alpha_sigma(500.0)
    assert a * a + s * s == pytest.approx(1.0)
    assert log_snr(1.0, 0.0) == math.inf


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction", "flow_prediction"])
def test_output_conversion_recovers_data_and_noise(kind):
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    if kind == "flow_prediction":
        alpha, sigma = 0.7, 0.3
        raw = eps - x0
    else:
        alpha, sigma = 0.6, 0.8
        raw = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[kind]
    x = alpha * x0 + sigma * eps
    got_x0, got_eps = to_data_and_noise(raw, x, alpha, sigma, kind)
    assert torch.allclose(got_x0, x0, atol=1e-6)
    assert torch.allclose(got_eps, eps, atol=1e-6)
