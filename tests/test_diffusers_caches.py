"""diffusers' own caches run on the builtin DiT through our sampler, skip work, and detach cleanly."""

import pytest
import torch
from diffusers.hooks import HookRegistry

from schedsearch.runtime.diffusers_caches import DiffusersCache
from schedsearch.runtime.models import initial_noise
from schedsearch.runtime.sampler import sample
from schedsearch.spaces import baselines

PLAN = baselines.dpm_solver_plan(baselines.linspace_timesteps(1000, 10), 2)


@pytest.fixture(scope="module")
def env(builtin_model):
    denoise = builtin_model.denoiser(torch.tensor([1, 2]), 2.0)
    x = initial_noise([0, 1], builtin_model.info.sample_shape)
    return builtin_model, denoise, x, sample(denoise, x, PLAN, builtin_model.noise_schedule)


@pytest.mark.parametrize(
    ("kind", "params", "max_computes"),
    [
        ("first_block_cache", {"threshold": 0.2}, 8),
        (
            "pyramid_attention_broadcast",
            {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (100, 800)},
            9,
        ),
    ],
)
def test_external_cache_skips_work_and_detaches(env, kind, params, max_computes):
    model, denoise, x, reference = env
    count = {"n": 0}
    handle = model.network.transformer_blocks[3].attn1.to_q.register_forward_hook(
        lambda *_: count.__setitem__("n", count["n"] + 1)
    )
    try:
        with DiffusersCache(model.network, kind, **params) as cache:
            out = sample(cache.wrap(denoise), x, PLAN, model.noise_schedule)
            again = sample(cache.wrap(denoise), x, PLAN, model.noise_schedule)
    finally:
        handle.remove()
    assert torch.isfinite(out).all() and torch.equal(out, again)  # state resets between runs
    assert count["n"] <= 2 * max_computes  # two runs
    assert not torch.equal(out, reference)
    registry = HookRegistry.check_if_exists_or_initialize(model.network)
    assert not registry.hooks and not any(
        getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in model.network.modules()
    )
    assert torch.equal(sample(denoise, x, PLAN, model.noise_schedule), reference)


def test_first_block_cache_threshold_zero_is_exact(env):
    model, denoise, x, reference = env
    with DiffusersCache(model.network, "first_block_cache", threshold=0.0) as cache:
        assert torch.equal(sample(cache.wrap(denoise), x, PLAN, model.noise_schedule), reference)


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind: unknown"):
        DiffusersCache(torch.nn.Linear(2, 2), "teacache")
