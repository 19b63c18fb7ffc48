"""One self-contained HTML page per study: its front, how the search got there, and what it cost.

Self-contained on purpose: plots are inline base64 PNGs, the table sorts with a few lines of inline JS, and nothing is
fetched from a CDN, so the file can be mailed, archived with the store, or opened on an offline cluster node.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from schedsearch.errors import UserInputError
from schedsearch.results.atomic import atomic_write_text
from schedsearch.results.query import heldout_columns, study_front
from schedsearch.results.store import ResultStore, StoreError, settings_objectives

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["ReportError", "report_main", "report_path", "write_report"]

_MAX_FAILURES_LISTED = 20


class ReportError(UserInputError):
    """The report cannot be made (e.g. unknown study); the message says what exists instead."""


def report_path(out_dir: str | Path, study: str) -> Path:
    """`<out_dir>/<study>.html`, the study name reduced to characters safe in a file name."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", study).strip("._") or "study"
    return Path(out_dir) / f"{slug}.html"


def write_report(
    store: ResultStore | str | Path,
    study: str,
    out_dir: str | Path,
    *,
    objectives: Mapping[str, str] | None = None,
    images: int = 0,
) -> Path:
    """Write the study's HTML report atomically and return its path.

    objectives: metric name → "min"/"max"; default: the study's stored settings. Without either, the report lists
    the evaluations but draws no front.
    images: held-out samples drawn for the knee and two other front points beside the teacher (0: none; it loads
        the study's model and runs those schedules, seconds on the builtin model).
    """
    if isinstance(store, ResultStore):
        return _write(store, study, out_dir, objectives, images)
    with ResultStore(store, create=False) as opened:
        return _write(opened, study, out_dir, objectives, images)


def report_main(store_path: str, study: str, out: str) -> int:
    """`schedsearch report --store PATH --study NAME --out DIR`: 0 and the report's path on stdout, or 2 and an
    `error: ...` line on stderr when the store or study cannot be read (nothing is written then)."""
    try:
        path = write_report(store_path, study, out)
    except (ReportError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _write(store: ResultStore, study: str, out_dir: str | Path, objectives: Mapping[str, str] | None,
           images: int = 0) -> Path:
    settings = store.study_settings(study)
    if store.count(study) == 0:
        known = store.studies()
        listed = ", ".join(repr(s) for s in known) if known else "none"
        what = "has no evaluations yet" if settings is not None else "is not in this store"
        raise ReportError(f"{store.path}: study {study!r} {what}; studies with evaluations: {listed}")
    settings = settings or {}
    if objectives is None:
        objectives = settings_objectives(settings)
    objectives = dict(objectives)
    frame = store.to_frame(study)
    missing = [n for n in objectives if f"metric.{n}" not in frame.columns]
    if missing:
        raise ReportError(f"study {study!r}: objective(s) {missing} were never recorded; metrics are "
                          f"{[c[7:] for c in frame.columns if c.startswith('metric.')]}")
    records = {r.key: r for r in store.records(study)}
    html_text = _render(study, store, settings, objectives, frame, records, images)
    return atomic_write_text(report_path(out_dir, study), html_text)


def _figure_png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="" src="data:image/png;base64,{data}">'


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text, quote=False)}</pre>"


def _pandas() -> Any:
    import pandas as pd  # here, not at the top: the CLI imports this module to register its command

    return pd


def _cell(value: Any) -> str:
    """A table cell; numbers carry their full value in data-value so sorting is numeric and exact."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        number = float(value)
        if math.isnan(number):
            return '<td class="num" data-value="">–</td>'
        return f'<td class="num" data-value="{number!r}">{number:.4g}</td>'
    if value is None or value is _pandas().NA:
        return "<td>–</td>"
    return f"<td>{html.escape(str(value))}</td>"


def _table(frame: pd.DataFrame, columns: Sequence[str], headers: Sequence[str], row_class: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = []
    for (_, row), cls in zip(frame.iterrows(), row_class, strict=True):
        cells = "".join(_cell(row[c]) for c in columns)
        attr = f' class="{cls}"' if cls else ""
        rows.append(f'<tr data-key="{html.escape(str(row["key"]))}"{attr}>{cells}</tr>')
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _baselines_of(store: ResultStore, study: str, objectives: Mapping[str, str], frame: pd.DataFrame,
                  records: Mapping[str, Any]) -> pd.DataFrame:
    """The front of the space's hand-made baselines scored beside the study (`<study>@baselines`; the others would
    only bury the labels), else the study's own records that are baselines (meta.baseline)."""
    from schedsearch.results.query import baselines_study
    from schedsearch.results.store import records_frame

    if baselines_study(study) not in store.studies():
        return _baselines(frame, records)
    scored = list(study_front(store, baselines_study(study), dict(objectives), required=False).records)
    if not scored:
        return _baselines(frame, records)
    return _baselines(records_frame(scored), {r.key: r for r in scored})


def _baselines(frame: pd.DataFrame, records: Mapping[str, Any]) -> pd.DataFrame:
    """Rows whose schedule says it is a hand-made baseline (meta.baseline), labelled with its name."""
    labels = []
    for key in frame["key"]:
        try:
            meta = json.loads(records[key].schedule_json).get("meta") or {}
        except (json.JSONDecodeError, AttributeError):
            meta = {}
        labels.append(meta.get("baseline") if isinstance(meta, dict) else None)
    out = frame.assign(label=labels)
    return out[out["label"].notna() & (out["status"] == "ok")]


def _samples_section(settings: Mapping[str, Any], front: Any, n: int) -> str:
    """The knee and the two ends of the front, each beside the teacher on `n` held-out seeds (same noise), so what
    a cheaper schedule loses can be seen, not only read off a metric."""
    from schedsearch.calibration.calibration_set import default_spec
    from schedsearch.results.plots import sample_grid_figure
    from schedsearch.runtime.models import load_model

    try:
        model = load_model(str(settings.get("model")))
    except Exception as exc:  # the report stays useful without pictures
        return f"<p>No samples: the study's model cannot be loaded here ({html.escape(str(exc))}).</p>"
    if model.info.conditioning != "class":
        return "<p>No samples: the study's prompts are not stored with it; run the knee with `schedsearch sample`.</p>"
    spec = default_spec(model.info, samples=n, split="heldout", guidance=settings.get("guidance"))
    picks: list[tuple[str, int]] = []
    for label, index in (("knee", front.knee), (f"best {next(iter(front.objectives))}", 0),
                         ("the other end of the front", len(front.records) - 1)):
        if index not in [i for _, i in picks]:  # the knee can be an end: draw it once
            picks.append((label, index))
    parts = []
    for label, index in picks:
        record = front.records[index]
        metrics = ", ".join(f"{k} {record.metrics[k]:.4g}" for k in front.objectives)
        try:
            fig = sample_grid_figure(model, record.to_schedule(), spec.teacher, list(spec.conditions),
                                     list(spec.seeds), guidance=spec.guidance)
        except Exception as exc:  # a schedule this model cannot run: say so, keep the rest of the report
            parts.append(f"<p>{html.escape(label)}: cannot be sampled here ({html.escape(str(exc))}).</p>")
            continue
        parts.append(f"<h3>{html.escape(label)}: <code>{record.key}</code> ({html.escape(metrics)})</h3>"
                     + _figure_png(fig))
    return "\n".join(parts)


def _knee_section(knee_key: str | None, records: Mapping[str, Any]) -> str:
    from schedsearch.results.plots import plot_cache_heatmap, plot_solver_schedule
    from schedsearch.spaces.errors import ScheduleError
    from schedsearch.spaces.schedule import Schedule

    if knee_key is None:
        return "<p>No front, so no knee schedule.</p>"
    try:
        schedule = Schedule.from_json(records[knee_key].schedule_json)
    except ScheduleError as exc:
        return f"<p>The knee schedule ({html.escape(knee_key)}) cannot be read: {html.escape(str(exc))}</p>"
    parts = [f"<p>Candidate <code>{html.escape(knee_key)}</code>: NFE {schedule.solver.nfe}, "
             f"{schedule.solver.num_steps} steps.</p>", _figure_png(plot_solver_schedule(schedule))]
    if schedule.cache is not None:
        parts.append(_figure_png(plot_cache_heatmap(schedule)))
    parts.append(f"<details><summary>schedule JSON</summary>{_pre(schedule.to_json())}</details>")
    return "\n".join(parts)


def _cost_section(frame: pd.DataFrame) -> str:
    n = len(frame)
    failed = int((frame["status"] == "failed").sum())
    wall = frame["wall_time_s"]
    span = frame["created_at"].max() - frame["created_at"].min()
    rows = [
        ("evaluations", str(n)),
        ("succeeded", str(n - failed)),
        ("failed", str(failed)),
        ("total wall time", f"{wall.sum():.1f} s"),
        ("mean wall time per evaluation", f"{wall.mean():.3g} s"),
        ("elapsed, first to last result", f"{span.total_seconds():.1f} s"),
        ("devices", ", ".join(sorted(set(frame["device"].astype(str)))) or "–"),
        ("code versions", ", ".join(sorted(set(frame["code_version"].astype(str)))) or "–"),
    ]
    out = ["<table>", *(f"<tr><th>{k}</th><td>{html.escape(v)}</td></tr>" for k, v in rows), "</table>"]
    failures = frame[frame["status"] == "failed"]
    if len(failures):
        items = "".join(f"<li><code>{html.escape(str(r.key))}</code>: {html.escape(str(r.error)[:300])}</li>"
                        for r in failures.head(_MAX_FAILURES_LISTED).itertuples())
        rest = len(failures) - _MAX_FAILURES_LISTED
        more = f"<p>… and {rest} more.</p>" if rest > 0 else ""
        out.append(f"<h3>Failures</h3><ul>{items}</ul>{more}")
    return "\n".join(out)


def _render(
    study: str,
    store: ResultStore,
    settings: Mapping[str, Any],
    objectives: Mapping[str, str],
    frame: pd.DataFrame,
    records: Mapping[str, Any],
    images: int = 0,
) -> str:
    from schedsearch.results.plots import plot_front, plot_hypervolume_history

    columns = {f"metric.{n}": d for n, d in objectives.items()}
    sections: list[tuple[str, str]] = []
    knee_key = None
    if columns:
        found = study_front(store, study, dict(objectives), required=False)
        order = {r.key: i for i, r in enumerate(found.records)}
        front = frame[frame["key"].isin(order)].sort_values("key", key=lambda k: k.map(order)).reset_index(drop=True)
        if found.records:
            knee_key = found.records[found.knee].key
        held_cols = []  # the front re-scored on unseen seeds, beside it
        for name, values in heldout_columns([records[k] for k in front["key"]], found.heldout, objectives).items():
            front[f"heldout.{name}"] = values
            held_cols.append(f"heldout.{name}")
        metric_cols = list(columns) + sorted(c for c in frame.columns if c.startswith("metric.") and c not in columns)
        # A summary entry that repeats a metric (e.g. nfe) would show the same number under the same header twice.
        summary_cols = [c for c in frame.columns if c.startswith("summary.") and f"metric.{c[8:]}" not in metric_cols]
        table_cols = ["key", *metric_cols[: len(columns)], *held_cols, *metric_cols[len(columns):], *summary_cols,
                      "wall_time_s"]
        headers = ["key", *(f"{c[7:]} ({columns[c]})" for c in metric_cols[: len(columns)]),
                   *(f"{c[8:]} held-out ({objectives[c[8:]]})" for c in held_cols),
                   *(c[7:] for c in metric_cols[len(columns):]),
                   *(c[8:] for c in summary_cols), "wall time (s)"]
        classes = ["knee" if k == knee_key else "" for k in front["key"]]
        sections.append((
            f"Pareto front ({len(front)} of {found.scored} scored evaluations at the study's calibration)",
            "<p>Click a column header to sort. The knee is highlighted.</p>"
            + _table(front, table_cols, headers, classes),
        ))
        names = list(objectives)
        if len(names) >= 2 and len(front):
            fig = plot_front(frame, names[0], names[1], objectives, color=names[2] if len(names) > 2 else None,
                             baselines=_baselines_of(store, study, objectives, frame, records), knee_key=knee_key,
                             title=study)
            sections.append(("Front", _figure_png(fig)))
        strategy = str(settings.get("strategy", "search"))
        sections.append(("Hypervolume over evaluations",
                         _figure_png(plot_hypervolume_history({strategy: frame}, objectives))
                         + "<p>Normalised: each objective is scaled so that 1.0 is the box from the ideal point (the "
                           "best value of each objective this study reached) to the reference point (the worst value "
                           "plus 10% of the range). The curve is the hypervolume of the front of the first k "
                           "evaluations; a failed evaluation adds nothing.</p>"))
    else:
        sections.append(("Pareto front", "<p>The study's settings name no objectives, so no front is drawn.</p>"))
    sections.append(("Knee schedule", _knee_section(knee_key, records)))
    if images and columns and found.records:
        sections.append(("Samples on held-out seeds", _samples_section(settings, found, images)))
    sections.append(("Cost of the search", _cost_section(frame)))
    hashes = sorted(set(frame["calibration_hash"].astype(str)))
    calibration = settings.get("calibration")
    provenance = (f"<p>Calibration hash: <code>{html.escape(str(calibration or ', '.join(hashes)))}</code>"
                  + ("" if calibration is None or hashes == [calibration] else
                     f" (records carry: <code>{html.escape(', '.join(hashes))}</code>)")
                  + f"</p><p>Store: <code>{html.escape(str(store.path))}</code></p>")
    sections.append(("Settings", provenance + _pre(json.dumps(dict(settings), indent=2))))
    body = "\n".join(f"<section><h2>{html.escape(t)}</h2>\n{c}</section>" for t, c in sections)
    return _PAGE.format(title=html.escape(f"schedsearch report: {study}"), body=body, script=_SORT_JS)


_SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute("data-order") !== "asc";
      th.setAttribute("data-order", asc ? "asc" : "desc");
      function key(row) {
        var cell = row.cells[col], v = cell.getAttribute("data-value");
        return v === null ? cell.textContent : (v === "" ? NaN : parseFloat(v));
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), c;
        if (typeof x === "number" && typeof y === "number") {
          c = isNaN(x) ? (isNaN(y) ? 0 : 1) : (isNaN(y) ? -1 : x - y);
          return asc || isNaN(x) || isNaN(y) ? c : -c;
        }
        c = String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
table.sortable th {{ cursor: pointer; background: #f3f3f3; }}
tr.knee {{ background: #fff3c4; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0; }}
pre {{ background: #f7f7f7; padding: 0.5em; overflow-x: auto; }}
</style></head>
<body><h1>{title}</h1>
{body}
<script>{script}</script>
</body></html>
"""
