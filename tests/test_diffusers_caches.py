"""diffusers' own caches run on the builtin DiT through our sampler, skip work, and detach cleanly."""

import pytest
import torch
from diffusers.hooks import HookRegistry

from schedsearch.objectives.cost import analytic_macs_table, observe_units, schedule_cost
from schedsearch.runtime.diffusers_caches import DiffusersCache, calibrate_mag_ratios
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


@pytest.fixture(scope="module")
def mag_ratios(env):
    model, denoise, x, _ = env
    ratios = calibrate_mag_ratios(
        model.network, denoise, lambda d: sample(d, x, PLAN, model.noise_schedule), PLAN.nfe
    )  # diffusers' calibration mode; it never skips, so the run is the reference
    assert len(ratios) == PLAN.nfe and ratios[0] == 1.0 and all(0.5 < r < 1.5 for r in ratios)
    return ratios


NEW_KINDS = [
    # kind, params, (calls of the network on which attn1 of block 3 runs in a 10-step run, rows it then processes)
    ("taylorseer_cache", {"cache_interval": 2, "disable_cache_before_step": 2}, 6),  # steps 0, 1, then 3, 5, 7, 9
    (
        "faster_cache",
        {
            "spatial_attention_timestep_skip_range": (-1, 900),
            "unconditional_batch_skip_range": 2,
            "unconditional_batch_timestep_skip_range": (-1, 900),
        },
        5,  # uncond and attention skipped on every other step once t < 900
    ),
    ("mag_cache", {"threshold": 0.1, "num_inference_steps": PLAN.nfe}, 5),
]


@pytest.mark.parametrize(("kind", "params", "computes"), NEW_KINDS)
def test_new_external_caches_skip_work_and_detach(env, mag_ratios, kind, params, computes):
    """TaylorSeer, FasterCache and MagCache on the builtin DiT: output changes, fewer computations (rows counted,
    so FasterCache's half batches show), deterministic across runs, and removal restores the exact output."""
    model, denoise, x, reference = env
    if kind == "mag_cache":
        params = params | {"mag_ratios": mag_ratios}
    info, table = model.info, analytic_macs_table(model.network, model.info)
    full = schedule_cost(table, PLAN, info, multiplier=2)
    with DiffusersCache(model.network, kind, **params) as cache:
        wrapped = cache.wrap(denoise)
        observed = observe_units(model.network, info, lambda: sample(wrapped, x, PLAN, model.noise_schedule))
        out = sample(wrapped, x, PLAN, model.noise_schedule)
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert len(observed.calls) == PLAN.nfe
    attn_rows = [c["transformer_blocks.3.attn1"] for c in observed.calls]
    assert sum(r > 0 for r in attn_rows) == computes
    macs = observed.cost(table, full_batch=2 * len(x), multiplier=2)
    assert macs < 0.8 * full
    if kind == "faster_cache":  # the unconditional half is dropped: the base (embeddings, final layer) runs on N rows
        assert sorted({c[""] for c in observed.calls}) == [len(x), 2 * len(x)]
    if kind == "mag_cache":  # whole blocks skipped: their modulation too
        assert any(c["transformer_blocks.0"] == 0 for c in observed.calls)
    assert_detached(model.network)
    assert torch.equal(sample(denoise, x, PLAN, model.noise_schedule), reference)


def test_uncached_observation_costs_the_full_schedule(env):
    model, denoise, x, _ = env
    table = analytic_macs_table(model.network, model.info)
    observed = observe_units(model.network, model.info, lambda: sample(denoise, x, PLAN, model.noise_schedule))
    full = schedule_cost(table, PLAN, model.info, multiplier=2)
    assert observed.cost(table, full_batch=2 * len(x), multiplier=2) == pytest.approx(full)
    assert observed.recompute_fraction() == 1.0


def test_taylorseer_default_identifiers_would_match_nothing(env):
    """diffusers' default TaylorSeer identifiers ("^transformer_blocks.*attn", fullmatch) miss DiT's attn1/ff and
    would cache nothing silently: our wrapper refuses identifiers that match no module."""
    model = env[0]
    with pytest.raises(ValueError, match="no module of DiTTransformer2DModel matches"):
        DiffusersCache(model.network, "taylorseer_cache", cache_identifiers=["^transformer_blocks.*attn"])
    assert_detached(model.network)


def test_mag_cache_needs_ratios_and_blocks(env):
    with pytest.raises(ValueError, match="mag_ratios"):
        DiffusersCache(env[0].network, "mag_cache")
    with pytest.raises(ValueError, match="no ModuleList of transformer blocks"):
        DiffusersCache(torch.nn.Sequential(torch.nn.Linear(2, 2)), "mag_cache", mag_ratios=[1.0], num_inference_steps=1)


def test_mag_cache_steps_must_match_the_run(env, mag_ratios):
    model, denoise, x, _ = env
    cache = DiffusersCache(model.network, "mag_cache", mag_ratios=mag_ratios, num_inference_steps=5)
    with cache, pytest.raises(ValueError, match="num_inference_steps=5"):
        sample(cache.wrap(denoise), x, PLAN, model.noise_schedule)
    assert_detached(model.network)


def assert_detached(network):
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in network.modules())


def test_first_block_cache_threshold_zero_is_exact(env):
    model, denoise, x, reference = env
    with DiffusersCache(model.network, "first_block_cache", threshold=0.0) as cache:
        assert torch.equal(sample(cache.wrap(denoise), x, PLAN, model.noise_schedule), reference)


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind: unknown"):
        DiffusersCache(torch.nn.Linear(2, 2), "teacache")
