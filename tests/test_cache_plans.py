"""Cache plans as data: validation names the field, baselines have the documented shape, JSON round-trips."""

import dataclasses

import pytest

from schedsearch.spaces import baselines
from schedsearch.spaces.cache_plan import (
    ComponentCachePlan,
    UnitCachePlan,
    cache_plan_from_dict,
    layout_of,
    parse_layout,
    slot_names,
)
from schedsearch.spaces.schedule import Schedule, ScheduleError

DIT = layout_of([("transformer_blocks", 2, ("attn1", "ff"))])
PIXART = layout_of([("transformer_blocks", 3, ("attn1", "attn2", "ff"))])
FLUX = layout_of([("transformer_blocks", 2, ("attn", "ff", "ff_context")), ("single", 1, ("attn", "proj_out"))])


def test_layout_round_trip_and_slot_order():
    assert parse_layout(FLUX) == [
        ("transformer_blocks", 2, ("attn", "ff", "ff_context")),
        ("single", 1, ("attn", "proj_out")),
    ]
    assert slot_names(DIT) == [
        "transformer_blocks.0.attn1",
        "transformer_blocks.0.ff",
        "transformer_blocks.1.attn1",
        "transformer_blocks.1.ff",
    ]
    assert len(slot_names(FLUX)) == 8


def test_fora_and_evenly_spaced():
    fora = baselines.fora_cache_plan(DIT, 7, 3)
    assert fora.recompute == ("1111", "0000", "0000", "1111", "0000", "0000", "1111")
    assert fora.recompute_fraction() == pytest.approx(3 / 7)
    even = baselines.evenly_spaced_cache_plan(DIT, 10, 4)
    assert [i for i, row in enumerate(even.recompute) if row == "1111"] == [0, 3, 6, 9]


def test_tgate_freezes_cross_attention_only():
    plan = baselines.tgate_cache_plan(PIXART, 5, gate_step=2)
    names = slot_names(PIXART)
    for i, row in enumerate(plan.recompute):
        for name, bit in zip(names, row, strict=True):
            assert bit == ("0" if i >= 2 and name.endswith("attn2") else "1")
    with pytest.raises(ValueError, match="no cross-attention"):
        baselines.tgate_cache_plan(DIT, 5, 2)


@pytest.mark.parametrize(
    ("plan", "field"),
    [
        (ComponentCachePlan(DIT, ("1111", "0101", "11")), "cache.recompute[2]"),
        (ComponentCachePlan(DIT, ("1111", "01x1", "1111")), "cache.recompute[1]"),
        (ComponentCachePlan(DIT, ("1011", "1111", "1111")), "cache.recompute[0]"),
        (UnitCachePlan("transformer_blocks", 0, 2, (1, 2), 3), "cache.refresh_steps"),
        (UnitCachePlan("transformer_blocks", 0, 2, (0, 2, 1), 3), "cache.refresh_steps"),
        (UnitCachePlan("transformer_blocks", 2, 2, (0,), 3), "cache.start"),
    ],
)
def test_bad_cache_plans_name_the_field(plan, field):
    with pytest.raises(ScheduleError) as err:
        plan.validate(3)
    assert err.value.field_path == field


def test_schedule_with_cache_round_trips_and_checks_steps():
    solver = baselines.dpm_solver_plan(baselines.linspace_timesteps(1000, 4), 2)
    for cache in (baselines.fora_cache_plan(DIT, 4, 2), baselines.uniform_unit_plan("transformer_blocks", 0, 2, 4, 2)):
        schedule = Schedule("builtin:mnist-dit", solver, cache)
        again = Schedule.from_json(schedule.to_json())
        assert again == schedule and again.key == schedule.key
        assert again.key != Schedule("builtin:mnist-dit", solver).key
    with pytest.raises(ScheduleError, match="solver plan has 4"):
        Schedule("builtin:mnist-dit", solver, baselines.fora_cache_plan(DIT, 5, 2)).validate()


def test_analytical_first_step_shifts_the_first_evaluated_step():
    solver = baselines.dpm_solver_plan(baselines.linspace_timesteps(1000, 4), 2)
    afs = type(solver)(solver.timesteps, solver.steps, first_step="zero_x0")
    cache = ComponentCachePlan(DIT, ("0000", "1111", "0000", "1111"))
    assert Schedule("builtin:mnist-dit", afs, cache).validate() is not None
    with pytest.raises(ScheduleError, match=r"cache.recompute\[0\]"):
        Schedule("builtin:mnist-dit", solver, cache).validate()


def test_block_skip_flag_round_trips_and_keeps_old_keys():
    layout = "transformer_blocks[2](attn1,ff)"
    plain = ComponentCachePlan(layout, ("1111", "0011", "0000"))
    assert "skip_reused_blocks" not in plain.to_dict()  # plans written before the flag keep their content hash
    skip = dataclasses.replace(plain, skip_reused_blocks=True)
    assert cache_plan_from_dict(skip.to_dict()) == skip and cache_plan_from_dict(plain.to_dict()) == plain
    assert skip.skipped_blocks() == [[False, False], [True, False], [True, True]]
    assert plain.skipped_blocks() == [[False, False]] * 3
    with pytest.raises(ScheduleError, match=r"cache\.skip_reused_blocks"):
        cache_plan_from_dict({**skip.to_dict(), "skip_reused_blocks": "yes"})
