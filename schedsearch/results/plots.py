"""Figures of a study: Pareto fronts, hypervolume over evaluations, cache heat maps, solver schedules, samples.

Every function builds on `matplotlib.figure.Figure` directly (never pyplot), so it runs under any backend (Agg on a
server, inline in a notebook) and leaves no figure in pyplot's registry; each takes an optional `ax` to draw into an
existing layout and returns the Figure it drew on. Objective names may be given bare ("fid") or as frame columns
("metric.fid"): the frame from `ResultStore.to_frame` prefixes them, the study settings do not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from schedsearch.results.pareto import hypervolume, knee_point, non_dominated, to_minimisation
from schedsearch.spaces.cache_plan import ComponentCachePlan, UnitCachePlan, parse_layout
from schedsearch.spaces.schedule import Schedule, SolverPlan

if TYPE_CHECKING:
    import pandas as pd

    from schedsearch.results.store import Record
    from schedsearch.runtime.models import LoadedModel

__all__ = [
    "cache_bits",
    "hypervolume_history",
    "plot_cache_heatmap",
    "plot_front",
    "plot_hypervolume_history",
    "plot_solver_schedule",
    "resolve_column",
    "sample_grid_figure",
]

# Reused slots light, recomputed slots dark: the eye reads "work done" as ink.
_CACHE_CMAP = ListedColormap(["#eeeeee", "#1f4e79"])
_ORDER_MARKERS = {1: "o", 2: "s", 3: "^"}
_BASELINE_LABELS = ("label", "baseline", "name")


def _figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.get_figure(root=True), ax  # type: ignore[return-value]
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _as_frame(data: pd.DataFrame | Iterable[Record]) -> pd.DataFrame:
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        return data
    from schedsearch.results.store import records_frame

    return records_frame(data)


def resolve_column(df: pd.DataFrame, name: str) -> str:
    """The frame column an objective name refers to: itself, else `metric.<name>`, else `summary.<name>`."""
    for column in (name, f"metric.{name}", f"summary.{name}"):
        if column in df.columns:
            return column
    raise KeyError(f"no column {name!r} (nor metric.{name} / summary.{name}); columns are {list(df.columns)}")


def _bare(name: str) -> str:
    return name.split(".", 1)[1] if name.startswith(("metric.", "summary.")) else name


def _direction(directions: Mapping[str, str] | Sequence[str], names: Sequence[str]) -> list[str]:
    """Directions for `names`, from a sequence in the same order or a mapping keyed by bare or column names."""
    if isinstance(directions, Mapping):
        out = []
        for name in names:
            for key in (name, _bare(name), f"metric.{name}"):
                if key in directions:
                    out.append(directions[key])
                    break
            else:
                raise KeyError(f"no direction for objective {name!r}; directions given for {list(directions)}")
        return out
    out = list(directions)
    if len(out) != len(names):
        raise ValueError(f"{len(out)} directions for {len(names)} objectives {list(names)}")
    return out


def _usable(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Rows that can be placed on the plot: not failed, no NaN in the plotted columns."""
    keep = df[list(columns)].notna().all(axis=1)
    if "status" in df.columns:
        keep &= df["status"] != "failed"
    return df[keep]


def _axis_label(name: str, direction: str) -> str:
    return f"{_bare(name)} ({'↓' if direction == 'min' else '↑'} better)"


def plot_front(
    df_or_records: pd.DataFrame | Iterable[Record],
    x: str,
    y: str,
    directions: Mapping[str, str] | Sequence[str],
    *,
    color: str | None = None,
    baselines: pd.DataFrame | None = None,
    label_knee: bool = True,
    knee_key: str | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Every evaluated point faint, the (x, y) Pareto front as a step line (the attainment boundary, so the area
    it encloses is what the front dominates), and the knee starred.

    directions: for x and y (a mapping by name or a pair). color: a third column shown as the points' colour; the
        front drawn is still the 2-D one of x and y. baselines: a frame with the x and y columns and a label column
        ("label", "baseline" or "name"; else its index), drawn as labelled crosses. knee_key: star the row with this
        `key` instead of the 2-D knee (e.g. the knee of a front over more objectives than are drawn).
    Artists carry gids ("evaluated", "pareto-front", "knee", "baselines") so tests and notebooks can find them.
    """
    df = _as_frame(df_or_records)
    xc, yc = resolve_column(df, x), resolve_column(df, y)
    cc = resolve_column(df, color) if color is not None else None
    dirs = _direction(directions, [x, y])
    df = _usable(df, [c for c in (xc, yc, cc) if c is not None])
    if df.empty:
        raise ValueError(f"no evaluated point has both {x!r} and {y!r}; nothing to plot")
    points = df[[xc, yc]].to_numpy(dtype=float)
    fig, ax = _figure_and_axes(ax, (6.0, 4.5))

    if cc is not None:
        scatter = ax.scatter(points[:, 0], points[:, 1], c=df[cc].to_numpy(dtype=float), cmap="viridis", s=16,
                             alpha=0.45, linewidths=0, label="evaluated", gid="evaluated")
        fig.colorbar(scatter, ax=ax, label=_bare(cc))
    else:
        ax.scatter(points[:, 0], points[:, 1], color="0.55", s=16, alpha=0.35, linewidths=0, label="evaluated",
                   gid="evaluated")

    front = points[non_dominated(points, dirs)]
    front = front[np.lexsort((front[:, 1], front[:, 0]))]
    # Between two front points the best attainable y belongs to the point on the dominating side of x.
    where = "post" if dirs[0] == "min" else "pre"
    ax.step(front[:, 0], front[:, 1], where=where, color="C3", marker="o", markersize=4, linewidth=1.5,
            label=f"Pareto front of {_bare(xc)}, {_bare(yc)} ({len(front)})", gid="pareto-front")

    if label_knee:
        if knee_key is not None:
            hits = np.flatnonzero((df["key"] == knee_key).to_numpy()) if "key" in df.columns else []
            if len(hits) == 0:
                raise KeyError(f"knee_key {knee_key!r} is not a plotted row")
            knee = points[hits[0]]
        else:
            knee = points[knee_point(points, dirs)]
        ax.scatter([knee[0]], [knee[1]], marker="*", s=220, color="gold", edgecolors="black", linewidths=0.8,
                   zorder=5, label="knee", gid="knee")

    if baselines is not None and len(baselines):
        bx, by = resolve_column(baselines, x), resolve_column(baselines, y)
        label_col = next((c for c in _BASELINE_LABELS if c in baselines.columns), None)
        labels = baselines[label_col] if label_col is not None else baselines.index
        bpts = baselines[[bx, by]].to_numpy(dtype=float)
        ax.scatter(bpts[:, 0], bpts[:, 1], marker="X", s=60, color="black", zorder=4, label="baselines",
                   gid="baselines")
        for (px, py), text in zip(bpts, labels, strict=True):
            ax.annotate(str(text), (px, py), xytext=(4, 4), textcoords="offset points", fontsize=8)

    ax.set_xlabel(_axis_label(xc, dirs[0]))
    ax.set_ylabel(_axis_label(yc, dirs[1]))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def hypervolume_history(
    frames_by_strategy: Mapping[str, pd.DataFrame],
    objectives: Mapping[str, str],
    reference: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Per strategy, the hypervolume of the front of its first k evaluations, k = 1..n (rows in evaluation order;
    a failed row counts as an evaluation and adds nothing).

    Objectives are normalised with one ideal point (the best value over all strategies) and one reference point, so
    the strategies' curves share a scale and 1.0 is the box from ideal to reference. reference: in the objectives'
    own units and directions; default: the worst value seen over all strategies plus 10% of the range.
    """
    names = list(objectives)
    dirs = [objectives[n] for n in names]
    minimised: dict[str, np.ndarray] = {}
    for strategy, df in frames_by_strategy.items():
        cols = [resolve_column(df, n) for n in names]
        values = df[cols].to_numpy(dtype=float)
        ok = ~np.isnan(values).any(axis=1)
        if "status" in df.columns:
            ok &= (df["status"] != "failed").to_numpy()
        x = np.full(values.shape, np.nan)
        if ok.any():
            x[ok] = to_minimisation(values[ok], dirs)
        minimised[strategy] = x
    seen = np.concatenate([x[~np.isnan(x).any(axis=1)] for x in minimised.values()] or [np.empty((0, len(names)))])
    if seen.size == 0:
        return {s: np.zeros(len(x)) for s, x in minimised.items()}
    ideal = seen.min(axis=0)
    if reference is None:
        worst = seen.max(axis=0)
        ref = worst + 0.1 * np.where(worst > ideal, worst - ideal, 1.0)
    else:
        ref = to_minimisation(np.asarray(reference, dtype=float)[None, :], dirs)[0]
    scale = np.where(ref > ideal, ref - ideal, 1.0)
    unit = np.ones(len(names))
    min_dirs = ["min"] * len(names)

    out = {}
    for strategy, x in minimised.items():
        z = (x - ideal) / scale
        history = np.zeros(len(z))
        front = np.empty((0, len(names)))
        hv = 0.0
        for i, p in enumerate(z):
            # Only a point the current front does not weakly dominate can change the hypervolume.
            if not np.isnan(p).any() and not (front <= p).all(axis=1).any():
                front = np.vstack([front, p])
                front = front[non_dominated(front, min_dirs)]
                hv = hypervolume(front, min_dirs, unit)
            history[i] = hv
        out[strategy] = history
    return out


def plot_hypervolume_history(
    frames_by_strategy: Mapping[str, pd.DataFrame],
    objectives: Mapping[str, str],
    reference: Sequence[float] | None = None,
    *,
    ax: Axes | None = None,
) -> Figure:
    """Normalised hypervolume over the number of evaluations, one line per strategy (gid = strategy name): how fast
    each search approaches the front, at equal evaluation cost. See `hypervolume_history` for the normalisation."""
    history = hypervolume_history(frames_by_strategy, objectives, reference)
    fig, ax = _figure_and_axes(ax, (6.0, 3.5))
    for strategy, hv in history.items():
        ax.step(np.arange(1, len(hv) + 1), hv, where="post", label=strategy, gid=strategy)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("hypervolume (normalised)")
    ax.set_title(" · ".join(_axis_label(n, d) for n, d in objectives.items()), fontsize=9)
    ax.grid(alpha=0.3)
    if history:
        ax.legend(fontsize=8)
    return fig


def cache_bits(plan: ComponentCachePlan) -> dict[str, np.ndarray]:
    """Per component, a steps × blocks float array: 1 recompute, 0 reuse, NaN where a block has no such component
    (blocks of all groups side by side, in layout order)."""
    groups = parse_layout(plan.layout)
    components = list(dict.fromkeys(c for _, _, comps in groups for c in comps))
    n_blocks = sum(count for _, count, _ in groups)
    bits = np.array([[int(ch) for ch in row] for row in plan.recompute], dtype=float).reshape(plan.num_steps, -1)
    out = {c: np.full((plan.num_steps, n_blocks), np.nan) for c in components}
    slot = block = 0
    for _, count, comps in groups:
        for _ in range(count):
            for c in comps:
                out[c][:, block] = bits[:, slot]
                slot += 1
            block += 1
    return out


def _block_ticks(ax: Axes, plan: ComponentCachePlan) -> None:
    groups = parse_layout(plan.layout)
    ax.set_ylabel("block")
    if len(groups) == 1:
        ax.yaxis.get_major_locator().set_params(integer=True)
        return
    ticks, labels, start = [], [], 0
    for path, count, _ in groups:
        ticks.append(start + (count - 1) / 2)
        labels.append(path)
        if start:
            ax.axhline(start - 0.5, color="white", linewidth=2.0)
        start += count
    ax.set_yticks(ticks, labels, fontsize=7)


def plot_cache_heatmap(
    schedule: Schedule | ComponentCachePlan | UnitCachePlan,
    *,
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure:
    """Which computations the cache plan does: for a component plan, one panel per component, step on x, block on
    y, recomputed slots dark; for a unit plan (DeepCache / FORA style), one strip of the steps refreshing the unit.

    ax: one Axes per component (a single Axes is enough for a unit plan or a one-component layout).
    """
    plan = schedule.cache if isinstance(schedule, Schedule) else schedule
    if plan is None:
        raise ValueError("the schedule has no cache plan; plot its solver with plot_solver_schedule")
    axes = [ax] if isinstance(ax, Axes) else list(ax) if ax is not None else None

    if isinstance(plan, UnitCachePlan):
        if axes is not None and len(axes) != 1:
            raise ValueError(f"a unit cache plan draws into one Axes, got {len(axes)}")
        fig, strip = _figure_and_axes(axes[0] if axes else None, (max(4.0, 0.25 * plan.num_steps + 1.5), 1.6))
        mask = np.array(plan.refresh_mask(), dtype=float)[None, :]
        strip.imshow(mask, cmap=_CACHE_CMAP, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        strip.set_yticks([])
        strip.set_xlabel("step")
        strip.set_title(f"{plan.group}[{plan.start}:{plan.end}] refreshed on {len(plan.refresh_steps)}/"
                        f"{plan.num_steps} steps", fontsize=9)
        _cache_legend(strip, "refreshed", "residual reused")
        return fig

    bits = cache_bits(plan)
    groups = parse_layout(plan.layout)
    if axes is None:
        n_blocks = next(iter(bits.values())).shape[1] if bits else 1
        width = max(4.0, 0.22 * plan.num_steps + 1.5)
        fig = Figure(figsize=(width, len(bits) * max(1.8, 0.2 * n_blocks + 0.8)), layout="constrained")
        axes = list(fig.subplots(len(bits), 1, sharex=True, squeeze=False)[:, 0])
    else:
        if len(axes) != len(bits):
            raise ValueError(f"the plan has {len(bits)} components {list(bits)}; give {len(bits)} Axes")
        fig = axes[0].get_figure(root=True)  # type: ignore[assignment]
    for panel, (component, array) in zip(axes, bits.items(), strict=True):
        # imshow's rows are y: transpose so steps run left to right.
        panel.imshow(array.T, cmap=_CACHE_CMAP, vmin=0, vmax=1, aspect="auto", interpolation="nearest",
                     origin="lower", gid=f"cache-{component}")
        fraction = np.nanmean(array) if array.size else 0.0
        where = f"{groups[0][0]} · " if len(groups) == 1 else ""
        panel.set_title(f"{where}{component}: {fraction:.0%} recomputed", fontsize=9)
        _block_ticks(panel, plan)
    axes[-1].set_xlabel("step")
    _cache_legend(axes[0], "recomputed", "reused from the cache")
    return fig


def _cache_legend(ax: Axes, on: str, off: str) -> None:
    """Which colour is which, above the (first) panel, outside the data."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=_CACHE_CMAP(1.0), label=on), Patch(facecolor=_CACHE_CMAP(0.0), edgecolor="#999999",
                                                                  label=off)]
    ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.12), ncols=2, fontsize=7, frameon=False)


def plot_solver_schedule(
    schedules: Schedule | SolverPlan | Sequence[Schedule | SolverPlan],
    *,
    labels: Sequence[str] | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Timestep against step index, one line per schedule. Marker shape = order (o 1, s 2, ^ 3), filled = data
    prediction, hollow = noise prediction, red ring = UniC corrector, "r=…" = DC-Solver compensation ratio ≠ 1; a
    dotted segment shows where the last step lands (final_timestep, or 0 for σ = 0). Solvers differ mostly in
    these per-step decisions, so they are drawn as data rather than summarised as a name."""
    items = [schedules] if isinstance(schedules, (Schedule, SolverPlan)) else list(schedules)
    if not items:
        raise ValueError("no schedule to plot")
    plans = [s.solver if isinstance(s, Schedule) else s for s in items]
    if labels is None:
        labels = [f"{i}: NFE {p.nfe}" if len(plans) > 1 else f"NFE {p.nfe}" for i, p in enumerate(plans)]
    if len(labels) != len(plans):
        raise ValueError(f"{len(labels)} labels for {len(plans)} schedules")
    fig, ax = _figure_and_axes(ax, (6.5, 4.0))
    for i, (plan, label) in enumerate(zip(plans, labels, strict=True)):
        colour = f"C{i % 10}"
        idx = np.arange(plan.num_steps)
        ts = np.asarray(plan.timesteps, dtype=float)
        ax.plot(idx, ts, "-", color=colour, alpha=0.6, linewidth=1.2, label=label, gid=f"schedule-{i}")
        end = plan.final_timestep if plan.final_timestep is not None else 0.0
        ax.plot([idx[-1], idx[-1] + 1], [ts[-1], end], ":", color=colour, alpha=0.6)
        for order, marker in _ORDER_MARKERS.items():
            for prediction, face in (("data", colour), ("noise", "none")):
                sel = [k for k, s in enumerate(plan.steps) if s.order == order and s.prediction == prediction]
                if sel:
                    ax.scatter(idx[sel], ts[sel], marker=marker, s=36, facecolors=face, edgecolors=colour,
                               linewidths=1.2, zorder=3, gid=f"order{order}-{prediction}-{i}")
        corr = [k for k, s in enumerate(plan.steps) if s.corrector]
        if corr:
            ax.scatter(idx[corr], ts[corr], marker="o", s=140, facecolors="none", edgecolors="red", linewidths=1.2,
                       zorder=2, gid=f"corrector-{i}")
        for k, step in enumerate(plan.steps):
            if step.dc_ratio != 1.0:
                ax.annotate(f"r={step.dc_ratio:.2f}", (idx[k], ts[k]), xytext=(5, 5), textcoords="offset points",
                            fontsize=7, color=colour, gid=f"dc-{i}")
        if plan.first_step == "zero_x0":
            ax.annotate("analytic first step", (0, ts[0]), xytext=(6, -10), textcoords="offset points", fontsize=7,
                        color=colour)
    legend = ax.legend(fontsize=8, loc="upper right")
    ax.add_artist(legend)
    keys = [Line2D([], [], linestyle="", marker=m, color="0.3", label=f"order {o}") for o, m in _ORDER_MARKERS.items()]
    keys += [
        Line2D([], [], linestyle="", marker="o", color="0.3", label="data prediction"),
        Line2D([], [], linestyle="", marker="o", markerfacecolor="none", color="0.3", label="noise prediction"),
        Line2D([], [], linestyle="", marker="o", markersize=11, markerfacecolor="none", color="red",
               label="corrector"),
    ]
    ax.legend(handles=keys, fontsize=7, loc="lower left")
    ax.set_xlabel("step index")
    ax.set_ylabel("timestep")
    ax.grid(alpha=0.3)
    return fig


def sample_grid_figure(
    model: LoadedModel,
    schedule: Schedule,
    teacher_schedule: Schedule,
    conditions: Sequence[Any],
    seeds: Sequence[int],
    *,
    guidance: float | None = None,
    nrow: int | None = None,
    batch_size: int = 64,
    ax: Sequence[Axes] | None = None,
) -> Figure:
    """The schedule's images beside the teacher's for the same conditions and seeds (same initial noise), so what a
    cheaper schedule loses is visible, not only its metric. Keep it small: both schedules run here. Videos are drawn
    as frame strips, one video per row, its frames left to right.

    ax: two Axes (schedule, teacher).
    """
    import torch
    from torchvision.utils import make_grid

    from schedsearch.objectives.images import frames, to_unit_interval
    from schedsearch.runtime.execute import run_batches

    def images(s: Schedule) -> torch.Tensor:
        return torch.cat([im for _, im in run_batches(model, s, conditions, seeds, guidance, batch_size)])

    ours, teacher = images(schedule), images(teacher_schedule)
    if ours.dim() == 5:  # (N, C, F, H, W): a row of F frames per video
        nrow = ours.shape[2]
    nrow = nrow or max(1, int(np.ceil(np.sqrt(len(seeds)))))
    if ax is None:
        fig = Figure(figsize=(8.0, 4.2), layout="constrained")
        axes = list(fig.subplots(1, 2))
    else:
        axes = list(ax)
        if len(axes) != 2:
            raise ValueError(f"give two Axes (schedule, teacher), got {len(axes)}")
        fig = axes[0].get_figure(root=True)  # type: ignore[assignment]
    mse = float(((ours.float() - teacher.float()) ** 2).mean())
    titles = (f"schedule (NFE {schedule.solver.nfe}, MSE to teacher {mse:.4f})",
              f"teacher (NFE {teacher_schedule.solver.nfe})")
    for panel, batch, title in zip(axes, (ours, teacher), titles, strict=True):
        grid = make_grid(to_unit_interval(frames(batch)), nrow=nrow, padding=2, pad_value=1.0)
        panel.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        panel.set_title(title, fontsize=9)
        panel.set_axis_off()
    return fig
