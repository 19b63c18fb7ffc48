"""Pareto tools against brute force, hand-computed hypervolumes, Monte Carlo and known knees."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest

from schedsearch.results.pareto import (
    hypervolume,
    knee_point,
    non_dominated,
    nondominated_sort,
    pareto_frame,
)


def _dominates(a, b, directions) -> bool:
    """Textbook definition, one objective at a time."""
    no_worse, better = True, False
    for x, y, d in zip(a, b, directions, strict=True):
        if d == "max":
            x, y = -x, -y
        if x > y:
            no_worse = False
        if x < y:
            better = True
    return no_worse and better


def _brute_ranks(points, directions) -> list[int]:
    """Front index as the length of the longest chain of dominators: an independent characterisation of NSGA-II's
    peeling (front 0 = nobody dominates it; front k = 1 + the worst front among its dominators)."""
    n = len(points)
    dominators = [[j for j in range(n) if _dominates(points[j], points[i], directions)] for i in range(n)]

    @functools.cache
    def rank(i: int) -> int:
        return 1 + max((rank(j) for j in dominators[i]), default=-1)

    return [rank(i) for i in range(n)]


def _random_points(seed: int, m: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    n = 80
    # Small integers make ties in single objectives common; then repeat some rows exactly.
    pts = rng.integers(0, 7, size=(n, m)).astype(float)
    pts[: n // 2] += rng.random((n // 2, m)).round(1)
    dup = rng.integers(0, n, size=15)
    pts = np.concatenate([pts, pts[dup]])
    directions = [["min", "max"][int(b)] for b in rng.integers(0, 2, size=m)]
    return pts, directions


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_non_dominated_and_sort_match_brute_force(seed, m):
    pts, directions = _random_points(seed, m)
    ranks = np.array(_brute_ranks(pts.tolist(), directions))
    assert np.array_equal(non_dominated(pts, directions), ranks == 0)

    fronts = nondominated_sort(pts, directions)
    assert len(fronts) == ranks.max() + 1
    for k, front in enumerate(fronts):
        assert np.array_equal(front, np.flatnonzero(ranks == k))
    assert sorted(np.concatenate(fronts).tolist()) == list(range(len(pts)))


def test_duplicates_of_a_front_point_are_all_non_dominated():
    pts = np.array([[1.0, 2.0], [1.0, 2.0], [2.0, 1.0], [2.0, 2.0], [2.0, 2.0], [1.0, 2.0]])
    assert non_dominated(pts, ["min", "min"]).tolist() == [True, True, True, False, False, True]
    fronts = nondominated_sort(pts, ["min", "min"])
    assert [f.tolist() for f in fronts] == [[0, 1, 2, 5], [3, 4]]


def test_directions_flip_the_order():
    pts = np.array([[0.0, 0.0], [1.0, 1.0]])
    assert non_dominated(pts, ["min", "min"]).tolist() == [True, False]
    assert non_dominated(pts, ["max", "max"]).tolist() == [False, True]
    assert non_dominated(pts, ["min", "max"]).tolist() == [True, True]


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        non_dominated([[1.0, np.nan]], ["min", "min"])
    with pytest.raises(ValueError, match="'min' or 'max'"):
        non_dominated([[1.0, 2.0]], ["min", "up"])
    with pytest.raises(ValueError, match="directions"):
        non_dominated([[1.0, 2.0]], ["min"])
    assert non_dominated(np.empty((0, 2)), ["min", "min"]).shape == (0,)
    assert nondominated_sort(np.empty((0, 2)), ["min", "min"]) == []


def test_hypervolume_2d_by_hand():
    # Staircase under (1,3), (2,2), (3,1) up to (4,4): 3·1 + 2·1 + 1·1 = 6.
    pts = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    assert hypervolume(pts, ["min", "min"], [4.0, 4.0]) == pytest.approx(6.0)
    # Same geometry with the second objective maximised (negated values and reference).
    flipped = pts * [1.0, -1.0]
    assert hypervolume(flipped, ["min", "max"], [4.0, -4.0]) == pytest.approx(6.0)
    # A dominated point and a point beyond the reference add nothing.
    more = np.vstack([pts, [[3.5, 3.5], [0.5, 5.0]]])
    assert hypervolume(more, ["min", "min"], [4.0, 4.0]) == pytest.approx(6.0)
    assert hypervolume(np.empty((0, 2)), ["min", "min"], [4.0, 4.0]) == 0.0


def test_hypervolume_3d_matches_monte_carlo():
    rng = np.random.default_rng(7)
    directions = ["min", "max", "min"]
    sign = np.array([1.0, -1.0, 1.0])
    x_min = rng.random((25, 3))  # minimisation form
    ref_min = np.full(3, 1.1)
    exact = hypervolume(x_min * sign, directions, ref_min * sign)

    lo = x_min.min(axis=0)
    samples = lo + rng.random((200_000, 3)) * (ref_min - lo)
    covered = np.zeros(len(samples), dtype=bool)
    for p in x_min:
        covered |= (samples >= p).all(axis=1)
    estimate = covered.mean() * np.prod(ref_min - lo)
    assert exact == pytest.approx(estimate, rel=0.02)


def test_knee_of_a_convex_2d_front():
    # f2 = (1 - f1)²: farthest from the line f1 + f2 = 1 where f1 + f2 is least, at f1 = 0.5.
    f1 = np.linspace(0.0, 1.0, 11)
    front = np.column_stack([f1, (1.0 - f1) ** 2])
    dominated = front[[2, 7]] + 0.3
    pts = np.vstack([dominated, front])
    assert knee_point(pts, ["min", "min"]) == 2 + 5
    # Maximising a negated objective is the same problem.
    assert knee_point(pts * [1.0, -1.0], ["min", "max"]) == 7
    # Rescaling an objective does not move the knee (it is found after normalisation).
    assert knee_point(pts * [1000.0, 1.0], ["min", "min"]) == 7


def test_knee_of_a_convex_3d_front():
    # Points of the sphere octant around (1,1,1): the symmetric point bulges most toward the ideal point.
    rng = np.random.default_rng(3)
    u = np.abs(rng.normal(size=(60, 3)))
    u = np.vstack([np.eye(3), np.full((1, 3), 1.0), u])
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    pts = 1.0 - u
    assert knee_point(pts, ["min", "min", "min"]) == 3


def test_knee_degenerate_cases():
    assert knee_point([[1.0, 2.0]], ["min", "min"]) == 0
    assert knee_point([[1.0, 2.0], [1.0, 2.0], [3.0, 3.0]], ["min", "min"]) == 0
    with pytest.raises(ValueError):
        knee_point(np.empty((0, 2)), ["min", "min"])


def test_pareto_frame_ranks_and_skips_unrankable_rows():
    df = pd.DataFrame(
        {
            "metric.mse": [1.0, 2.0, 3.0, 2.5, np.nan, 0.5],
            "summary.nfe": [10, 5, 4, 6, 3, 2],
            "status": ["ok", "ok", "ok", "ok", "failed", "failed"],
        },
        index=[10, 11, 12, 13, 14, 15],
    )
    out = pareto_frame(df, {"metric.mse": "min", "summary.nfe": "min"})
    assert "front_rank" not in df.columns
    assert out["front_rank"].dtype == "Int64"
    assert out["front_rank"].iloc[:4].tolist() == [0, 0, 0, 1]
    assert out["front_rank"].iloc[4:].isna().all()
    with pytest.raises(KeyError, match=r"metric\.lpips"):
        pareto_frame(df, {"metric.lpips": "min"})


def test_mean_interval_is_a_bootstrap_of_the_mean():
    """The 95% interval brackets the mean, narrows like 1/sqrt(n), repeats exactly, and is what scipy gives."""
    from scipy.stats import bootstrap

    from schedsearch.objectives.base import mean_interval

    rng = np.random.default_rng(3)
    small, large = rng.normal(25, 3, 64), rng.normal(25, 3, 1024)
    a = mean_interval("psnr", [small[:10], small[10:]])
    assert a["psnr.ci95_low"] < small.mean() < a["psnr.ci95_high"]
    b = mean_interval("psnr", [large])
    width = lambda d: d["psnr.ci95_high"] - d["psnr.ci95_low"]  # noqa: E731
    assert 2.5 < width(a) / width(b) < 6.5  # sqrt(1024 / 64) = 4
    assert mean_interval("psnr", [small]) == a  # the same samples, the same interval
    ref = bootstrap((small,), np.mean, n_resamples=1000, method="percentile", random_state=np.random.default_rng(0))
    assert a["psnr.ci95_low"] == pytest.approx(ref.confidence_interval.low)
    assert mean_interval("psnr", [np.array([30.0])]) == {}  # one sample: no interval


def test_comparison_counts_a_domination_inside_the_noise_apart(tmp_path):
    """A front point better by less than the noise dominates, but not with the intervals apart."""
    from schedsearch.results.query import baselines_study, compare_with_baselines, heldout_study
    from schedsearch.results.store import Record, ResultStore
    from schedsearch.spaces import baselines
    from schedsearch.spaces.schedule import Schedule

    def schedule(i: int, name: str | None = None) -> Schedule:
        ts = tuple(t - i for t in baselines.linspace_timesteps(1000, 5))
        return Schedule("builtin:mnist-dit", baselines.ddim_plan(ts), meta={"baseline": name} if name else {})

    def metrics(psnr: float, half: float, macs: float) -> dict[str, float]:
        return {"psnr": psnr, "psnr.ci95_low": psnr - half, "psnr.ci95_high": psnr + half, "macs": macs}

    with ResultStore(tmp_path / "r.db") as store:
        store.set_study_settings("s", {"objectives": [["psnr", "max"], ["macs", "min"]], "calibration": "c"})
        ours = [(schedule(1), metrics(30.0, 0.2, 5.0)), (schedule(2), metrics(25.1, 0.5, 3.0))]
        base = [(schedule(3, "far"), metrics(28.0, 0.2, 6.0)), (schedule(4, "close"), metrics(25.0, 0.5, 3.0))]
        for study in ("s", heldout_study("s")):
            for s, m in ours:
                store.append(Record.for_schedule(study, s, m, calibration_hash="c"))
        for study in (baselines_study("s"), heldout_study("s")):
            for s, m in base:
                store.append(Record.for_schedule(study, s, m, calibration_hash="c"))
        found = compare_with_baselines(store, "s", "heldout")
    assert found.baselines == ("far", "close") or set(found.baselines) == {"far", "close"}
    assert set(found.dominated) == {"far", "close"} and found.separated == ("far",)
