"""Plots: each returns a Figure whose artists hold exactly the data they claim (front = brute-force non-dominated
set, heat map = the plan's bits, one marker per step), and saves to PNG."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from schedsearch.results.pareto import hypervolume
from schedsearch.results.plots import (
    cache_bits,
    hypervolume_history,
    plot_cache_heatmap,
    plot_front,
    plot_hypervolume_history,
    plot_solver_schedule,
    sample_grid_figure,
)
from schedsearch.results.store import Record, records_frame
from schedsearch.spaces.baselines import ddim_plan, dpm_solver_plan, linspace_timesteps
from schedsearch.spaces.cache_plan import ComponentCachePlan, UnitCachePlan
from schedsearch.spaces.schedule import Schedule, SolverPlan, SolverStep


def _frame(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "status": ["ok"] * n,
        "metric.mse": rng.uniform(0, 1, n),
        "metric.psnr": rng.uniform(10, 30, n),
        "metric.nfe": rng.integers(4, 20, n).astype(float),
    })
    frame.loc[3, "status"] = "failed"
    frame.loc[5, "metric.mse"] = np.nan
    return frame


def _brute_front(points: np.ndarray, directions: list[str]) -> np.ndarray:
    sign = np.array([1.0 if d == "min" else -1.0 for d in directions])
    x = points * sign
    keep = [i for i in range(len(x)) if not any((x[j] <= x[i]).all() and (x[j] < x[i]).any() for j in range(len(x)))]
    return points[keep]


def _artist(fig: Figure, gid: str):
    found = [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, f"{gid}: {found}"
    return found[0]


def _save(fig: Figure, tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=60)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("directions", [("min", "max"), ("min", "min"), ("max", "max")])
def test_front_line_is_the_brute_force_front(tmp_path, directions):
    df = _frame()
    fig = plot_front(df, "mse", "metric.nfe", {"mse": directions[0], "nfe": directions[1]})
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    usable = df[(df["status"] == "ok") & df["metric.mse"].notna()]
    expected = _brute_front(usable[["metric.mse", "metric.nfe"]].to_numpy(), list(directions))
    line = _artist(fig, "pareto-front")
    got = np.asarray(line.get_xydata())
    assert sorted(map(tuple, got)) == sorted(map(tuple, expected))
    assert np.all(np.diff(got[:, 0]) >= 0)  # drawn left to right
    assert len(_artist(fig, "evaluated").get_offsets()) == len(usable)
    knee = _artist(fig, "knee").get_offsets()[0]
    assert tuple(knee) in set(map(tuple, expected))
    _save(fig, tmp_path, "front")


def test_front_colour_baselines_records_and_given_axes(tmp_path):
    df = _frame()
    baselines = pd.DataFrame({"metric.mse": [0.5, 0.9], "metric.psnr": [20.0, 25.0], "label": ["ddim", "unipc"]})
    fig = plot_front(df, "mse", "psnr", ("min", "max"), color="nfe", baselines=baselines, label_knee=False)
    assert len(fig.axes) == 2  # the plot and its colour bar
    assert len(_artist(fig, "baselines").get_offsets()) == 2
    assert {t.get_text() for t in fig.axes[0].texts} == {"ddim", "unipc"}
    assert not [a for a in fig.axes[0].get_children() if a.get_gid() == "knee"]
    _save(fig, tmp_path, "front_colour")

    records = [Record(study="s", key=f"k{i}", schedule_json='{"model": "m"}', metrics={"a": float(i), "b": -i})
               for i in range(5)]
    host = Figure()
    ax = host.add_subplot()
    assert plot_front(records, "a", "b", ("min", "max"), ax=ax) is host
    starred = plot_front(records, "a", "b", ("min", "max"), knee_key="k3")  # e.g. the knee of a 3-D front
    assert tuple(_artist(starred, "knee").get_offsets()[0]) == (3.0, -3.0)
    with pytest.raises(KeyError, match="knee_key"):
        plot_front(records, "a", "b", ("min", "max"), knee_key="absent")
    with pytest.raises(KeyError, match="nope"):
        plot_front(df, "nope", "psnr", ("min", "max"))
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_front(df.iloc[[3]], "mse", "psnr", ("min", "max"))


def test_hypervolume_history_is_monotone_and_ends_at_the_full_front(tmp_path):
    a, b = _frame(40, seed=1), _frame(30, seed=2)
    objectives = {"mse": "min", "psnr": "max"}
    history = hypervolume_history({"ga": a, "random": b}, objectives)
    assert [len(history["ga"]), len(history["random"])] == [40, 30]
    for hv in history.values():
        assert np.all(np.diff(hv) >= -1e-12) and 0 < hv[-1] <= 1
    # Same normalisation as the function's default: one ideal and reference over both strategies.
    both = pd.concat([a, b])
    ok = both[(both["status"] == "ok") & both["metric.mse"].notna()]
    x = np.c_[ok["metric.mse"], -ok["metric.psnr"]]
    ideal, worst = x.min(axis=0), x.max(axis=0)
    ref = worst + 0.1 * (worst - ideal)
    ga = a[(a["status"] == "ok") & a["metric.mse"].notna()]
    z = (np.c_[ga["metric.mse"], -ga["metric.psnr"]] - ideal) / (ref - ideal)
    assert history["ga"][-1] == pytest.approx(hypervolume(z, ["min", "min"], [1.0, 1.0]))

    fig = plot_hypervolume_history({"ga": a, "random": b}, objectives)
    assert len(fig.axes) == 1
    line = _artist(fig, "ga")
    assert np.allclose(line.get_ydata(), history["ga"])
    _save(fig, tmp_path, "hv")


def _component_plan(seed: int = 0) -> ComponentCachePlan:
    layout = "down[2](resnet,attn);mid[1](resnet);up[3](resnet,attn)"
    rng = np.random.default_rng(seed)
    rows = ["1" * 11] + ["".join(rng.choice(["0", "1"], 11)) for _ in range(7)]
    return ComponentCachePlan(layout, tuple(rows)).validate(8)


def test_heatmap_arrays_equal_the_plan_bits(tmp_path):
    plan = _component_plan()
    bits = cache_bits(plan)
    assert list(bits) == ["resnet", "attn"]
    # Slot order: down0 (resnet, attn), down1 (...), mid0 (resnet), up0..2 (resnet, attn).
    slots = [("resnet", 0), ("attn", 0), ("resnet", 1), ("attn", 1), ("resnet", 2), ("resnet", 3), ("attn", 3),
             ("resnet", 4), ("attn", 4), ("resnet", 5), ("attn", 5)]
    for step, row in enumerate(plan.recompute):
        for (component, block), ch in zip(slots, row, strict=True):
            assert bits[component][step, block] == int(ch)
    assert np.isnan(bits["attn"][:, 2]).all()  # the mid block has no attention

    fig = plot_cache_heatmap(Schedule("m", ddim_plan(linspace_timesteps(1000, 8)), plan))
    assert len(fig.axes) == 2
    for component in bits:
        image = _artist(fig, f"cache-{component}")
        np.testing.assert_array_equal(np.ma.filled(image.get_array(), np.nan).T, bits[component])
    _save(fig, tmp_path, "heat")

    unit = UnitCachePlan("transformer_blocks", 1, 5, (0, 3, 6), 8).validate(8)
    fig = plot_cache_heatmap(unit)
    assert len(fig.axes) == 1
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array()[0], [1, 0, 0, 1, 0, 0, 1, 0])
    _save(fig, tmp_path, "unit")

    with pytest.raises(ValueError, match="no cache plan"):
        plot_cache_heatmap(Schedule("m", ddim_plan(linspace_timesteps(1000, 8))))
    host = Figure()
    with pytest.raises(ValueError, match="give 2 Axes"):
        plot_cache_heatmap(plan, ax=host.add_subplot())


def test_solver_schedule_markers_per_step(tmp_path):
    ts = linspace_timesteps(1000, 6)
    steps = (SolverStep(1), SolverStep(2, corrector=True), SolverStep(3, "noise", dc_ratio=1.1),
             SolverStep(2, "noise", corrector=True), SolverStep(2), SolverStep(1))
    custom = SolverPlan(ts, steps, first_step="zero_x0").validate()
    fig = plot_solver_schedule([custom, dpm_solver_plan(ts)], labels=["found", "dpm++"])
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    markers = [c for c in ax.collections if str(c.get_gid()).startswith("order") and c.get_gid().endswith("-0")]
    assert sum(len(c.get_offsets()) for c in markers) == 6
    assert len(_artist(fig, "order3-noise-0").get_offsets()) == 1
    assert len(_artist(fig, "corrector-0").get_offsets()) == 2
    assert [t.get_text() for t in ax.texts if t.get_gid() == "dc-0"] == ["r=1.10"]
    np.testing.assert_array_equal(_artist(fig, "schedule-1").get_ydata(), ts)
    _save(fig, tmp_path, "solver")
    assert len(plot_solver_schedule(Schedule("m", custom)).axes) == 1


def test_sample_grid_figure(tmp_path, builtin_model):
    ts = linspace_timesteps(1000, 4)
    fast = Schedule(builtin_model.info.name, dpm_solver_plan(ts))
    teacher = Schedule(builtin_model.info.name, dpm_solver_plan(linspace_timesteps(1000, 8)))
    fig = sample_grid_figure(builtin_model, fast, teacher, [1, 7, 3], [0, 1, 2], batch_size=2)
    assert len(fig.axes) == 2 and all(len(ax.images) == 1 for ax in fig.axes)
    assert fig.axes[0].images[0].get_array().shape[2] == 3
    _save(fig, tmp_path, "samples")


def test_frame_from_store_records_plots():
    records = [Record(study="s", key=f"k{i}", schedule_json='{"model": "m"}', metrics={"mse": i, "nfe": 10 - i})
               for i in range(4)]
    fig = plot_front(records_frame(records), "mse", "nfe", {"mse": "min", "nfe": "min"})
    assert len(_artist(fig, "pareto-front").get_xydata()) == 4
