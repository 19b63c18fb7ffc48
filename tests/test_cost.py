"""Cost accounting: analytic MACs agree with torch's FlopCounterMode; schedule costs add up; latency is measured."""

import numpy as np
import pytest
import torch
from test_diffusers_models import POOLED_DIM, PROMPT_DIM, build_pipeline

from schedsearch.objectives.cost import (
    analytic_macs_table,
    measure_latency,
    measured_latency_table,
    measured_macs_table,
    schedule_cost,
)
from schedsearch.runtime import diffusers_models as dm
from schedsearch.runtime.cache_hooks import model_layout
from schedsearch.runtime.models import BlockGroup, ModelInfo
from schedsearch.spaces import baselines
from schedsearch.spaces.cache_plan import ComponentCachePlan, UnitCachePlan

PLAN = baselines.dpm_solver_plan(baselines.linspace_timesteps(1000, 10), 2)


def assert_tables_agree(analytic, measured, rel=0.02):
    assert analytic.full == pytest.approx(measured.full, rel=rel)
    for name, macs in analytic.slots.items():
        assert macs == pytest.approx(measured.slots[name], rel=rel), name
    for name, macs in analytic.block_overhead.items():
        assert macs == pytest.approx(measured.block_overhead[name], rel=rel, abs=1.0), name


def test_builtin_dit_macs_match_flop_counter(builtin_model):
    net, batch = builtin_model.network, 3
    x = torch.randn(batch, 1, 28, 28)

    def forward():
        net(x, timestep=torch.full((batch,), 500.0), class_labels=torch.tensor([1, 2, 3]))

    analytic = analytic_macs_table(net, builtin_model.info)
    assert_tables_agree(analytic, measured_macs_table(net, builtin_model.info, forward, batch))
    assert 3e7 < analytic.full < 1e8  # ~62.7 MMACs per sample for the 2.1M-parameter DiT on 49 tokens


def test_pixart_macs_match_flop_counter(tmp_path):
    torch.manual_seed(0)
    net = build_pipeline("pixart", tmp_path).transformer.eval()
    info = ModelInfo(
        "tiny-pixart",
        "pixart",
        1000,
        "epsilon",
        "prompt",
        4.5,
        (4, 8, 8),
        (BlockGroup("transformer_blocks", 2, ("attn1", "attn2", "ff")),),
    )
    batch, tokens = 2, 7
    x, text = torch.randn(batch, 4, 8, 8), torch.randn(batch, tokens, PROMPT_DIM)

    def forward():
        net(
            x,
            encoder_hidden_states=text,
            timestep=torch.tensor([3.0, 4.0]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )

    analytic = analytic_macs_table(net, info, encoder_tokens=tokens)
    assert_tables_agree(analytic, measured_macs_table(net, info, forward, batch))


def agreement(analytic, measured) -> float:
    """Worst relative difference over slots, block overheads and the total (for the report)."""
    pairs = [(analytic.full, measured.full), *((v, measured.slots[k]) for k, v in analytic.slots.items() if v)]
    pairs += [(v, measured.block_overhead[k]) for k, v in analytic.block_overhead.items() if v]
    return max(abs(a - m) / m for a, m in pairs)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_mmdit_macs_match_flop_counter(tmp_path, family):
    """Flux (double + single blocks) and SD3 (joint blocks, the last one context_pre_only) on tiny random models."""
    torch.manual_seed(0)
    model = dm.loaded_model_from_pipeline(build_pipeline(family, tmp_path), resolution=16)
    net, info = model.network.eval(), model.info
    batch, text = 2, 7
    c, h, w = info.sample_shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, w, generator=g)
    prompt, pooled = torch.randn(batch, text, PROMPT_DIM, generator=g), torch.randn(batch, POOLED_DIM, generator=g)

    def forward():
        if family == "flux":
            net(
                hidden_states=dm.pack_latents(x),
                timestep=torch.tensor([0.3, 0.6]),
                guidance=torch.full((batch,), 3.5),
                pooled_projections=pooled,
                encoder_hidden_states=prompt,
                txt_ids=torch.zeros(text, 3),
                img_ids=dm.flux_image_ids(h, w),
            )
        else:
            net(hidden_states=x, timestep=torch.tensor([300.0, 600.0]), encoder_hidden_states=prompt,
                pooled_projections=pooled)  # fmt: skip

    analytic = analytic_macs_table(net, info, encoder_tokens=text)
    measured = measured_macs_table(net, info, forward, batch)
    assert_tables_agree(analytic, measured)
    assert agreement(analytic, measured) < 0.02
    assert set(analytic.slots) == set(measured.slots) and len(analytic.block_overhead) == info.num_blocks


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_unet_macs_match_flop_counter(tmp_path, family):
    """UNet2DConditionModel per attention block (resnets, attentions, samplers) on tiny random SD / SDXL UNets."""
    torch.manual_seed(0)
    model = dm.loaded_model_from_pipeline(build_pipeline(family, tmp_path))
    net, info = model.network.eval(), model.info
    batch, text = 2, 7
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *info.sample_shape, generator=g)
    prompt = torch.randn(batch, text, PROMPT_DIM, generator=g)
    added = None
    if family == "sdxl":
        added = {"text_embeds": torch.randn(batch, POOLED_DIM, generator=g), "time_ids": torch.ones(batch, 6)}

    def forward():
        net(x, torch.tensor([300.0, 600.0]), encoder_hidden_states=prompt, added_cond_kwargs=added)

    analytic = analytic_macs_table(net, info, encoder_tokens=text)
    measured = measured_macs_table(net, info, forward, batch)
    assert_tables_agree(analytic, measured)
    assert agreement(analytic, measured) < 0.02
    assert all(v > 0 for v in analytic.slots.values())


def test_schedule_macs_add_up(builtin_model):
    info = builtin_model.info
    table = analytic_macs_table(builtin_model.network, info)
    full = schedule_cost(table, PLAN, info, multiplier=2)
    assert full == pytest.approx(2 * PLAN.nfe * table.full)
    fora = baselines.fora_cache_plan(model_layout(info), PLAN.num_steps, 2)
    cached = schedule_cost(table, PLAN, info, fora, multiplier=2)
    slots = sum(table.slots.values())
    assert cached == pytest.approx(full - 2 * 5 * slots)  # 5 of 10 steps reuse every slot
    assert schedule_cost(table, PLAN, info, ComponentCachePlan.full(model_layout(info), 10)) == pytest.approx(full / 2)
    unit = UnitCachePlan("transformer_blocks", 0, 6, (0, 5), 10)
    skipped_blocks = sum(table.slots.values()) + sum(table.block_overhead.values())
    assert schedule_cost(table, PLAN, info, unit) == pytest.approx(full / 2 - 8 * skipped_blocks)
    afs = baselines.SolverPlan(PLAN.timesteps, PLAN.steps, first_step="zero_x0")
    assert schedule_cost(table, afs, info) == pytest.approx(full / 2 * 9 / 10)


def test_latency_measurement_and_table(builtin_model):
    net = builtin_model.network
    x = torch.randn(4, 1, 28, 28)

    def forward():
        with torch.no_grad():
            net(x, timestep=torch.full((4,), 500.0), class_labels=torch.tensor([1, 2, 3, 4]))

    timing = measure_latency(forward, warmup=1, repeats=5)
    assert timing.median_s > 0 and timing.iqr_s >= 0 and timing.repeats == 5
    table = measured_latency_table(net, builtin_model.info, forward, repeats=3)
    assert table.unit == "s"
    assert all(v > 0 for v in table.slots.values())
    assert np.isfinite(table.full) and table.full > 0
    assert len(table.slots) == 12 and len(table.block_overhead) == 6


def test_calibrated_base_reproduces_the_measured_full_run(builtin_model):
    from schedsearch.objectives.cost import CostTable, calibrate_base

    info = builtin_model.info
    table = analytic_macs_table(builtin_model.network, info)
    seconds = CostTable("s", 0.01, {k: 1e-3 for k in table.slots}, {k: 1e-4 for k in table.block_overhead})
    calibrated = calibrate_base(seconds, measured_full_s=2.0, evaluations=PLAN.nfe)
    assert schedule_cost(calibrated, PLAN, info) == pytest.approx(2.0)
    fora = baselines.fora_cache_plan(model_layout(info), PLAN.num_steps, 2)
    assert schedule_cost(calibrated, PLAN, info, fora) == pytest.approx(2.0 - 5 * 12 * 1e-3)


def test_calibrated_per_transformer_table_predicts_the_measured_uncached_run() -> None:
    """calibrate_base on a per-transformer table: the uncached run (2 evaluations on the first transformer, 3 on
    the second) is predicted at exactly its measured seconds, whatever the timed parts were."""
    from schedsearch.objectives.cost import CostTable, ExpertCostTable, calibrate_base, table_from_dict, table_to_dict

    first = CostTable("s", 0.5, {"a": 1.0, "b": 2.0}, {"blk": 0.25})
    second = CostTable("s", 0.5, {"a": 1.5, "b": 3.0}, {"blk": 0.5})
    table = ExpertCostTable("s", 0.5, first.slots, first.block_overhead, (first, second))
    calibrated = calibrate_base(table, 30.0, [2, 3])
    assert 2 * calibrated.experts[0].full + 3 * calibrated.experts[1].full == pytest.approx(30.0)
    assert calibrated.experts[0].base == calibrated.experts[1].base == pytest.approx((30.0 - 2 * 3.25 - 3 * 5.0) / 5)
    assert table_from_dict(table_to_dict(calibrated)) == calibrated
    with pytest.raises(ValueError, match="2 transformers"):
        calibrate_base(table, 30.0, [5])
