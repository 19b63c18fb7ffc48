"""Cache plans run through diffusers hooks: exact when recomputing everything, no trace when removed, real savings."""

import dataclasses

import pytest
import torch

from schedsearch.objectives.cost import analytic_macs_table, observe_units, schedule_cost
from schedsearch.runtime.cache_hooks import CachePlanMismatchError, CacheRuntime, model_layout
from schedsearch.runtime.models import initial_noise
from schedsearch.runtime.sampler import sample
from schedsearch.spaces import baselines
from schedsearch.spaces.cache_plan import ComponentCachePlan, UnitCachePlan

PLAN = baselines.dpm_solver_plan(baselines.linspace_timesteps(1000, 6), 2)
N = PLAN.num_steps


@pytest.fixture(scope="module")
def env(builtin_model):
    denoise = builtin_model.denoiser(torch.tensor([2, 7]), 2.0)
    x = initial_noise([3, 4], builtin_model.info.sample_shape)
    reference = sample(denoise, x, PLAN, builtin_model.noise_schedule)
    return builtin_model, denoise, x, reference


def run(model, denoise, x, cache_plan):
    with CacheRuntime(model.network, model.info, cache_plan) as runtime:
        return sample(runtime.wrap(denoise), x, PLAN, model.noise_schedule), runtime


class ComputeCounter:
    """Counts real computations of a module by watching a submodule only a real forward reaches."""

    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_hook(lambda *_: setattr(self, "count", self.count + 1))


def test_recompute_everything_is_bit_identical(env):
    model, denoise, x, reference = env
    out, _ = run(model, denoise, x, ComponentCachePlan.full(model_layout(model.info), N))
    assert torch.equal(out, reference)
    out, _ = run(model, denoise, x, UnitCachePlan("transformer_blocks", 1, 5, tuple(range(N)), N))
    assert torch.equal(out, reference)


def test_removing_hooks_leaves_no_trace(env):
    model, denoise, x, reference = env
    run(model, denoise, x, baselines.fora_cache_plan(model_layout(model.info), N, 2))
    for module in model.network.modules():
        assert not hasattr(module, "_diffusers_hook")
        assert "forward" not in module.__dict__
    assert torch.equal(sample(denoise, x, PLAN, model.noise_schedule), reference)


def test_fora_reuses_and_saves_computation(env):
    model, denoise, x, reference = env
    block0 = model.network.transformer_blocks[0]
    attn_calls, ff_calls = ComputeCounter(block0.attn1.to_q), ComputeCounter(block0.ff.net[0])
    try:
        out, runtime = run(model, denoise, x, baselines.fora_cache_plan(model_layout(model.info), N, 3))
    finally:
        attn_calls.handle.remove(), ff_calls.handle.remove()
    assert runtime.context.calls == N
    assert attn_calls.count == ff_calls.count == len(range(0, N, 3))  # steps 0 and 3
    assert torch.isfinite(out).all() and (out - reference).abs().max() > 1e-3


def test_fora_2_stays_close_at_20_steps(builtin_model):
    """With 20 steps, reusing every other step changes the digits only slightly (FORA's regime)."""
    plan = baselines.dpm_solver_plan(baselines.linspace_timesteps(1000, 20), 2)
    denoise = builtin_model.denoiser(torch.tensor([2, 7]), 2.0)
    x = initial_noise([3, 4], builtin_model.info.sample_shape)
    reference = sample(denoise, x, plan, builtin_model.noise_schedule)
    cache = baselines.fora_cache_plan(model_layout(builtin_model.info), 20, 2)
    with CacheRuntime(builtin_model.network, builtin_model.info, cache) as runtime:
        out = sample(runtime.wrap(denoise), x, plan, builtin_model.noise_schedule)
    assert 1e-3 < (out - reference).abs().mean() < 0.25


def test_unit_cache_skips_the_unit(env):
    model, denoise, x, reference = env
    inner = ComputeCounter(model.network.transformer_blocks[3].attn1.to_q)
    outer = ComputeCounter(model.network.transformer_blocks[5].attn1.to_q)
    try:
        out, _ = run(model, denoise, x, baselines.uniform_unit_plan("transformer_blocks", 1, 5, N, 2))
    finally:
        inner.handle.remove(), outer.handle.remove()
    assert inner.count == 3 and outer.count == N
    assert torch.isfinite(out).all() and (out - reference).abs().max() > 1e-4


def test_state_resets_between_runs(env):
    model, denoise, x, _ = env
    plan = baselines.fora_cache_plan(model_layout(model.info), N, 2)
    with CacheRuntime(model.network, model.info, plan) as runtime:
        wrapped = runtime.wrap(denoise)
        first = sample(wrapped, x, PLAN, model.noise_schedule)
        second = sample(wrapped, x.flip(0), PLAN, model.noise_schedule)
        third = sample(wrapped, x, PLAN, model.noise_schedule)
    assert torch.equal(first, third)
    assert not torch.equal(first, second)


def test_separate_cfg_passes_keep_separate_state(env):
    """A caller running cond and uncond as two passes gets the same result as one batched pass."""
    model, _, x, _ = env
    labels, null, g = torch.tensor([2, 7]), torch.tensor([10, 10]), 2.0
    net = model.network

    def two_pass(runtime):
        def denoise(xx, t, i):
            tt = torch.full((len(xx),), float(t))
            runtime.context.branch = "cond"
            cond = net(xx, timestep=tt, class_labels=labels).sample
            runtime.context.branch = "uncond"
            uncond = net(xx, timestep=tt, class_labels=null).sample
            return uncond + g * (cond - uncond)

        return denoise

    plan = baselines.fora_cache_plan(model_layout(model.info), N, 2)
    with CacheRuntime(net, model.info, plan) as runtime:
        separate = sample(runtime.wrap(two_pass(runtime)), x, PLAN, model.noise_schedule)
    with CacheRuntime(net, model.info, plan) as runtime:
        batched = sample(runtime.wrap(model.denoiser(labels, g)), x, PLAN, model.noise_schedule)
    assert torch.allclose(separate, batched, atol=1e-4)


def test_mismatched_plans_name_expected_and_given(env):
    model, *_ = env
    with pytest.raises(CachePlanMismatchError, match=r"transformer_blocks\[28\].*transformer_blocks\[6\]"):
        CacheRuntime(model.network, model.info, ComponentCachePlan.full("transformer_blocks[28](attn1,attn2,ff)", N))
    with pytest.raises(CachePlanMismatchError, match="exceeds the 6 blocks"):
        CacheRuntime(model.network, model.info, UnitCachePlan("transformer_blocks", 2, 9, (0,), N))
    with pytest.raises(CachePlanMismatchError, match="not a block group"):
        CacheRuntime(model.network, model.info, UnitCachePlan("single_transformer_blocks", 0, 2, (0,), N))
    for module in model.network.modules():  # a refused plan leaves nothing attached
        assert not hasattr(module, "_diffusers_hook")


def skipping(plan):
    return dataclasses.replace(plan, skip_reused_blocks=True)


def test_skipping_fully_reused_blocks_is_whole_stack_unit_refresh(env):
    """FORA every 2 with skip_reused_blocks reuses each block's residual, adaLN modulation included: the same
    computation as refreshing a unit of all blocks every 2 steps (DeepCache / FORA residual reuse), and not the
    same as ECAD's plain reuse, which recomputes the modulation around reused outputs."""
    model, denoise, x, _ = env
    fora = baselines.fora_cache_plan(model_layout(model.info), N, 2)
    modulation = ComputeCounter(model.network.transformer_blocks[2].norm1.linear)
    try:
        skipped, _ = run(model, denoise, x, skipping(fora))
        assert modulation.count == 3
        plain, _ = run(model, denoise, x, fora)
        assert modulation.count == 3 + N
    finally:
        modulation.handle.remove()
    unit, _ = run(model, denoise, x, UnitCachePlan("transformer_blocks", 0, 6, (0, 2, 4), N))
    assert torch.allclose(skipped, unit, atol=1e-5)
    assert (skipped - plain).abs().max() > 1e-4


def test_skipping_keeps_partial_reuse_and_costs_what_runs(env):
    """Only blocks with every component reused are skipped; a block with a component recomputed runs (and reuses
    the rest); the analytic cost equals what the run really computed."""
    model, denoise, x, _ = env
    info = model.info
    layout = model_layout(info)
    rows = ["11" * 6] * N
    rows[1] = "00" + "01" + "11" * 4  # step 1: block 0 skipped, block 1 reuses attn1 and recomputes ff
    rows[3] = "00" * 6  # step 3: every block skipped
    plan = skipping(ComponentCachePlan(layout, tuple(rows)))
    assert plan.skipped_blocks()[1] == [True] + [False] * 5 and all(plan.skipped_blocks()[3])
    table = analytic_macs_table(model.network, info)
    with CacheRuntime(model.network, info, plan) as runtime:
        wrapped = runtime.wrap(denoise)
        observed = observe_units(model.network, info, lambda: sample(wrapped, x, PLAN, model.noise_schedule))
        out = sample(wrapped, x, PLAN, model.noise_schedule)
    assert [c["transformer_blocks.0"] > 0 for c in observed.calls] == [True, False, True, False, True, True]
    assert [c["transformer_blocks.1"] > 0 for c in observed.calls] == [True, True, True, False, True, True]
    assert observed.cost(table, full_batch=2 * len(x), multiplier=2) == pytest.approx(
        schedule_cost(table, PLAN, info, plan, multiplier=2))
    plain_plan = dataclasses.replace(plan, skip_reused_blocks=False)
    plain, _ = run(model, denoise, x, plain_plan)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert schedule_cost(table, PLAN, info, plan) < schedule_cost(table, PLAN, info, plain_plan)
