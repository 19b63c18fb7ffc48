"""DC-Solver calibration: differentiable compensation, greedy ratio fit, cascade polynomial regression."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from schedsearch.calibration import dc_fit
from schedsearch.calibration.dc_fit import (
    CascadeRegression,
    FittedRatios,
    TeacherSpec,
    cascade_leave_one_out,
    dc_schedule,
    fit_dc_ratios,
    student_plan,
    teacher_timesteps,
    teacher_trajectory,
)
from schedsearch.runtime.models import initial_noise
from schedsearch.runtime.noise import log_snr, to_data_and_noise
from schedsearch.runtime.sampler import _Output, corrector_step, dynamic_compensation, predictor_step, sample
from schedsearch.spaces.baselines import with_dc_ratios

CLASSES, SEEDS = [1, 3, 7, 9], [21, 22, 23, 24]
SPEC = TeacherSpec("ddim", 60)


def _history(seed: int = 0) -> list[_Output]:
    g = torch.Generator().manual_seed(seed)
    return [
        _Output(t=t, lam=0.1 * k, x0=torch.randn(3, 1, 4, 4, generator=g), eps=torch.randn(3, 1, 4, 4, generator=g))
        for k, t in enumerate((999.0, 799.0, 599.0))
    ]


def test_tensor_ratio_equals_float_ratio_and_is_differentiable():
    history = _history()
    for r in (1.0, 0.87, 1.23):
        plain = dynamic_compensation(history, r, 2)
        ratio = torch.tensor(r, dtype=torch.float64, requires_grad=True)
        diff = dynamic_compensation(history, ratio, 2)
        assert (diff.x0 - plain.x0).abs().max() <= 1e-6
        assert (diff.eps - plain.eps).abs().max() <= 1e-6
        assert diff.x0.dtype == torch.float32
        diff.x0.sum().backward()
        assert ratio.grad is not None and ratio.grad.abs() > 0


def test_teacher_grid_passes_through_the_student_timesteps():
    required = student_plan(1000, 7).timesteps
    grid = teacher_timesteps(TeacherSpec("ddim", 100), required)
    assert set(required) <= set(grid)
    assert grid[0] == 999.0 and grid[-1] == 0.0
    assert all(a > b for a, b in itertools.pairwise(grid))
    assert 95 <= len(grid) <= 108
    assert min(a - b for a, b in itertools.pairwise(grid)) > 0.4 * 999 / 99


@pytest.fixture(scope="module")
def teacher(builtin_model):
    return teacher_trajectory(
        builtin_model, guidance=2.0, classes=CLASSES, seeds=SEEDS, record=student_plan(1000, 5).timesteps, spec=SPEC
    )


def _context_at_step_2(model, teacher) -> "dc_fit._StepContext":
    """Walk the plain NFE-5 plan to step 2 (the first compensated step) as the fitter does."""
    plan = student_plan(1000, 5)
    sched, denoise = model.noise_schedule, model.denoiser(CLASSES, 2.0)
    x, history, x_before = initial_noise(SEEDS, model.info.sample_shape), [], None
    ts = plan.timesteps
    for i in range(3):
        a, s = sched.alpha_sigma(ts[i])
        x0, eps = to_data_and_noise(denoise(x, ts[i], i), x, a, s, "epsilon")
        current = _Output(ts[i], log_snr(a, s), x0, eps)
        if i > 0:
            x = corrector_step(x_before, history, current, sched.alpha_sigma(ts[i - 1]), (a, s), plan.steps[i - 1])
        history.append(current)
        if i == 2:
            break
        x_before = x
        x = predictor_step(x, history, (a, s), sched.alpha_sigma(ts[i + 1]), plan.steps[i])
    end = sched.alpha_sigma(ts[3])
    return dc_fit._StepContext(x, history, plan, 2, (a, s), end, teacher.state_at(ts[3]), denoise, "epsilon")


def test_forward_mode_gradient_matches_central_difference(builtin_model, teacher):
    """The loss of a corrected step depends on r also through the model at the predicted point; the forward-mode
    derivative must include it."""
    ctx = _context_at_step_2(builtin_model, teacher)
    mode = ["forward_ad"]
    loss, grad = dc_fit._loss_and_grad(ctx, 1.0, mode)
    assert mode == ["forward_ad"]
    h = 1e-2
    with torch.no_grad():
        fd = (float(dc_fit._step_loss(ctx, 1.0 + h)) - float(dc_fit._step_loss(ctx, 1.0 - h))) / (2 * h)
        assert loss == pytest.approx(float(dc_fit._step_loss(ctx, 1.0)), rel=1e-4)
    assert grad != 0.0
    assert grad == pytest.approx(fd, rel=2e-2, abs=1e-7)


def test_fit_reduces_mse_to_the_teacher_and_matches_the_sampler(builtin_model, teacher):
    fitted = fit_dc_ratios(
        builtin_model,
        nfe=5,
        guidance=2.0,
        classes=CLASSES,
        seeds=SEEDS,
        teacher_steps=SPEC.steps,
        iterations=8,
        teacher=teacher,
        progress=False,
    )
    assert fitted.ratios[:2] == (1.0, 1.0)  # warm-up
    assert any(abs(r - 1.0) > 1e-3 for r in fitted.ratios[2:])  # gradients flow from r = 1
    assert fitted.mse_after < fitted.mse_before
    assert math.isnan(fitted.step_mse[0]) and fitted.step_mse[-1] == pytest.approx(fitted.mse_after, rel=1e-4)
    # the fitted walk is exactly the sampler run with the fitted ratios
    schedule = dc_schedule("builtin:mnist-dit", student_plan(1000, 5), fitted)
    x = initial_noise(SEEDS, builtin_model.info.sample_shape)
    out = sample(builtin_model.denoiser(CLASSES, 2.0), x, schedule.solver, builtin_model.noise_schedule)
    assert float((out.double() - teacher.final.double()).square().mean()) == pytest.approx(fitted.mse_after, rel=1e-9)
    again = FittedRatios.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert json.dumps(again.to_dict()) == json.dumps(fitted.to_dict())


def test_dc_schedule_carries_the_ratios():
    plan = student_plan(1000, 6)
    ratios = (1.0, 1.0, 0.9, 1.1, 1.05, 1.2)
    schedule = dc_schedule("builtin:mnist-dit", plan, ratios)
    assert tuple(s.dc_ratio for s in schedule.solver.steps) == ratios
    assert schedule.solver == with_dc_ratios(plan, ratios)


def _synthetic_fits(cpr: CascadeRegression) -> list[FittedRatios]:
    return [
        FittedRatios(nfe=n, guidance=g, ratios=cpr.predict(n, g))
        for n in (5, 6, 7, 8, 10, 12, 15, 20)
        for g in (1.0, 2.0, 3.0, 5.0, 7.5)
    ]


def test_cascade_regression_recovers_known_coefficients_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    truth = CascadeRegression.from_array(rng.normal(scale=0.3, size=(4, 3, 3)))
    fits = _synthetic_fits(truth)
    fitted = CascadeRegression.fit(fits)
    assert np.abs(fitted.array - truth.array).max() <= 1e-8
    for n, g in ((9, 4.0), (5, 1.5), (25, 7.5)):
        predicted = fitted.predict(n, g)
        assert len(predicted) == n and predicted[:2] == (1.0, 1.0)
        assert np.allclose(predicted, truth.predict(n, g), atol=1e-9)
    path = fitted.save(tmp_path / "cpr.json")
    loaded = CascadeRegression.load(path)
    assert loaded == fitted and loaded.predict(9, 4.0) == fitted.predict(9, 4.0)
    assert "coefficients_kjl" in path.read_text()


def test_cascade_leave_one_out_is_exact_on_cascade_data():
    truth = CascadeRegression.from_array(np.random.default_rng(1).normal(scale=0.2, size=(4, 3, 3)))
    report = cascade_leave_one_out(_synthetic_fits(truth))
    assert len(report.mse) == 40 and report.mean_mse < 1e-14
    assert report.mean_mse_ones > 1e-4
