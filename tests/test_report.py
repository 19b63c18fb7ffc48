"""The HTML study report: one row per front point, plots inline, nothing fetched from elsewhere, clear errors."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from schedsearch.results.pareto import non_dominated
from schedsearch.results.report import ReportError, report_main, report_path, write_report
from schedsearch.results.store import Record, ResultStore
from schedsearch.spaces.baselines import ddim_plan, linspace_timesteps
from schedsearch.spaces.cache_plan import ComponentCachePlan
from schedsearch.spaces.schedule import Schedule

LAYOUT = "transformer_blocks[3](attn1,ff)"
OBJECTIVES = {"mse": "min", "nfe": "min", "psnr": "max"}


def _schedule(rng: np.random.Generator, baseline: str | None = None) -> Schedule:
    steps = int(rng.integers(4, 9))
    rows = ["1" * 6] + ["".join(rng.choice(["0", "1"], 6)) for _ in range(steps - 1)]
    meta = {"baseline": baseline} if baseline else {}
    return Schedule("builtin:test", ddim_plan(linspace_timesteps(1000, steps)), ComponentCachePlan(LAYOUT, tuple(rows)),
                    meta=meta).validate(1000)


def _fill(store: ResultStore, study: str, n: int = 30, objectives: dict[str, str] | None = None) -> list[Record]:
    rng = np.random.default_rng(0)
    store.set_study_settings(study, {"model": "builtin:test", "space": "cache", "strategy": "ga",
                                     "objectives": objectives if objectives is not None else OBJECTIVES,
                                     "preset": "quick", "samples": 8, "calibration": "cal123"})
    records = []
    for i in range(n):
        schedule = _schedule(rng, baseline="ddim-4" if i == 0 else None)
        failed = i % 10 == 7
        metrics = {} if failed else {"mse": float(rng.uniform()), "nfe": float(schedule.solver.nfe),
                                     "psnr": float(rng.uniform(10, 30))}
        record = Record.for_schedule(study, schedule, metrics, calibration_hash="cal123", wall_time_s=0.5 + i % 3,
                                     status="failed" if failed else "ok", error="boom: out of memory" if failed else "",
                                     device="cpu", summary={"nfe": schedule.solver.nfe,
                                                            "recompute_fraction": schedule.cache.recompute_fraction()})
        if store.append(record):
            records.append(record)
    return records


def _front_keys(records: list[Record], objectives: dict[str, str]) -> set[str]:
    ok = [r for r in records if r.status == "ok"]
    points = np.array([[r.metrics[n] for n in objectives] for r in ok])
    return {r.key for r, keep in zip(ok, non_dominated(points, list(objectives.values())), strict=True) if keep}


def test_report_has_front_rows_inline_images_and_no_external_urls(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        records = _fill(store, "cache/ga")
        path = write_report(store, "cache/ga", tmp_path / "out")
    assert path == report_path(tmp_path / "out", "cache/ga") and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    text = path.read_text()

    front = _front_keys(records, OBJECTIVES)
    assert 1 < len(front) < len(records)
    table = text[text.index('<table class="sortable">'):]
    table = table[: table.index("</table>")]
    assert set(re.findall(r'<tr data-key="([0-9a-f]+)"', table)) == front
    assert table.count("<tr data-key=") == len(front)
    assert table.count('class="knee"') == 1

    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) >= 4  # front, hypervolume, knee solver plot, knee heat map
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert re.findall(r'(?:src|href)="(?!data:)', text) == []
    assert "http://" not in text and "https://" not in text and "<script src" not in text

    assert "cal123" in text and "boom: out of memory" in text
    n_failed = sum(r.status == "failed" for r in records)
    assert f"<th>evaluations</th><td>{len(records)}</td>" in text
    assert f"<th>failed</th><td>{n_failed}</td>" in text
    assert f"{sum(r.wall_time_s for r in records):.1f} s" in text
    assert '"strategy": "ga"' in text  # the settings


def test_report_for_one_objective_and_for_a_study_without_settings(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        records = _fill(store, "single", n=12, objectives={"mse": "min"})
        text = write_report(store, "single", tmp_path).read_text()
        best = min((r for r in records if r.status == "ok"), key=lambda r: r.metrics["mse"])
        assert re.findall(r'<tr data-key="([0-9a-f]+)"', text) == [best.key]

        schedule = _schedule(np.random.default_rng(1))
        store.append(Record.for_schedule("bare", schedule, {"mse": 0.1}, calibration_hash="c"))
        text = write_report(store, "bare", tmp_path).read_text()
        assert "name no objectives" in text and "No front, so no knee schedule" in text
        explicit = write_report(store, "bare", tmp_path / "x", objectives={"mse": "min"}).read_text()
        assert f'<tr data-key="{Record.for_schedule("bare", schedule, {}, calibration_hash="c").key}"' in explicit


def test_unknown_study_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        _fill(store, "known", n=5)
        with pytest.raises(ReportError, match=r"study 'nope' is not in this store; studies with evaluations: 'known'"):
            write_report(store, "nope", tmp_path / "out")
        with pytest.raises(ReportError, match="never recorded"):
            write_report(store, "known", tmp_path / "out", objectives={"lpips": "min"})
    assert not (tmp_path / "out").exists()

    assert report_main(str(db), "nope", str(tmp_path / "out")) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert report_main(str(tmp_path / "missing.db"), "known", str(tmp_path / "out")) == 2
    assert "no such results store" in capsys.readouterr().err
    assert report_main(str(db), "known", str(tmp_path / "out")) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(report_path(tmp_path / "out", "known")) and (tmp_path / "out" / "known.html").is_file()


def test_report_draws_held_out_samples_of_the_front(tmp_path):
    """With images, the knee and the front's ends are drawn beside the teacher on held-out seeds (the model runs)."""
    from schedsearch.results.report import write_report
    from schedsearch.results.store import Record, ResultStore
    from schedsearch.spaces import baselines
    from schedsearch.spaces.schedule import Schedule

    with ResultStore(tmp_path / "r.db") as store:
        store.set_study_settings("s", {"model": "builtin:mnist-dit", "objectives": [["psnr", "max"], ["nfe", "min"]],
                                       "calibration": "c"})
        for nfe, psnr in ((3, 20.0), (5, 25.0), (8, 30.0)):
            plan = baselines.dpm_solver_plan(baselines.linspace_timesteps(1000, nfe), 2)
            schedule = Schedule("builtin:mnist-dit", plan)
            store.append(Record.for_schedule("s", schedule, {"psnr": psnr, "nfe": float(nfe)}, calibration_hash="c"))
        page = write_report(store, "s", tmp_path / "out", images=2).read_text()
    section = page[page.index("Samples on held-out seeds"):]
    assert section.count("<h3>") == 3 and section.count("data:image/png") == 3
    assert "knee" in section and "best psnr" in section
