"""Cache plans on tiny random diffusers models of every transformer family (PixArt, SD3, Flux, DiT)."""

import dataclasses

import pytest
import torch
from test_diffusers_models import build_pipeline, conditions

from schedsearch.runtime.cache_hooks import CachePlanMismatchError, CacheRuntime, model_layout
from schedsearch.runtime.models import initial_noise, load_model
from schedsearch.runtime.sampler import sample
from schedsearch.spaces import baselines
from schedsearch.spaces.cache_plan import ComponentCachePlan

FAMILIES = ["dit", "pixart", "sd3", "flux"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_pipelines")
    loaded = {}
    for family in FAMILIES:
        build_pipeline(family, root).save_pretrained(root / family)
        loaded[family] = load_model(f"diffusers:{root / family}", **({"resolution": 16} if family == "flux" else {}))
    return loaded


def run(model, family, cache=None):
    plan = model.default_plan(4)
    denoise = model.denoiser(conditions(family), model.info.guidance_default)
    x = initial_noise([1, 2], model.info.sample_shape)
    if cache is None:
        return sample(denoise, x, plan, model.noise_schedule, model.info.prediction_type)
    with CacheRuntime(model.network, model.info, cache) as runtime:
        return sample(runtime.wrap(denoise), x, plan, model.noise_schedule, model.info.prediction_type)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_plan_is_exact_and_reuse_changes_output(tiny, family):
    model = tiny[family]
    reference = run(model, family)
    layout = model_layout(model.info)
    assert torch.equal(run(model, family, ComponentCachePlan.full(layout, 4)), reference)
    cached = run(model, family, baselines.fora_cache_plan(layout, 4, 2))
    assert torch.isfinite(cached).all()
    assert not torch.equal(cached, reference)
    assert torch.equal(run(model, family), reference)  # hooks gone


def test_tgate_skips_cross_attention_on_pixart(tiny):
    model = tiny["pixart"]
    calls = {"attn2": 0, "attn1": 0}
    block = model.network.transformer_blocks[1]
    handles = [
        block.attn2.to_q.register_forward_hook(lambda *_: calls.__setitem__("attn2", calls["attn2"] + 1)),
        block.attn1.to_q.register_forward_hook(lambda *_: calls.__setitem__("attn1", calls["attn1"] + 1)),
    ]
    try:
        run(model, "pixart", baselines.tgate_cache_plan(model_layout(model.info), 4, gate_step=2))
    finally:
        for h in handles:
            h.remove()
    assert calls == {"attn2": 2, "attn1": 4}


def test_unit_plan_on_flux_double_blocks(tiny):
    """Flux double blocks return (encoder_hidden_states, hidden_states): a unit carries both streams (the residual
    semantics are checked in test_diffusers_models); refreshing every step is exact, reusing changes the output."""
    model = tiny["flux"]
    reference = run(model, "flux")
    every = baselines.UnitCachePlan("transformer_blocks", 0, 1, (0, 1, 2, 3), 4)
    assert torch.equal(run(model, "flux", every), reference)
    reused = run(model, "flux", baselines.uniform_unit_plan("transformer_blocks", 0, 1, 4, 2))
    assert (reused - reference).abs().max() > 1e-6


def test_deepcache_on_a_unet(tmp_path, builtin_model):
    """DeepCache: the deep branch runs on refresh steps only, the shallow path every step; refreshing every step
    is exact."""
    build_pipeline("sd", tmp_path).save_pretrained(tmp_path / "sd")
    model = load_model(f"diffusers:{tmp_path / 'sd'}")
    reference = run(model, "sd")
    every = baselines.UnitCachePlan("deepcache", 0, 1, (0, 1, 2, 3), 4)
    assert torch.equal(run(model, "sd", every), reference)
    net = model.network
    calls = {"deep": 0, "shallow": 0}
    handles = [
        net.mid_block.resnets[0].register_forward_hook(lambda *_: calls.__setitem__("deep", calls["deep"] + 1)),
        net.up_blocks[-1]
        .resnets[0]
        .register_forward_hook(lambda *_: calls.__setitem__("shallow", calls["shallow"] + 1)),
    ]
    try:
        cached = run(model, "sd", baselines.uniform_unit_plan("deepcache", 0, 1, 4, 2))
    finally:
        for h in handles:
            h.remove()
    assert calls == {"deep": 2, "shallow": 4}
    assert torch.isfinite(cached).all() and not torch.equal(cached, reference)
    with pytest.raises(ValueError, match="not a UNet"):
        CacheRuntime(builtin_model.network, builtin_model.info, every)


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_fully_reused_blocks_on_every_transformer_family(tiny, family):
    """Skipping whole blocks works on single-stream (DiT, PixArt) and dual-stream blocks (SD3, Flux: hidden and
    encoder states both get their residual): exact when nothing is reused, different from plain reuse otherwise."""
    model = tiny[family]
    reference = run(model, family)
    layout = model_layout(model.info)
    full = dataclasses.replace(ComponentCachePlan.full(layout, 4), skip_reused_blocks=True)
    assert torch.equal(run(model, family, full), reference)
    fora = baselines.fora_cache_plan(layout, 4, 2)
    skipped = run(model, family, dataclasses.replace(fora, skip_reused_blocks=True))
    assert torch.isfinite(skipped).all()
    assert not torch.equal(skipped, reference) and not torch.equal(skipped, run(model, family, fora))
    assert torch.equal(run(model, family), reference)  # hooks gone


def test_component_plans_on_a_unet_and_no_block_skipping(tmp_path):
    """A UNet block's components are ModuleLists (resnets, attentions): each member reuses its own output. Its
    blocks return (hidden, res_samples), which diffusers cannot skip: skip_reused_blocks is refused."""
    build_pipeline("sd", tmp_path).save_pretrained(tmp_path / "sd")
    model = load_model(f"diffusers:{tmp_path / 'sd'}")
    reference = run(model, "sd")
    layout = model_layout(model.info)
    assert torch.equal(run(model, "sd", ComponentCachePlan.full(layout, 4)), reference)
    resnet = model.network.down_blocks[0].resnets[0].conv1
    calls = []
    handle = resnet.register_forward_hook(lambda *_: calls.append(1))
    try:
        cached = run(model, "sd", baselines.fora_cache_plan(layout, 4, 2))
    finally:
        handle.remove()
    assert len(calls) == 2 and torch.isfinite(cached).all() and not torch.equal(cached, reference)
    plan = dataclasses.replace(baselines.fora_cache_plan(layout, 4, 2), skip_reused_blocks=True)
    with pytest.raises(CachePlanMismatchError, match=r"skip_reused_blocks.*set skip_reused_blocks to false"):
        CacheRuntime(model.network, model.info, plan)
    for module in model.network.modules():
        assert not hasattr(module, "_diffusers_hook")
