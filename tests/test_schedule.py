"""Schedule data: validation names the field, JSON round-trips, keys are stable content hashes. No torch needed."""

import json

import pytest

from schedsearch.spaces import baselines
from schedsearch.spaces.schedule import FORMAT, Schedule, ScheduleError, SolverPlan, SolverStep, load_schedule


def make_schedule(**plan_overrides) -> Schedule:
    plan = baselines.unipc_plan(baselines.linspace_timesteps(1000, 6), 2)
    fields = {"timesteps": plan.timesteps, "steps": plan.steps, **plan_overrides}
    return Schedule(model="builtin:mnist-dit", solver=SolverPlan(**fields))


def test_json_round_trip_preserves_everything():
    schedule = make_schedule()
    again = Schedule.from_json(schedule.to_json())
    assert again == schedule
    assert again.key == schedule.key
    assert json.loads(schedule.to_json())["format"] == FORMAT


def test_key_ignores_meta_but_not_content():
    a = make_schedule()
    b = Schedule(model=a.model, solver=a.solver, meta={"note": "found by NSGA-II"})
    assert a.key == b.key
    changed = make_schedule(first_step="zero_x0")
    assert changed.key != a.key


def test_nfe_counts_analytical_first_step():
    assert make_schedule().solver.nfe == 6
    assert make_schedule(first_step="zero_x0").solver.nfe == 5


def test_baseline_orders_follow_diffusers_rules():
    ts = baselines.linspace_timesteps(1000, 10)
    assert [s.order for s in baselines.dpm_solver_plan(ts, 3).steps] == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert [s.order for s in baselines.unipc_plan(ts, 3).steps] == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert [s.corrector for s in baselines.unipc_plan(ts, 2, disable_corrector=[0]).steps] == [False] + [True] * 8 + [
        False
    ]
    long = baselines.linspace_timesteps(1000, 20)
    assert [s.order for s in baselines.dpm_solver_plan(long, 3).steps][-3:] == [3, 3, 1]
    assert baselines.leading_timesteps(1000, 10) == tuple(float(t) for t in range(900, -1, -100))
    assert baselines.linspace_timesteps(1000, 5) == (999.0, 799.0, 599.0, 400.0, 200.0)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["solver"].update(timesteps=[999, 500, 500, 100, 50, 10]), "solver.timesteps[2]"),
        (lambda d: d["solver"]["steps"][3].update(order=4), "solver.steps[3].order"),
        (lambda d: d["solver"]["steps"][0].update(order=2), "solver.steps[0].order"),
        (lambda d: d["solver"]["steps"][2].update(prediction="velocity"), "solver.steps[2].prediction"),
        (lambda d: d["solver"]["steps"][2].update(rule="bh3"), "solver.steps[2].rule"),
        (lambda d: d["solver"]["steps"][5].update(corrector=True), "solver.steps[5].corrector"),
        (lambda d: d["solver"]["steps"][1].update(dc_ratio=1.1), "solver.steps[1].dc_ratio"),
        (lambda d: d["solver"]["steps"][5].update(order=2), "solver.steps[5].order"),
        (lambda d: d["solver"]["steps"][2].update(speed=3), "solver.steps[2].speed"),
        (lambda d: d["solver"].update(first_step="guess"), "solver.first_step"),
        (lambda d: d["solver"].update(final_timestep=500), "solver.final_timestep"),
        (lambda d: d["solver"].update(steps=d["solver"]["steps"][:-1]), "solver.steps"),
        (lambda d: d.update(format="other/v9"), "format"),
        (lambda d: d.pop("model"), "model"),
        (lambda d: d["solver"].update(timesteps="999,500"), "solver.timesteps"),
    ],
)
def test_bad_schedules_name_the_field(mutate, field):
    data = make_schedule().to_dict()
    mutate(data)
    with pytest.raises(ScheduleError) as err:
        Schedule.from_dict(data)
    assert err.value.field_path == field
    assert str(err.value).startswith(field)


def test_timesteps_outside_model_range_are_rejected():
    schedule = make_schedule()
    with pytest.raises(ScheduleError, match="training range"):
        schedule.validate(num_train_timesteps=500)


def test_malformed_file(tmp_path):
    path = tmp_path / "s.json"
    path.write_text("{not json")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        load_schedule(path)
    with pytest.raises(ScheduleError, match="no such file"):
        load_schedule(tmp_path / "missing.json")


def test_plan_is_hashable_and_frozen():
    plan = make_schedule().solver
    assert hash(plan) == hash(SolverPlan(plan.timesteps, plan.steps))
    with pytest.raises(AttributeError):
        plan.steps[0].order = 3  # type: ignore[misc]
    assert SolverStep() == SolverStep(order=1, prediction="data", corrector=False, rule="bh2", dc_ratio=1.0)
